"""Instruction tuning (SFT) data: chat jsonl -> one conversation per row, with an assistant-token mask.

`gptkit prepare chat FILE.jsonl --model M --out DIR` reads one conversation per line, either
`{"messages": [{"role", "content"}, ...]}` or Alpaca's `{"instruction", "input", "output"}`,
renders each with the model's chat template (or DEFAULT_CHAT_TEMPLATE) and tokenizes it. The
loss covers only what the assistant says: the tokens inside the template's `{% generation %}`
blocks, as transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` marks them.

Layout of DIR (besides meta.json, whose "format" is "chat"):
  train.bin, val.bin            llm.c token shards; every conversation is one row of exactly
                                `row_tokens` (= block_size + 1) tokens, padded with the EOS token
  train_mask.bin, val_mask.bin  the same layout and length, 1 where the token is the assistant's, else 0
  chat_template.jinja           the template used (a run trained on DIR carries it on)
Rows are never packed, so attention never crosses a conversation boundary. A conversation longer
than a row is truncated to it, with a warning and a count in meta.json ("truncated"); one left
with no assistant token is dropped and counted ("dropped").

In training, target t of a row is token t+1 where the mask of token t+1 is 1, else -1 (ignored).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from gptkit.chat_template import special_tokens_of
from gptkit.data import TokenLoader, read_meta, read_shard, write_shard
from gptkit.errors import GptkitError, make_dir
from gptkit.loading import load_model
from gptkit.tokenizer import tokenizer_for

# The default template, ChatML-like: each turn is `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, except that
# an assistant turn ends in the EOS token, so generation stops by itself. The assistant's content
# and its EOS are in a {% generation %} block: the tokens the loss covers.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters marking generation spans while rendering


# ---------------------------------------------------------------------------------------------
# reading chat jsonl
def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a chat jsonl file as a list of {role, content}; bad lines are user errors
    naming the line."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError("chat data file not found", path, "give a .jsonl file, one conversation per line")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptkitError(f"invalid JSON: {e.msg}", where, "each line must be one JSON object") from None
            out.append(conversation_of(obj, where))
    if not out:
        raise GptkitError("no conversations in the file", path, "write one JSON conversation per line")
    return out


def conversation_of(obj: Any, where: str) -> list[dict[str, str]]:
    """A jsonl record as messages: {"messages": [...]} as it is, Alpaca's fields as a user turn
    (instruction, then input after a blank line) and an assistant turn (output)."""
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise GptkitError("empty conversation", where, "give at least one user and one assistant message")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise GptkitError(f"message {i} has no role", where,
                                  f"write each message as {{\"role\": one of {', '.join(ROLES)}, \"content\": ...}}")
            if m["role"] not in ROLES:
                raise GptkitError(f"message {i} has unknown role {m['role']!r}", where,
                                  f"use one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise GptkitError(f"message {i} has no text content", where, "give \"content\" as a string")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise GptkitError("conversation has no assistant message", where,
                              "SFT learns the assistant's turns: give at least one")
        return out
    if isinstance(obj, dict) and "instruction" in obj and "output" in obj:
        user = str(obj["instruction"]) + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(obj["output"])}]
    raise GptkitError("neither a chat record nor an Alpaca record", where,
                      'give {"messages": [{"role", "content"}, ...]} or {"instruction", "input", "output"}')


# ---------------------------------------------------------------------------------------------
# rendering with generation spans, and tokenizing into ids + mask
def _environment():
    try:  # an optional dependency (extra `chat`)
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GptkitError("jinja2 is not installed: chat templates need it", "prepare chat",
                          "pip install 'gptkit[chat]'") from None

    class GenerationMarks(Extension):
        """{% generation %}...{% endgeneration %}: the body, between span markers."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise GptkitError(f"the chat template refused the conversation: {message}", "chat template",
                          "fix the conversation (roles, order) for this template")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationMarks])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False,
           **special_tokens) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with a jinja chat template, and the character spans of its
    {% generation %} blocks. `special_tokens` (eos_token, bos_token...) are template variables."""
    text = "".join(m["content"] for m in messages)
    if _OPEN in text or _CLOSE in text:
        raise GptkitError("the conversation holds private-use characters U+E000/U+E001", "chat data",
                          "remove them from the messages")
    try:
        raw = _environment().from_string(template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt,
                                                          **special_tokens)
    except GptkitError:
        raise
    except Exception as e:  # jinja2's syntax and runtime errors
        raise GptkitError(f"the chat template does not render: {type(e).__name__}: {e}", "chat template",
                          "fix the template") from None
    out, spans, start, n = [], [], 0, 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", raw):
        if piece == _OPEN:
            start = n
        elif piece == _CLOSE:
            spans.append((start, n))
        else:
            out.append(piece)
            n += len(piece)
    return "".join(out), spans


def encode_with_mask(text: str, spans: list[tuple[int, int]], encode, specials: dict[str, int]
                     ) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a mask, 1 for tokens inside `spans`. `encode(str) -> ids` encodes
    plain text; the special tokens' text (e.g. "<|endoftext|>") becomes their ids. The text is cut
    at span edges and special tokens and each piece encoded alone; templates put those edges at
    token boundaries (after a newline, at a special token), where this equals encoding the whole."""
    cuts = {0, len(text)}
    for a, b in spans:
        cuts |= {a, b}
    for s in specials:
        i = text.find(s)
        while s and i >= 0:
            cuts |= {i, i + len(s)}
            i = text.find(s, i + len(s))
    cuts = sorted(cuts)
    ids, mask = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = text[a:b]
        toks = [specials[piece]] if piece in specials else encode(piece)
        inside = any(s <= a and b <= e for s, e in spans)
        ids += toks
        mask += [int(inside)] * len(toks)
    return ids, mask


# ---------------------------------------------------------------------------------------------
# the model's chat template, tokenizer and special tokens
def special_ids(tok, variables: dict[str, str]) -> dict[str, int]:
    """{special token text: id} for the template variables (eos_token, bos_token...) the tokenizer
    has as single tokens: rendered into a conversation, they become their ids."""
    ids = {t: tok.token_to_id(t) for t in set(variables.values()) if t}
    return {t: i for t, i in ids.items() if i is not None}


# ---------------------------------------------------------------------------------------------
# prepare
def prepare_chat(file: str | Path, model: str, out: str | Path, block_size: int | None = None,
                 val_fraction: float = 0.1, vocab: str | Path | None = None, log=print) -> Path:
    """`gptkit prepare chat`: write DIR (layout in the module docstring); return it."""
    if not 0.0 <= val_fraction < 1.0:
        raise GptkitError(f"must be in [0, 1), got {val_fraction}", "--val-fraction", "e.g. 0.1")
    convs = read_conversations(file)
    loaded = load_model(model)
    tok = tokenizer_for(loaded, vocab)
    T = block_size or loaded.model.config.block_size
    if not 1 <= T <= loaded.model.config.block_size:
        raise GptkitError(f"must be in 1..{loaded.model.config.block_size}, got {T}", "--block-size",
                          "use at most the model's context")
    # the model's own template (its directory's, or the one a chat-tuned run carries), else the default
    template, source = (tok.chat_template.source, "the model's") if getattr(tok, "chat_template", None) else \
        (DEFAULT_CHAT_TEMPLATE, "gptkit's default (ChatML-like)")
    if "generation" not in template:
        raise GptkitError("the model's chat template does not mark the assistant's text", "chat template",
                          "wrap the assistant's content in {% generation %}...{% endgeneration %} in its "
                          "chat_template.jinja (transformers' return_assistant_tokens_mask needs the same)")
    variables = special_tokens_of(tok)
    specials = special_ids(tok, variables)
    pad = specials.get(variables.get("eos_token"), getattr(tok, "eot", None))
    if pad is None:
        raise GptkitError("the model's tokenizer has no end-of-text token", "--model",
                          "chat tuning needs a tokenizer with an EOS token (GPT-2's BPE, a tokenizer.json)")
    row = T + 1
    rows_ids, rows_mask, truncated, dropped = [], [], 0, 0
    for c in convs:
        text, spans = render(template, c, **variables)
        ids, mask = encode_with_mask(text, spans, tok.encode, specials)
        if len(ids) > row:
            truncated += 1
            ids, mask = ids[:row], mask[:row]
        if not any(mask[1:]):
            dropped += 1
            continue
        rows_ids.append(ids + [pad] * (row - len(ids)))
        rows_mask.append(mask + [0] * (row - len(mask)))
    if truncated:
        log(f"warning: {truncated} of {len(convs)} conversations are longer than block_size+1 = {row} tokens and "
            f"were truncated{f'; {dropped} kept no assistant token and were dropped' if dropped else ''}")
    if len(rows_ids) < 2:
        raise GptkitError(f"{len(rows_ids)} usable conversation(s); need at least 2 (train and val)", file,
                          "give more conversations, or a larger --block-size")
    n_val = max(1, int(round(len(rows_ids) * val_fraction))) if val_fraction > 0 else 1
    n_val = min(n_val, len(rows_ids) - 1)
    out = Path(out)
    make_dir(out, "--out")
    ids_arr, mask_arr = np.array(rows_ids, dtype=np.int64), np.array(rows_mask, dtype=np.int64)
    for split, sl in (("train", slice(0, len(rows_ids) - n_val)), ("val", slice(len(rows_ids) - n_val, None))):
        write_shard(out / f"{split}.bin", ids_arr[sl].reshape(-1), loaded.model.config.vocab_size)
        write_shard(out / f"{split}_mask.bin", mask_arr[sl].reshape(-1))
    (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    meta = {"format": "chat", "tokenizer": getattr(tok, "kind", "gpt2"), "vocab_size": loaded.model.config.vocab_size,
            "row_tokens": row, "conversations": len(convs), "train_rows": len(rows_ids) - n_val, "val_rows": n_val,
            "truncated": truncated, "dropped": dropped, "chat_template": TEMPLATE_FILE, "template_source": source,
            "source": str(file), "train_tokens": int((len(rows_ids) - n_val) * row), "val_tokens": int(n_val * row),
            "assistant_tokens": int(mask_arr.sum())}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log(f"chat template: {source}")
    return out


# ---------------------------------------------------------------------------------------------
# loading prepared chat data
def is_chat_data(meta: dict) -> bool:
    return meta.get("format") == "chat"


def read_template(data_dir: str | Path) -> str | None:
    p = Path(data_dir) / TEMPLATE_FILE
    return p.read_text(encoding="utf-8") if p.is_file() else None


def carried_state(meta: dict, data_dir: str | Path) -> dict[str, str]:
    """What a run trained on chat data carries in its checkpoints' state.json: the chat template
    (beside a LoRA run's base reference, the other entry the trainer adds there)."""
    template = read_template(data_dir) if is_chat_data(meta) else None
    return {"chat_template": template} if template else {}


def write_run_template(run_dir: Path, state: dict) -> None:
    """The run directory's chat_template.jinja, beside config.toml, when the run carries one."""
    if state.get("chat_template"):
        (Path(run_dir) / TEMPLATE_FILE).write_text(state["chat_template"], encoding="utf-8")


class ChatRows:
    """A chat split as (rows, row_tokens) arrays of tokens and mask."""

    def __init__(self, data_dir: str | Path, split: str):
        d = Path(data_dir)
        meta = read_meta(d)
        self.row = int(meta["row_tokens"])
        files = [d / f"{split}.bin", d / f"{split}_mask.bin"]
        for f in files:
            if not f.is_file():
                raise GptkitError(f"missing {f.name} of a chat data directory", d, "re-run `gptkit prepare chat`")
        toks, mask = (read_shard(f) for f in files)
        if len(toks) != len(mask) or len(toks) % self.row:
            raise GptkitError(f"{split}.bin and {split}_mask.bin do not hold whole rows of {self.row} tokens", d,
                              "re-run `gptkit prepare chat`")
        self.tokens = toks.reshape(-1, self.row)
        self.mask = mask.reshape(-1, self.row)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: Iterable[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) and y (B, T) with y = -1 where the target is not an assistant token."""
        rows = np.asarray(list(rows))
        buf = torch.from_numpy(np.asarray(self.tokens[rows, : T + 1], dtype=np.int64))  # (B, T+1)
        keep = torch.from_numpy(np.asarray(self.mask[rows, 1: T + 1], dtype=np.int64)) == 1
        x, y = buf[:, :-1], buf[:, 1:].clone()
        y[~keep] = -1
        return x, y


class ChatLoader:
    """TokenLoader's interface over chat rows: batch i is B random rows, a pure function of
    (seed, i*world + rank), so the state is the step counter (resume and torchrun as TokenLoader)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None, mode: str = "random"):
        self.data = ChatRows(data_dir, split)
        if block_size + 1 > self.data.row:
            raise GptkitError(f"block_size {block_size} is longer than the prepared rows ({self.data.row - 1} "
                              "tokens + 1)", "block_size", f"set block_size={self.data.row - 1} or less, or "
                              "prepare the data again with a larger --block-size")
        if vocab_size is not None and int(self.data.tokens.max()) >= vocab_size:
            raise GptkitError(f"the data holds token id {int(self.data.tokens.max())} >= the model's vocab_size "
                              f"{vocab_size}", data_dir, "prepare the data with the model's tokenizer")
        self.B, self.T, self.seed, self.rank, self.world = batch_size, block_size, seed, rank, world_size
        self.step = 0
        self.shards = [self.data.tokens.reshape(-1)]  # the trainer's time budget reads the split's size

    def __len__(self) -> int:
        return self.data.tokens.size

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "chat", "seed": self.seed, "step": self.step, "shard": 0, "pos": 0, "rows": len(self.data)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("rows", len(self.data)) != len(self.data):
            raise GptkitError(f"the data changed since the checkpoint ({st['rows']} rows then, {len(self.data)} now)",
                              "loader", "resume with the data the run was started on")
        self.step = int(st["step"])

    def next_batch(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1, self.step * self.world + self.rank])
        x, y = self.data.batch(rng.integers(0, len(self.data), size=self.B), self.T)
        self.step += 1
        return x.to(device), y.to(device)


def make_loaders(cfg, data_dir: str | Path, meta: dict, vocab_size: int, dist):
    """The trainer's train and val loaders for a prepared data directory: chat rows (ChatLoader) for
    chat data, else token windows (data.TokenLoader)."""
    cls = ChatLoader if is_chat_data(meta) else TokenLoader
    kw = {} if cls is ChatLoader else {"mode": cfg.loader}  # sequential: llm.c's batch order (val too)
    train = cls(data_dir, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed, rank=dist.rank,
                world_size=dist.world_size, vocab_size=vocab_size, **kw)
    val = cls(data_dir, "val", cfg.batch_size, cfg.block_size, seed=cfg.seed + 1, vocab_size=vocab_size, **kw)
    return train, val


def eval_batches(data_dir: str | Path, split: str, block_size: int, batch_size: int):
    """Every row of a chat split once, in order: (x, y) batches for the whole-split loss."""
    data = ChatRows(data_dir, split)
    T = min(block_size, data.row - 1)
    for i in range(0, len(data), batch_size):
        yield data.batch(range(i, min(i + batch_size, len(data))), T)

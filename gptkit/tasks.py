"""Multiple-choice evaluation tasks: HellaSwag as llm.c scores it, and any multiple-choice jsonl.

Scoring follows llm.c's dev/data/hellaswag.py (completion style, re-implemented here):
  - each choice is the context's tokens followed by the tokens of " " + choice;
  - the choices of one item form one padded batch (K, L) and go through the model together;
  - the loss is the cross-entropy of the choice's tokens only (the context is given, not scored);
  - `acc` picks the choice with the lowest summed loss, `acc_norm` the lowest mean loss per token.
A context too long for the model is cut from the left, keeping its last tokens, so that context +
the longest choice fit in the model's block_size; such items are counted (`truncated`).
With a Hugging Face tokenizer (Llama's SentencePiece-style ones make a token of a leading space),
context + " " + choice is encoded whole and split after the context's tokens, as
lm-evaluation-harness does; GPT-2's BPE and char models encode the two apart, as llm.c does.

Data layouts, one JSON object per line:
  - hellaswag: the official files' `ctx`, `endings` (4 strings) and `label` (an int);
  - mc: `context`, `choices` (2 or more strings) and `label` (an int index into choices).
The HellaSwag val file is found in this order: --data-file; $GPTKIT_DATA/hellaswag_val.jsonl; the
cache ($GPTKIT_CACHE, default ~/.cache/gptkit); a download from the official URL into the cache.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptkit.errors import GptkitError
from gptkit.loading import load_model
from gptkit import paths
from gptkit.prepare import download
from gptkit.runtime import autocast, pick_device, pick_dtype
from gptkit.tokenizer import tokenizer_for

HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# the fields of each task's jsonl: (context, choices, label)
TASK_FIELDS = {"hellaswag": ("ctx", "endings", "label"), "mc": ("context", "choices", "label")}
TASKS = tuple(TASK_FIELDS)


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the choices continue the context; `label` is the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    line: int = 0  # 1-based line in its file, for error messages


@dataclass
class TaskResult:
    task: str
    n: int  # items scored
    correct: int  # by summed loss
    correct_norm: int  # by mean loss per token
    truncated: int = 0  # items whose context was cut from the left to fit the model

    @property
    def acc(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.n, 1)

    def to_json(self) -> dict:
        """INTERFACES.md's `--json` object."""
        return {"task": self.task, "n": self.n, "acc": self.acc, "acc_norm": self.acc_norm}

    def summary(self) -> str:
        s = f"{self.task}: acc {self.acc:.4f}, acc_norm {self.acc_norm:.4f} over {self.n:,} items"
        if self.truncated:
            s += f" ({self.truncated:,} contexts cut from the left to fit the model)"
        return s


# ---------------------------------------------------------------------------------------------
# data


def read_items(path: str | Path, task: str = "hellaswag") -> list[Item]:
    """Every item of a task's jsonl file, checked line by line (blank lines are skipped)."""
    if task not in TASK_FIELDS:
        raise GptkitError(f"unknown task {task!r}", "--task", f"use one of: {', '.join(TASKS)}")
    ctx_key, choices_key, label_key = TASK_FIELDS[task]
    path = Path(path)
    if not path.is_file():
        raise GptkitError("file not found", path, "give an existing .jsonl file")
    fmt = (f"each line a JSON object with `{ctx_key}` (text), `{choices_key}` (a list of texts) "
           f"and `{label_key}` (an int)")
    items: list[Item] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GptkitError(f"not UTF-8 text (byte {e.start})", where, "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptkitError(f"not valid JSON: {e.msg} at column {e.colno}", where, fmt) from None
            if not isinstance(obj, dict):
                raise GptkitError(f"expected a JSON object, got {type(obj).__name__}", where, fmt)
            missing = [k for k in (ctx_key, choices_key, label_key) if k not in obj]
            if missing:
                hint = fmt
                if task == "hellaswag" and missing == [label_key]:
                    hint = "HellaSwag's test split has no labels: use the val split (hellaswag_val.jsonl)"
                elif task == "hellaswag" and "context" in obj:
                    hint = "this looks like the mc layout: use --task mc"
                elif task == "mc" and "ctx" in obj:
                    hint = "this looks like HellaSwag's layout: use --task hellaswag"
                raise GptkitError(f"no {', '.join(f'`{k}`' for k in missing)}", where, hint)
            ctx, choices, label = obj[ctx_key], obj[choices_key], obj[label_key]
            if not isinstance(ctx, str):
                raise GptkitError(f"`{ctx_key}` must be text, got {type(ctx).__name__}", where, fmt)
            if not ctx:
                raise GptkitError(f"`{ctx_key}` is empty", where, "a choice is scored as a continuation of the context")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) for c in choices)):
                raise GptkitError(f"`{choices_key}` must be a list of 2 or more texts", where, fmt)
            if isinstance(label, str) and label.strip().isdigit():  # some exports write "2"
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool):
                raise GptkitError(f"`{label_key}` must be an int, got {label!r}", where, fmt)
            if not 0 <= label < len(choices):
                raise GptkitError(f"`{label_key}` {label} is out of range for {len(choices)} {choices_key}", where,
                                  f"the label is the 0-based index of the right one: 0..{len(choices) - 1}")
            items.append(Item(ctx, tuple(choices), label, n))
    if not items:
        raise GptkitError("no items: the file is empty", path, fmt)
    return items


def hellaswag_path(data_file: str | Path | None = None) -> Path:
    """HellaSwag's val jsonl from the lookup order in the module docstring (may download it)."""
    if data_file:
        p = Path(data_file)
        if not p.is_file():
            raise GptkitError("file not found", p, "give an existing .jsonl file")
        return p
    in_data = paths.data_file(HELLASWAG_FILE)
    if in_data is not None:
        return in_data
    cached = paths.cache_dir() / HELLASWAG_FILE
    if cached.is_file():
        return cached
    return download(os.environ.get("GPTKIT_HELLASWAG_URL", HELLASWAG_URL), cached)


def task_items(task: str, data_file: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The items of `task` (`hellaswag` finds its file; `mc` needs `data_file`), the first `limit` of them."""
    if task not in TASK_FIELDS:
        raise GptkitError(f"unknown task {task!r}", "--task", f"use one of: {', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise GptkitError(f"must be > 0, got {limit}", "--limit", "give a positive number of items")
    if task == "mc" and not data_file:
        raise GptkitError("--task mc needs a data file", "--data-file",
                          "give a jsonl of {\"context\", \"choices\", \"label\"} objects")
    path = hellaswag_path(data_file) if task == "hellaswag" else Path(data_file)
    items = read_items(path, task)
    return items[:limit] if limit else items


# ---------------------------------------------------------------------------------------------
# scoring


def task_encoding(tok) -> tuple:
    """(encode, joint) for a tokenizer: special-token text stays plain text; `joint` for Hugging
    Face tokenizers (SentencePiece-style ones turn a leading " " into a token of its own)."""
    encode = getattr(tok, "encode_ordinary", None) or tok.encode
    return encode, getattr(tok, "kind", None) == "hf"


def split_choices(encode, context: str, choices, joint: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context ids, choice ids) per choice. llm.c's way (GPT-2, char): encode(context) and
    encode(" " + choice) separately. joint (lm-evaluation-harness's way): encode(context + " " +
    choice) whole and split it after as many ids as encode(context) has."""
    c = list(encode(context))
    if not joint:
        return [(c, list(encode(" " + ch))) for ch in choices]
    out = []
    for ch in choices:
        whole = list(encode(context + " " + ch))
        out.append((whole[:len(c)], whole[len(c):]))
    return out


def render(item: Item, encode, max_len: int, joint: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The item's choices as one padded batch: (tokens (K, L) int64, mask (K, L) bool, truncated).

    Row k is the context's tokens followed by the tokens of " " + choices[k] (split_choices),
    padded with 0; mask is True on the choice's tokens. If a row exceeds `max_len`, every row's
    context keeps only its last tokens, as many as fit beside the longest choice (at least one).
    """
    where = f"line {item.line}" if item.line else "item"
    try:
        rows = split_choices(encode, item.context, item.choices, joint)
    except GptkitError as e:
        raise GptkitError(e.what, where, e.hint) from None
    longest = max(len(e) for _, e in rows)
    if longest + 1 > max_len:
        raise GptkitError(f"a choice is {longest} tokens, more than the model's context of {max_len} can score "
                          "after one context token", where, "shorten the choices or use a model with a longer context")
    if any(not c for c, _ in rows):
        raise GptkitError("the context encodes to no tokens", where, "give a non-empty context")
    if any(not e for _, e in rows):
        raise GptkitError("a choice encodes to no tokens", where, "give non-empty choices")
    keep = max_len - longest
    truncated = any(len(c) + len(e) > max_len for c, e in rows)
    if truncated:
        rows = [(c[-keep:], e) for c, e in rows]
    L = max(len(c) + len(e) for c, e in rows)
    tokens = torch.zeros((len(rows), L), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for k, (c, e) in enumerate(rows):
        tokens[k, : len(c) + len(e)] = torch.tensor(c + e, dtype=torch.long)
        mask[k, len(c): len(c) + len(e)] = True
    return tokens, mask, truncated


def choice_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss (K,), mean loss (K,)) of each row's masked tokens, from logits (K, L, V).

    The logits at position t predict token t+1, so the masks and targets shift by one."""
    targets = tokens[:, 1:]  # (K, L-1)
    m = mask[:, 1:].float()
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    losses = losses.view_as(m) * m
    total = losses.sum(dim=1)
    return total, total / m.sum(dim=1).clamp(min=1)


@torch.no_grad()
def score_rendered(model, items: list[Item], batches: list, device, dtype=torch.float32, task: str = "mc",
                   progress: bool = False) -> TaskResult:
    """Score items already rendered (`render`) with `model`: idx (K, L) -> logits (K, L, V)."""
    was_training = model.training
    model.eval()
    res = TaskResult(task, 0, 0, 0)
    bar = tqdm(zip(items, batches), total=len(items), desc=task, disable=not progress, file=sys.stderr, leave=False,
               dynamic_ncols=True)
    for item, (tokens, mask, truncated) in bar:
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(device, dtype):
            logits = model(tokens)
        total, mean = choice_losses(logits, tokens, mask)
        res.n += 1
        res.correct += int(total.argmin()) == item.label
        res.correct_norm += int(mean.argmin()) == item.label
        res.truncated += truncated
        if progress:
            bar.set_postfix(acc_norm=f"{res.acc_norm:.4f}", refresh=False)
    model.train(was_training)
    return res


def score_items(model, encode, items: list[Item], device=None, dtype=torch.float32, task: str = "mc",
                progress: bool = False, joint: bool = False) -> TaskResult:
    """Score every item with `model` and `encode` (text -> ids). Every item is tokenized first,
    so a text that can't be scored fails before any forward pass."""
    device = device or next(model.parameters()).device
    batches = [render(item, encode, model.config.block_size, joint) for item in items]
    return score_rendered(model, items, batches, device, dtype, task, progress)


def run_task(model_path: str, task: str = "hellaswag", data_file: str | None = None, limit: int | None = None,
             device: str = "auto", dtype: str = "float32", vocab: str | None = None,
             progress: bool = True) -> TaskResult:
    """`gptkit eval --task`: load the model and its tokenizer, then score the task's items."""
    items = task_items(task, data_file, limit)  # bad data fails before the model loads
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    loaded = load_model(model_path)
    encode, joint = task_encoding(tokenizer_for(loaded, vocab))
    model = loaded.model.to(dev)
    return score_items(model, encode, items, dev, dt, task=task, progress=progress, joint=joint)


class TrainTasks:
    """The multiple-choice tasks a training run scores at every eval (`eval_tasks=hellaswag`).

    The items are read and tokenized once, when the run starts, so a bad file or a text the
    model's tokenizer can't encode stops the run before its first step. Calling it scores them all
    and returns the metrics.jsonl fields: `<task>_acc` and `<task>_acc_norm`."""

    def __init__(self, names: str, tokenizer, block_size: int, limit: int = 0, data_file: str | None = None):
        self.names = [n.strip() for n in names.split(",") if n.strip()]
        for n in self.names:
            if n not in TASK_FIELDS:
                raise GptkitError(f"unknown task {n!r}", "eval_tasks", f"use one of: {', '.join(TASKS)}")
        if data_file and len(self.names) != 1:
            raise GptkitError("eval_task_file goes with exactly one task", "eval_task_file",
                              "name one task in eval_tasks, or leave eval_task_file out")
        if limit < 0:
            raise GptkitError(f"must be >= 0 (0 = all items), got {limit}", "eval_task_limit", "give a count")
        encode, joint = task_encoding(tokenizer)
        self.rendered = {}
        for n in self.names:
            where = "eval_task_file" if data_file else "eval_tasks"
            try:
                items = task_items(n, data_file, limit or None)
            except GptkitError as e:
                raise GptkitError(e.what, e.where or where, e.hint) from None
            self.rendered[n] = (items, [render(it, encode, block_size, joint) for it in items])

    @classmethod
    def for_run(cls, cfg, tokenizer, block_size: int) -> "TrainTasks | None":
        """A training run's `eval_tasks` (a TrainConfig's keys), or None without them."""
        if not cfg.eval_tasks:
            return None
        if tokenizer is None:
            raise GptkitError("eval_tasks needs the model's tokenizer, and none was found", "eval_tasks",
                              "give the GPT-2 vocabulary ($GPTKIT_GPT2_VOCAB or $GPTKIT_DATA/gpt2.tiktoken)")
        return cls(cfg.eval_tasks, tokenizer, block_size, cfg.eval_task_limit, cfg.eval_task_file or None)

    def __call__(self, model, device, dtype=torch.float32) -> dict[str, float]:
        out = {}
        for n, (items, batches) in self.rendered.items():
            res = score_rendered(model, items, batches, device, dtype, n)
            out[f"{n}_acc"] = round(res.acc, 6)
            out[f"{n}_acc_norm"] = round(res.acc_norm, 6)
        return out

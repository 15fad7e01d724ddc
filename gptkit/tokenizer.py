"""Tokenizers behind one small interface: GPT-2 BPE (through tiktoken), char-level, and any
Hugging Face `tokenizer.json` (through the `tokenizers` library: Llama 2/3, byte-level BPEs, ...).

All three have `encode(text, add_special_tokens=False) -> list[int]`, `decode(ids) -> str`,
`token_bytes(i)` (GPT-2 and HF), `vocab_size`, `eot` (None for chars), `bos` (None unless the
tokenizer has one), `stop_ids` (the ids that end a generation), `chat_template` (a
gptkit.chat_template.ChatTemplate or None) and `kind` ("gpt2" | "char" | "hf").
`save_tokenizer(tok, dir)` / `load_tokenizer(path)` write and read any of them as Hugging Face
files (tokenizer.json + tokenizer_config.json, plus vocab.json + merges.txt for GPT-2), which is
also what `convert --to hf` exports and what a run carries.

Where a model's tokenizer comes from (INTERFACES.md, `tokenizer_for`): `--vocab`; a char model's
own vocabulary; the tokenizer a GGUF file carries in its metadata; the model directory's own tokenizer.json (+ tokenizer_config.json, chat template
from chat_template.jinja or tokenizer_config.json); for a 50257-token model, GPT-2's BPE. The
GPT-2 vocabulary is found in the order INTERFACES.md gives:
  --vocab FILE_OR_DIR; $GPTKIT_GPT2_VOCAB; $GPTKIT_DATA/gpt2.tiktoken; BPE files inside the model
  directory; tiktoken's own cache or download.
Accepted formats: tiktoken's `.tiktoken`, OpenAI's `encoder.json` + `vocab.bpe`, and Hugging Face's
`vocab.json` + `merges.txt` (the same two files under other names) or `tokenizer.json`.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Iterable

import tiktoken

from gptkit.chat_template import ChatTemplate, load_chat_template, special_tokens_of, template_from_dir
from gptkit.config import GPT2_EOT, GPT2_VOCAB_SIZE
from gptkit.errors import GptkitError, make_dir
from gptkit.hf_tokenizer import (EOT_TEXT, HFTokenizer, bytes_to_unicode, char_hf_files, generation_eos,  # noqa: F401
                                 gpt2_hf_files, hf_document_ids, read_json, read_tokenizer_config, write_text)
from gptkit.formats.llmc import read_tokenizer
from gptkit.paths import data_file

# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """Character-level tokenizer: id i is chars[i]."""

    kind = "char"
    eot = None
    bos = None
    chat_template = None

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars):
            raise GptkitError("char vocabulary has duplicate characters", "chars", "each character may appear once")

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def stop_ids(self) -> list[int]:
        return []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise GptkitError(f"character {e.args[0]!r} is not in the model's vocabulary", "prompt",
                              f"use only these characters: {''.join(self.chars)!r}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))

    def token_to_id(self, text: str) -> int | None:
        return self.stoi.get(text)


class BPETokenizer:
    """GPT-2 byte-level BPE through tiktoken. encode() treats special-token text as plain text."""

    kind = "gpt2"
    bos = None
    chat_template = None  # GPT-2 has none; `--chat-template FILE` may attach one

    def __init__(self, encoding):
        self.enc = encoding
        self.eot = GPT2_EOT

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def stop_ids(self) -> list[int]:
        return [self.eot]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [i for i in ids if not (skip_special_tokens and i == self.eot)]
        return self.enc.decode(ids)

    def token_to_id(self, text: str) -> int | None:
        if text == EOT_TEXT:
            return self.eot
        ids = self.enc.encode_ordinary(text)
        return ids[0] if len(ids) == 1 else None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self, i: int) -> bytes:
        return self.enc.decode_single_token_bytes(i)


def _encoding_from_ranks(ranks: dict[bytes, int], source: str):
    if len(ranks) != GPT2_EOT or sorted(ranks.values()) != list(range(GPT2_EOT)):
        raise GptkitError(f"vocabulary has {len(ranks)} tokens, GPT-2's has ranks 0..{GPT2_EOT - 1} plus {EOT_TEXT}",
                          source, "point --vocab at GPT-2's vocabulary")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def ranks_from_encoder_merges(encoder: dict[str, int], merges: list, source: str) -> dict[bytes, int]:
    """BPE ranks from an id table and a merge list in GPT-2's byte-to-unicode alphabet.

    The ranks are the merge order (256 single bytes in the alphabet's order, then one token per
    merge), which is what tiktoken needs; the id table must agree with it, as GPT-2's does.
    """
    dec = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        try:
            return bytes(dec[c] for c in s)
        except KeyError as e:
            raise GptkitError(f"character {e.args[0]!r} is outside GPT-2's byte alphabet", source,
                              "is this a byte-level BPE (GPT-2) vocabulary?") from None

    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else m  # "a b", or ["a", "b"] in newer tokenizer.json
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise GptkitError(f"bad merge line {m!r}", source, "expected two tokens separated by one space")
        tok = to_bytes(pair[0]) + to_bytes(pair[1])
        if tok in ranks:
            raise GptkitError(f"merge {m!r} repeats token {tok!r}", source, "the merges file is damaged")
        ranks[tok] = len(ranks)
    ids = {to_bytes(k): v for k, v in encoder.items() if k not in (EOT_TEXT, "<|startoftext|>")}
    if ids != ranks:
        bad = next((k for k in ranks if ids.get(k) != ranks[k]), None) or next(k for k in ids if k not in ranks)
        raise GptkitError(f"the id table and the merges disagree (token {bad!r}: id {ids.get(bad)}, "
                          f"merge rank {ranks.get(bad)})", source, "the two files must come from the same vocabulary")
    if encoder.get(EOT_TEXT, GPT2_EOT) != GPT2_EOT:
        raise GptkitError(f"{EOT_TEXT} has id {encoder[EOT_TEXT]}, GPT-2's is {GPT2_EOT}", source,
                          "the vocabulary is not GPT-2's")
    return ranks


def _read_merges(path: Path) -> list[str]:
    """vocab.bpe / merges.txt: an optional `#version` line, then one `a b` merge per line."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [ln.rstrip("\r") for ln in lines if ln.rstrip("\r") and not ln.startswith("#version")]


def _ranks_from_pair(enc: Path, bpe: Path) -> dict[bytes, int]:
    encoder = read_json(enc)
    if not isinstance(encoder, dict):
        raise GptkitError("expected a JSON object of token -> id", enc, "give GPT-2's encoder.json")
    return ranks_from_encoder_merges(encoder, _read_merges(bpe), f"{enc} + {bpe.name}")


def _ranks_from_tokenizer_json(path: Path) -> dict[bytes, int]:
    """HF tokenizer.json: model.vocab + model.merges in GPT-2's byte-to-unicode alphabet."""
    doc = read_json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab, merges = (model.get("vocab"), model.get("merges")) if isinstance(model, dict) else (None, None)
    if (not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict)
            or not isinstance(merges, list)):
        raise GptkitError("tokenizer.json has no BPE model.vocab/model.merges", path,
                          "expected a GPT-2 (byte-level BPE) tokenizer.json")
    return ranks_from_encoder_merges(vocab, merges, str(path))


def _ranks_from_tiktoken(path: Path) -> dict[bytes, int]:
    """tiktoken's format: `base64(token bytes) rank` per line. Read here rather than through
    tiktoken.load, which caches local files under their path and would serve a stale copy."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise GptkitError(f"line {n} is not `base64 rank`", path, "is this a .tiktoken file?") from None
    return ranks


def load_bpe_vocab(path: str | Path) -> BPETokenizer:
    """A GPT-2 tokenizer from a vocabulary file or a directory holding one (any accepted format)."""
    path = Path(path)
    if not path.exists():
        raise GptkitError("vocabulary not found", path, "give a .tiktoken file or a directory with BPE files")
    try:
        if path.is_dir():
            pairs = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
            for enc, bpe in pairs:
                if (path / enc).is_file() and (path / bpe).is_file():
                    return BPETokenizer(_encoding_from_ranks(_ranks_from_pair(path / enc, path / bpe), str(path)))
            if (path / "tokenizer.json").is_file():
                return BPETokenizer(_encoding_from_ranks(_ranks_from_tokenizer_json(path / "tokenizer.json"), str(path)))
            tk = sorted(path.glob("*.tiktoken"))
            if tk:
                return load_bpe_vocab(tk[0])
            raise GptkitError("no GPT-2 vocabulary in directory", path,
                              "expected gpt2.tiktoken, encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json")
        if path.name == "tokenizer.json":
            return BPETokenizer(_encoding_from_ranks(_ranks_from_tokenizer_json(path), str(path)))
        if path.suffix in (".json", ".bpe") or path.name == "merges.txt":  # one of a pair: look beside it
            return load_bpe_vocab(path.parent)
        return BPETokenizer(_encoding_from_ranks(_ranks_from_tiktoken(path), str(path)))
    except GptkitError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise GptkitError(f"cannot read vocabulary: {e}", path, "is this GPT-2's vocabulary file?") from None


def has_bpe_files(d: Path) -> bool:
    return d.is_dir() and ((d / "encoder.json").is_file() and (d / "vocab.bpe").is_file()
                           or (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
                           or (d / "tokenizer.json").is_file() or (d / RUN_VOCAB).is_file())


RUN_VOCAB = "gpt2.tiktoken"  # the GPT-2 vocabulary a run trained with, in tiktoken's format, in its run directory


def save_gpt2_vocab(tok: BPETokenizer, directory: str | Path) -> Path:
    """Write `tok`'s ranks as DIRECTORY/gpt2.tiktoken (base64 token, rank; tiktoken's own format),
    atomically, so the run samples offline with the vocabulary it was trained with."""
    path = Path(directory) / RUN_VOCAB
    tmp = path.with_name(path.name + ".tmp")
    lines = (f"{base64.b64encode(tok.token_bytes(i)).decode()} {i}\n" for i in range(GPT2_EOT))
    tmp.write_text("".join(lines), encoding="ascii")
    tmp.replace(path)
    return path


def gpt2_tokenizer(vocab: str | Path | None = None, model_dir: str | Path | None = None) -> BPETokenizer:
    """Find GPT-2's vocabulary in INTERFACES.md's order and build the tokenizer."""
    if vocab:
        return load_bpe_vocab(vocab)
    if os.environ.get("GPTKIT_GPT2_VOCAB"):
        return load_bpe_vocab(os.environ["GPTKIT_GPT2_VOCAB"])
    in_data = data_file("gpt2.tiktoken")
    if in_data is not None:
        return load_bpe_vocab(in_data)
    for d in _model_dirs(model_dir):
        if has_bpe_files(d):
            return load_bpe_vocab(d)
    if model_dir is not None and (Path(model_dir) / "tokenizer.bin").is_file():  # beside an llm.c model.bin
        return llmc_bpe_tokenizer(Path(model_dir) / "tokenizer.bin")
    try:
        return BPETokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:
        raise GptkitError(f"GPT-2 vocabulary not available ({type(e).__name__})", "--vocab",
                          "pass --vocab gpt2.tiktoken (or encoder.json+vocab.bpe's directory), "
                          "or set GPTKIT_GPT2_VOCAB or GPTKIT_DATA") from None


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (the class lives in hf_tokenizer.py)

def _recognise(hf: HFTokenizer):
    """The char and GPT-2 tokenizers gptkit itself exports come back as their own classes, so they
    keep their exact behaviour (GPT-2 through tiktoken; chars with their error messages)."""
    model = hf.spec.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        return hf
    if (merges == [] and (hf.spec.get("decoder") or {}).get("type") == "Fuse" and not hf.tk.get_added_tokens_decoder()
            and all(len(k) == 1 for k in vocab) and sorted(vocab.values()) == list(range(len(vocab)))):
        return CharTokenizer(sorted(vocab, key=vocab.get))
    if hf.vocab_size == GPT2_VOCAB_SIZE and hf.token_to_id(EOT_TEXT) == GPT2_EOT and hf.chat_template is None:
        try:
            return BPETokenizer(_encoding_from_ranks(ranks_from_encoder_merges(vocab, merges, hf.source), hf.source))
        except GptkitError:
            return hf
    return hf


def load_hf_tokenizer(path: str | Path, recognise: bool = True):
    """A tokenizer from a tokenizer.json file or a directory holding one, with the directory's
    tokenizer_config.json (special tokens, add_bos_token), chat template (chat_template.jinja,
    else tokenizer_config.json's chat_template) and generation_config.json's eos ids."""
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        raise GptkitError("no tokenizer.json", path, "give a tokenizer.json or a directory holding one")
    d = f.parent
    cfg = read_tokenizer_config(d)
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptkitError(f"cannot read tokenizer.json: {e}", f, "the file is damaged") from None
    tok = HFTokenizer(text, cfg, str(f), generation_eos=generation_eos(d))
    tok.chat_template = template_from_dir(d, tok)
    return _recognise(tok) if recognise else tok


def load_vocab(vocab: str | Path):
    """`--vocab FILE_OR_DIR`: a tokenizer.json (or a directory holding one) is read with
    `tokenizers`, GPT-2's own coming back as the GPT-2 BPE; GPT-2's other files give the GPT-2 BPE."""
    p = Path(vocab)
    if p.name == "tokenizer.json" or (p.is_dir() and (p / "tokenizer.json").is_file()):
        return load_hf_tokenizer(p)
    return load_bpe_vocab(p)


def _own_tokenizer_dirs(loaded) -> list[Path]:
    """Directories that may hold the model's own tokenizer files: the model's directory, and for a
    gptkit checkpoint also its run directory."""
    dirs = []
    if loaded.tokenizer_dir is not None:
        dirs.append(Path(loaded.tokenizer_dir))
        if loaded.kind == "gptkit":
            dirs.append(Path(loaded.tokenizer_dir).parent)
    return [d for d in dirs if d.is_dir()]


def tokenizer_for(loaded, vocab: str | Path | None = None, chat_template: str | Path | None = None):
    """The tokenizer of a loaded model (gptkit.loading.Loaded), in INTERFACES.md's order: `--vocab`;
    a char model's own vocabulary; a GGUF file's own; a tokenizer.json in the model's (or run's) directory; for a
    50257-token model, GPT-2's BPE. A tokenizer with more ids than the model's embedding is an
    error. `chat_template`: a template file that replaces the model's own (see chat_template.py)."""
    vs = loaded.model.config.vocab_size
    where = str(loaded.source or "--model")
    tok = None
    if vocab:
        tok = load_vocab(vocab)
        where = str(vocab)
    elif loaded.chars:
        tok = CharTokenizer(loaded.chars)
    elif loaded.tokenizer_spec is not None:
        tok = carried_tokenizer(loaded)
    else:
        own = next((d for d in _own_tokenizer_dirs(loaded) if (d / "tokenizer.json").is_file()), None)
        if own is not None:
            tok = load_hf_tokenizer(own)
            where = str(own / "tokenizer.json")
        elif vs == GPT2_VOCAB_SIZE:
            tok = gpt2_tokenizer(None, loaded.tokenizer_dir)
        else:
            raise GptkitError(f"model has vocab_size {vs} and no tokenizer of its own", where,
                              "give --vocab TOKENIZER.json, or put the model's tokenizer.json beside it")
    check_vocab_fits(tok, vs, where)
    if chat_template:
        tok.chat_template = load_chat_template(chat_template, tok)
    elif getattr(tok, "chat_template", None) is None:
        tok.chat_template = carried_chat_template(loaded, tok)
    return tok


def carried_chat_template(loaded, tok):
    """The chat template of a model whose tokenizer brings none (GPT-2's BPE, chars): the one a
    chat-tuned run carries in its state.json (gptkit/sft.py), else a chat_template.jinja (or
    tokenizer_config.json's) in the model's or run's directory; None if neither."""
    if (loaded.state or {}).get("chat_template"):
        return ChatTemplate(loaded.state["chat_template"], special_tokens_of(tok), f"{loaded.source}/state.json")
    for d in _own_tokenizer_dirs(loaded):
        t = template_from_dir(d, tok)
        if t is not None:
            return t
    return None


def carried_tokenizer(loaded) -> HFTokenizer:
    """The tokenizer a model file carries in itself (a GGUF file's metadata, rebuilt as a
    tokenizer.json by formats/gguf.read_tokenizer), with its chat template."""
    spec = loaded.tokenizer_spec
    if "error" in spec:
        raise spec["error"]
    tok = HFTokenizer(spec["json"], spec["config"], str(loaded.source))
    if spec.get("chat_template"):
        tok.chat_template = ChatTemplate(spec["chat_template"], special_tokens_of(tok),
                                         f"{loaded.source} (tokenizer.chat_template)")
    return tok


def token_byte_lengths(tok, n: int | None = None) -> list[int]:
    """UTF-8 bytes each id stands for (id i -> entry i, for ids < n, default the tokenizer's size):
    the byte count of a token stream is the sum over its ids, for bits per byte across tokenizers.
    Special tokens count 0 bytes (they are not text of the corpus)."""
    n = tok.vocab_size if n is None else n
    if isinstance(tok, CharTokenizer):
        return [len(c.encode("utf-8")) for c in tok.chars] + [0] * max(n - len(tok.chars), 0)
    special = set(getattr(tok, "_added", ())) | {EOT_TEXT}
    out = []
    for i in range(n):
        try:
            b = tok.token_bytes(i)
        except Exception:  # ids past the vocabulary (a padded embedding)
            b = b""
        out.append(0 if b.decode("utf-8", "replace") in special else len(b))
    return out


def check_vocab_fits(tok, model_vocab_size: int, where: str) -> None:
    if tok.vocab_size > model_vocab_size:
        raise GptkitError(f"the tokenizer has {tok.vocab_size:,} tokens, more than the model's embedding of "
                          f"{model_vocab_size:,}", where, "use the tokenizer the model was trained with")


def load_tokenizer(path: str | Path, vocab: str | Path | None = None):
    """The Python API's `gptkit.load_tokenizer(path)`: a tokenizer.json (or a directory with one),
    a GPT-2 vocabulary file (.tiktoken, encoder.json, vocab.json), or anything `--model` accepts
    (a run, checkpoint, HF directory, llm.c .bin, pretrained name), whose tokenizer it returns.
    The result has encode(text) and decode(ids)."""
    p = Path(path)
    if p.is_file() and p.name == "tokenizer.json":
        return load_hf_tokenizer(p)
    if p.is_file() and (p.suffix in (".tiktoken", ".bpe") or p.name in ("encoder.json", "vocab.json", "merges.txt")):
        return load_bpe_vocab(p)
    if p.is_dir() and not (p / "config.json").is_file() and not any(p.glob("ckpt_*")) \
            and not (p / "state.json").is_file() and not (p / "model.bin").is_file():
        if (p / "tokenizer.json").is_file():
            return load_hf_tokenizer(p)
        if has_bpe_files(p) or list(p.glob("*.tiktoken")):
            return load_bpe_vocab(p)
    from gptkit.loading import load_model  # the documented lazy edge, as GPT.from_pretrained's

    return tokenizer_for(load_model(path), vocab)


def tokenizer_from_data(data_dir: str | Path):
    """The tokenizer a prepared data directory was made with, when meta.json says it is a
    tokenizer.json (`prepare --vocab tokenizer.json` copies it there), else None."""
    d = Path(data_dir)
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("tokenizer") == "hf" and (d / "tokenizer.json").is_file():
        return load_hf_tokenizer(d)
    return None


def carry_tokenizer(data_dir: str | Path, run_dir: str | Path, max_length: int | None = None):
    """Train's hook: when the data was prepared with a tokenizer.json, save it into the run
    directory (tokenizer_for finds it there for every checkpoint). Returns it, or None."""
    tok = tokenizer_from_data(data_dir)
    if tok is not None:
        save_tokenizer(tok, run_dir, max_length)
    return tok


# ---------------------------------------------------------------------------------------------
# Writing tokenizers as Hugging Face files (convert --to hf, runs that carry their tokenizer)

def save_tokenizer(tok, directory: str | Path, max_length: int | None = None) -> list[Path]:
    """Write `tok` as Hugging Face tokenizer files into `directory` (created if needed), so that
    `load_tokenizer(directory)` gives it back and transformers' AutoTokenizer loads it:
    - GPT-2 BPE: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt;
    - char: tokenizer.json mapping each character + tokenizer_config.json;
    - HF tokenizer.json: its own tokenizer.json + tokenizer_config.json (+ chat_template.jinja).
    Returns the files written. `max_length`: the model's context, for model_max_length."""
    d = make_dir(directory, "tokenizer directory")
    files = []
    if isinstance(tok, BPETokenizer):
        tj, cfg, vocab, merges = gpt2_hf_files({tok.token_bytes(i): i for i in range(GPT2_EOT)}, max_length)
        files.append(write_text(d / "vocab.json", json.dumps(vocab, ensure_ascii=False)))
        files.append(write_text(d / "merges.txt", "\n".join(merges) + "\n"))
    elif isinstance(tok, CharTokenizer):
        tj, cfg = char_hf_files(tok.chars, max_length)
    elif isinstance(tok, HFTokenizer):
        tj, cfg = tok.json_text, dict(tok.config)
        if max_length and "model_max_length" not in cfg:
            cfg["model_max_length"] = max_length
    else:
        raise GptkitError(f"cannot save a {type(tok).__name__}", str(directory), "expected a gptkit tokenizer")
    ct = getattr(tok, "chat_template", None)
    if ct is not None:
        cfg.pop("chat_template", None)  # transformers 5 keeps it in chat_template.jinja
        files.append(write_text(d / "chat_template.jinja", ct.source))
    else:
        (d / "chat_template.jinja").unlink(missing_ok=True)
    files.append(write_text(d / "tokenizer.json", tj))
    files.append(write_text(d / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"))
    return files


def _model_dirs(model_dir: str | Path | None) -> list[Path]:
    """Where a model's own vocabulary may be: its directory, and a checkpoint's run directory."""
    if model_dir is None:
        return []
    d = Path(model_dir)
    return [d, d.parent] if d.name.startswith("ckpt_") else [d]


def llmc_bpe_tokenizer(path: Path) -> BPETokenizer:
    """GPT-2's BPE from llm.c's tokenizer.bin: its token i is the bytes of GPT-2's rank i (ids and
    ranks coincide in GPT-2), and id 50256 is <|endoftext|>."""
    tok = read_tokenizer(path)
    if len(tok.tokens) != GPT2_VOCAB_SIZE:
        raise GptkitError(f"tokenizer.bin has {len(tok.tokens)} tokens, GPT-2's has {GPT2_VOCAB_SIZE}", path,
                          "pass --vocab with the model's vocabulary")
    return BPETokenizer(_encoding_from_ranks({b: i for i, b in enumerate(tok.tokens[:GPT2_EOT])}, str(path)))

"""Tokenizers behind one small interface: GPT-2 BPE (through tiktoken) and char-level.

Both have `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot` (None for chars)
and `kind`. The GPT-2 vocabulary is found in the order INTERFACES.md gives:
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

from gptkit.config import GPT2_EOT, GPT2_VOCAB_SIZE
from gptkit.errors import GptkitError
from gptkit.paths import data_file

EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """Character-level tokenizer: id i is chars[i]."""

    kind = "char"
    eot = None

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

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise GptkitError(f"character {e.args[0]!r} is not in the model's vocabulary", "prompt",
                              f"use only these characters: {''.join(self.chars)!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))


class BPETokenizer:
    """GPT-2 byte-level BPE through tiktoken. encode() treats special-token text as plain text."""

    kind = "gpt2"

    def __init__(self, encoding):
        self.enc = encoding
        self.eot = GPT2_EOT

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self, i: int) -> bytes:
        return self.enc.decode_single_token_bytes(i)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (OpenAI's encoder.py): the printable
    Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256), chr(257), ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


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
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"not valid JSON: {e}", path, "the file is damaged; fetch it again") from None


def _ranks_from_pair(enc: Path, bpe: Path) -> dict[bytes, int]:
    encoder = _read_json(enc)
    if not isinstance(encoder, dict):
        raise GptkitError("expected a JSON object of token -> id", enc, "give GPT-2's encoder.json")
    return ranks_from_encoder_merges(encoder, _read_merges(bpe), f"{enc} + {bpe.name}")


def _ranks_from_tokenizer_json(path: Path) -> dict[bytes, int]:
    """HF tokenizer.json: model.vocab + model.merges in GPT-2's byte-to-unicode alphabet."""
    model = _read_json(path).get("model", {})
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
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
                           or (d / "tokenizer.json").is_file())


def gpt2_tokenizer(vocab: str | Path | None = None, model_dir: str | Path | None = None) -> BPETokenizer:
    """Find GPT-2's vocabulary in INTERFACES.md's order and build the tokenizer."""
    if vocab:
        return load_bpe_vocab(vocab)
    if os.environ.get("GPTKIT_GPT2_VOCAB"):
        return load_bpe_vocab(os.environ["GPTKIT_GPT2_VOCAB"])
    in_data = data_file("gpt2.tiktoken")
    if in_data is not None:
        return load_bpe_vocab(in_data)
    if model_dir is not None and has_bpe_files(Path(model_dir)):
        return load_bpe_vocab(model_dir)
    try:
        return BPETokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:
        raise GptkitError(f"GPT-2 vocabulary not available ({type(e).__name__})", "--vocab",
                          "pass --vocab gpt2.tiktoken (or encoder.json+vocab.bpe's directory), "
                          "or set GPTKIT_GPT2_VOCAB or GPTKIT_DATA") from None


def tokenizer_for(loaded, vocab: str | Path | None = None):
    """The tokenizer of a loaded model (gptkit.loading.Loaded): its char vocab, else GPT-2 BPE."""
    if loaded.chars:
        return CharTokenizer(loaded.chars)
    if loaded.model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise GptkitError(f"model has vocab_size {loaded.model.config.vocab_size} and no tokenizer of its own",
                          str(loaded.source or "--model"), "only GPT-2's 50257-token BPE or char models can be decoded")
    return gpt2_tokenizer(vocab, loaded.tokenizer_dir)

"""`gptkit prepare`: text -> token shards (llm.c layout) + meta.json.

Presets:
- `shakespeare-char`: nanoGPT's char-level split: the 65 distinct characters, the first 90% of
  the characters for train, the last 10% (111,540) for val.
- `shakespeare`: llm.c's dev/data/tinyshakespeare.py: split on blank lines, <|endoftext|> before
  every section, "\\n\\n" put back on all but the last; the first 32,768 tokens are val.
A text file or a folder of .txt files: each file is one document; with GPT-2 tokens every document
is preceded by <|endoftext|>; the val split is the last `val_fraction` of the tokens.

Preset text is found in this order: --input FILE; $GPTKIT_DATA/tinyshakespeare.txt; the cache
($GPTKIT_CACHE, default ~/.cache/gptkit); a download from the canonical URL into the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from gptkit.data import write_shard
from gptkit.errors import GptkitError

PRESETS = ("shakespeare-char", "shakespeare")
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
LLMC_SHAKESPEARE_VAL_TOKENS = 32768
DEFAULT_SHARD_SIZE = 100_000_000


def cache_dir() -> Path:
    return Path(os.environ.get("GPTKIT_CACHE") or Path.home() / ".cache" / "gptkit")


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` atomically (a partial download never appears under dest's name)."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", leave=False) as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError, timeouts are OSErrors
        Path(tmp).unlink(missing_ok=True)
        raise GptkitError(f"download failed: {e}", url,
                          f"no network? put the file at {dest} or pass --input FILE / set GPTKIT_DATA") from None
    return dest


def shakespeare_text_path(input: str | Path | None = None) -> Path:
    """tiny Shakespeare from the lookup order in the module docstring."""
    if input:
        p = Path(input)
        if not p.is_file():
            raise GptkitError("input file not found", p, "give an existing text file")
        return p
    data = os.environ.get("GPTKIT_DATA")
    if data and (Path(data) / SHAKESPEARE_FILE).is_file():
        return Path(data) / SHAKESPEARE_FILE
    cached = cache_dir() / SHAKESPEARE_FILE
    if cached.is_file():
        return cached
    return download(os.environ.get("GPTKIT_SHAKESPEARE_URL", SHAKESPEARE_URL), cached)


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GptkitError(f"cannot read: {e.strerror}", path) from None
    if b"\x00" in raw[:8192]:
        raise GptkitError("file looks binary (NUL bytes)", path, "give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptkitError(f"not valid UTF-8 (byte {e.start})", path, "convert the file to UTF-8") from None
    return text


def text_documents(path: Path) -> list[Path]:
    """A text file, or the .txt files of a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise GptkitError("folder holds no .txt files", path, "give a text file or a folder of .txt files")
        return files
    if not path.is_file():
        raise GptkitError("no such file or directory", path, "give a text file, a folder of .txt files or a preset")
    return [path]


def write_split(out: Path, split: str, tokens: np.ndarray, shard_size: int) -> list[Path]:
    """Write a split as one file, or numbered shards when it is larger than shard_size."""
    for old in list(out.glob(f"{split}.bin")) + list(out.glob(f"{split}_*.bin")):
        old.unlink()
    if len(tokens) <= shard_size:
        write_shard(out / f"{split}.bin", tokens)
        return [out / f"{split}.bin"]
    paths = []
    for i, s in enumerate(range(0, len(tokens), shard_size)):
        p = out / f"{split}_{i:06d}.bin"
        write_shard(p, tokens[s:s + shard_size])
        paths.append(p)
    return paths


def prepare(source: str, tokenizer: str | None = None, input: str | Path | None = None, out: str | Path | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.1, vocab: str | Path | None = None) -> Path:
    """Tokenize a preset or a text file/folder into OUT/{train,val}.bin + meta.json. Returns OUT."""
    from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer

    if shard_size <= 0:
        raise GptkitError(f"shard size must be positive, got {shard_size}", "--shard-size")
    if not 0.0 < val_fraction < 1.0:
        raise GptkitError(f"val fraction must be in (0, 1), got {val_fraction}", "--val-fraction")
    if source in PRESETS:
        kind = tokenizer or ("char" if source == "shakespeare-char" else "gpt2")
        src_path = shakespeare_text_path(input)
        docs = [src_path]
    else:
        kind = tokenizer or "gpt2"
        src_path = Path(source)
        docs = text_documents(src_path)
    if kind not in ("char", "gpt2"):
        raise GptkitError(f"unknown tokenizer {kind!r}", "--tokenizer", "use char or gpt2")
    out = Path(out) if out else Path("data") / (source if source in PRESETS else src_path.stem)
    out.mkdir(parents=True, exist_ok=True)

    texts = [read_text(p) for p in docs]
    if not any(texts):
        raise GptkitError("the text is empty", src_path, "give a file with some text in it")
    meta: dict = {"tokenizer": kind, "source": str(src_path), "documents": len(texts)}
    if kind == "char":
        tok = CharTokenizer.from_text("".join(texts))
        ids = np.array([i for t in texts for i in tok.encode(t)], dtype=np.uint16)
        meta.update(vocab_size=tok.vocab_size, chars=tok.chars)
    else:
        tok = gpt2_tokenizer(vocab)
        if source == "shakespeare":
            sections = texts[0].split("\n\n")
            parts = [s + "\n\n" if i < len(sections) - 1 else s for i, s in enumerate(sections)]
        else:
            parts = texts
        ids_list = []
        for enc in tok.encode_batch(parts):
            ids_list.append(tok.eot)
            ids_list.extend(enc)
        ids = np.array(ids_list, dtype=np.uint16)
        meta.update(vocab_size=tok.vocab_size, eot=tok.eot)
    if source == "shakespeare" and kind == "gpt2":
        n_val = LLMC_SHAKESPEARE_VAL_TOKENS
        val, train = ids[:n_val], ids[n_val:]  # llm.c: the first 32,768 tokens are val
    else:
        n_train = int(len(ids) * (1.0 - val_fraction))
        train, val = ids[:n_train], ids[n_train:]
    if len(train) < 2 or len(val) < 2:
        raise GptkitError(f"text too short: {len(ids)} tokens", src_path, "give more text")
    meta.update(train_tokens=int(len(train)), val_tokens=int(len(val)))
    write_split(out, "train", train, shard_size)
    write_split(out, "val", val, shard_size)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "meta.json")
    return out


def default_dataset_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def ensure_prepared(name: str, input: str | Path | None = None) -> Path:
    """The prepared directory of a preset dataset in the cache, preparing it on first use."""
    d = default_dataset_dir(name)
    if (d / "meta.json").is_file() and ((d / "train.bin").is_file() or (d / "train_000000.bin").is_file()):
        return d
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=d.parent if d.parent.exists() else _mk(d.parent)))
    try:
        prepare(name, input=input, out=tmp)
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

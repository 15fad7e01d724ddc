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

import codecs
import json
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptkit.data import ShardWriter, shard_dtype
from gptkit.errors import GptkitError, make_dir
from gptkit.paths import cache_dir, data_file
from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer, hf_document_ids, load_vocab, save_tokenizer

PRESETS = ("shakespeare-char", "shakespeare")
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
LLMC_SHAKESPEARE_VAL_TOKENS = 32768
DEFAULT_SHARD_SIZE = 100_000_000


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` atomically (a partial download never appears under dest's name)."""
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
                          f"no network? put the file at {dest}, set GPTKIT_DATA to its folder, or run "
                          "`gptkit prepare PRESET --input FILE`") from None
    return dest


def shakespeare_text_path(input: str | Path | None = None) -> Path:
    """tiny Shakespeare from the lookup order in the module docstring."""
    if input:
        p = Path(input)
        if not p.is_file():
            raise GptkitError("input file not found", p, "give an existing text file")
        return p
    in_data = data_file(SHAKESPEARE_FILE)
    if in_data is not None:
        return in_data
    cached = cache_dir() / SHAKESPEARE_FILE
    if cached.is_file():
        return cached
    return download(os.environ.get("GPTKIT_SHAKESPEARE_URL", SHAKESPEARE_URL), cached)


CHUNK_BYTES = 1 << 20  # text is read, decoded and tokenized this many bytes at a time
COPY_TOKENS = 1 << 20  # tokens copied per step from the spool into the shards
# A split point that GPT-2's pre-tokenisation regex would also split at: before one space or
# newline that has an ASCII letter/digit on both sides ("abc| def", "abc|\ndef"). Encoding the
# two sides separately then gives exactly the tokens of the whole.
_SAFE_SPLIT = re.compile(r"(?<=[A-Za-z0-9])(?=[ \n][A-Za-z0-9])")


def _check_raw(raw: bytes, path: Path, offset: int) -> None:
    nul = raw.find(0)
    if nul >= 0:
        raise GptkitError(f"file looks binary (NUL byte at {offset + nul})", path,
                          "give a UTF-8 text file")


def read_text(path: Path) -> str:
    """A whole (small) text file, checked like the streamed ones."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GptkitError(f"cannot read: {e.strerror}", path, "check the path and its permissions") from None
    _check_raw(raw, path, 0)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptkitError(f"not valid UTF-8 (byte {e.start})", path, "convert the file to UTF-8") from None


def iter_text(path: Path, chunk_bytes: int = CHUNK_BYTES, progress=None):
    """A UTF-8 text file as str chunks of about chunk_bytes, decoded incrementally (strict)."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_bytes)
                final = not raw
                _check_raw(raw, path, offset)
                pending = len(dec.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = dec.decode(raw, final=final)
                except UnicodeDecodeError as e:
                    pos = offset - pending + e.start
                    raise GptkitError(f"not valid UTF-8 (byte {pos})", path,
                                      "convert the file to UTF-8") from None
                if progress is not None:
                    progress.update(len(raw))
                offset += len(raw)
                if text:
                    yield text
                if final:
                    return
    except OSError as e:
        raise GptkitError(f"cannot read: {e.strerror}", path, "check the path and its permissions") from None


def bpe_pieces(chunks, min_chars: int = 1 << 16):
    """Re-cut a stream of text chunks at points where GPT-2's pre-tokeniser splits anyway, so that
    encoding the pieces one by one equals encoding the whole text. A text with no such point
    (no "x y" or "x\ny" with ASCII letters or digits around) accumulates into one piece."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        if len(buf) < min_chars:
            continue
        cut = None
        for m in _SAFE_SPLIT.finditer(buf, max(len(buf) - (1 << 16), 0)):
            cut = m.start()
        if cut is None:
            for m in _SAFE_SPLIT.finditer(buf):
                cut = m.start()
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def text_documents(path: Path) -> list[Path]:
    """A text file, or the .txt files of a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise GptkitError("folder holds no .txt files", path, "give a text file or a folder of .txt files")
        return files
    if not path.exists():
        raise GptkitError("no such file or directory", path,
                          f"give a text file, a folder of .txt files or a preset ({', '.join(PRESETS)})")
    if not path.is_file():
        raise GptkitError("not a regular file or folder", path, "give a text file or a folder of .txt files")
    return [path]


class _Spool:
    """All tokens of a corpus, appended to a raw file beside the output (bounded memory): uint16
    ids, or uint32 once `for_vocab` was told of a vocabulary over 65,536 tokens."""

    def __init__(self, out: Path):
        fd, name = tempfile.mkstemp(prefix=".tokens.", suffix=".ids", dir=out)
        self.path = Path(name)
        self.f = os.fdopen(fd, "w+b")
        self.n = 0
        self.dtype = shard_dtype(0)

    def for_vocab(self, vocab_size: int) -> None:
        """Before the first append: the ids of this vocabulary need uint32 if it has over 65,536."""
        assert self.n == 0
        self.dtype = shard_dtype(vocab_size)  # the shards' own width, so no id can wrap on the way

    def append(self, ids) -> None:
        a = np.asarray(ids)
        if a.size and int(a.max()) > np.iinfo(self.dtype).max:  # never wrap an id silently
            raise ValueError(f"token id {int(a.max())} does not fit the spool's {self.dtype}: call for_vocab first")
        a = a.astype(self.dtype, copy=False)
        self.f.write(a.tobytes())
        self.n += a.size

    def view(self, start: int = 0, stop: int | None = None) -> "_SpoolView":
        self.f.flush()
        return _SpoolView(self, start, self.n if stop is None else stop)

    def remove(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


class _SpoolView:
    """tokens[start:stop] of a spool, read on demand by plain file reads: unlike a memory map,
    the pages read do not stay in this process's resident set."""

    def __init__(self, spool: _Spool, start: int, stop: int):
        self.spool, self.start, self.stop = spool, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, sl: slice):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("only contiguous slices")
        lo, hi, _ = sl.indices(len(self))
        dt = self.spool.dtype
        if hi <= lo:
            return np.zeros(0, dtype=dt)
        f = self.spool.f
        f.seek(dt.itemsize * (self.start + lo))
        return np.frombuffer(f.read(dt.itemsize * (hi - lo)), dtype=dt)


def write_split(out: Path, split: str, tokens: np.ndarray, shard_size: int, vocab_size: int) -> list[Path]:
    """Write a split as one file, or numbered shards of shard_size tokens when it is larger (uint16
    ids for vocabularies up to 65,536 tokens, uint32 above)."""
    for old in list(out.glob(f"{split}.bin")) + list(out.glob(f"{split}_*.bin")):
        old.unlink()
    n = len(tokens)
    names = [f"{split}.bin"] if n <= shard_size else [f"{split}_{i:06d}.bin" for i in range((n - 1) // shard_size + 1)]
    paths = []
    for i, name in enumerate(names):
        w = ShardWriter(out / name, vocab_size)
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        for s in range(lo, hi, COPY_TOKENS):
            w.write(tokens[s:min(hi, s + COPY_TOKENS)])
        paths.append(w.close())
    return paths


def _char_vocab(docs: list[Path], bar) -> list[str]:
    chars: set[str] = set()
    for p in docs:
        for text in iter_text(p, progress=bar):
            chars.update(text)
    return sorted(chars)


def _shakespeare_sections(text: str) -> list[str]:
    """llm.c dev/data/tinyshakespeare.py: sections split on blank lines, "\n\n" restored on all but the last."""
    sections = text.split("\n\n")
    return [s + "\n\n" if i < len(sections) - 1 else s for i, s in enumerate(sections)]


def prepare(source: str, tokenizer: str | None = None, input: str | Path | None = None, out: str | Path | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.1, vocab: str | Path | None = None,
            progress: bool = True) -> Path:
    """Tokenize a preset or a text file/folder into OUT/{train,val}.bin + meta.json. Returns OUT.

    Text files stream through: memory stays bounded whatever the corpus size (the tokens are
    spooled to a temporary file in OUT, then cut into the train/val shards)."""
    if shard_size <= 0:
        raise GptkitError(f"shard size must be positive, got {shard_size}", "--shard-size",
                          "give a positive number of tokens per shard")
    if not 0.0 < val_fraction < 1.0:
        raise GptkitError(f"val fraction must be in (0, 1), got {val_fraction}", "--val-fraction", "e.g. 0.1")
    if source in PRESETS:
        kind = tokenizer or ("char" if source == "shakespeare-char" else "gpt2")
        src_path = shakespeare_text_path(input)
        docs = [src_path]
    else:
        if input:
            raise GptkitError("--input is for presets", "--input", "give the text file as PRESET_OR_PATH instead")
        kind = tokenizer or "gpt2"
        src_path = Path(source)
        docs = text_documents(src_path)
    if kind not in ("char", "gpt2"):
        raise GptkitError(f"unknown tokenizer {kind!r}", "--tokenizer", "use char or gpt2")
    hf_tok = _hf_vocab(vocab) if kind == "gpt2" and vocab else None  # --vocab DIR/tokenizer.json
    if hf_tok is not None:
        kind = "hf"
    out = Path(out) if out else Path("data") / (source if source in PRESETS else src_path.stem)
    if out.exists() and not out.is_dir():
        raise GptkitError("output exists and is not a directory", out, "choose another --out")
    total_bytes = sum(p.stat().st_size for p in docs)
    if total_bytes == 0:
        raise GptkitError("the text is empty", src_path, "give a file with some text in it")
    make_dir(out, "--out")

    meta: dict = {"tokenizer": kind, "source": str(src_path), "documents": len(docs)}
    llmc_shakespeare = source == "shakespeare" and kind == "gpt2"
    bar = tqdm(total=total_bytes * (2 if kind == "char" else 1), unit="B", unit_scale=True, desc="tokenizing",
               leave=False, disable=not progress, delay=1.0)
    spool = _Spool(out)
    try:
        if kind == "char":
            chars = _char_vocab(docs, bar)  # first pass: the vocabulary
            tok = CharTokenizer(chars)
            spool.for_vocab(tok.vocab_size)
            codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, so id = rank
            for p in docs:
                for text in iter_text(p, progress=bar):
                    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
                    spool.append(np.searchsorted(codepoints, cps))
            meta.update(vocab_size=tok.vocab_size, chars=tok.chars)
        else:
            tok = hf_tok or gpt2_tokenizer(vocab)
            spool.for_vocab(tok.vocab_size)
            if llmc_shakespeare:
                text = read_text(src_path)  # 1 MB: llm.c's recipe, section by section
                bar.update(len(text.encode("utf-8")))
                for ids in tok.encode_batch(_shakespeare_sections(text)):
                    spool.append([tok.eot])
                    spool.append(ids)
            elif hf_tok is not None:
                for p in docs:
                    for ids in hf_document_ids(tok, bpe_pieces(iter_text(p, progress=bar))):
                        spool.append(ids)
                meta.update(tokenizer_files=[f.name for f in save_tokenizer(tok, out)])
            else:
                for p in docs:
                    first = True
                    for piece in bpe_pieces(iter_text(p, progress=bar)):
                        if first:  # every non-empty document starts with <|endoftext|>
                            spool.append([tok.eot])
                            first = False
                        spool.append(tok.encode(piece))
            meta.update(vocab_size=tok.vocab_size, eot=tok.eot)
        bar.close()
        n = spool.n
        if n == 0:
            raise GptkitError("the text is empty", src_path, "give a file with some text in it")
        if llmc_shakespeare:
            n_val = min(LLMC_SHAKESPEARE_VAL_TOKENS, n)  # llm.c: the first 32,768 tokens are val
            val, train = spool.view(0, n_val), spool.view(n_val)
        else:
            n_train = int(n * (1.0 - val_fraction))
            train, val = spool.view(0, n_train), spool.view(n_train)
        if len(train) < 2 or len(val) < 2:
            raise GptkitError(f"text too short: {n} tokens give {len(train)} train and {len(val)} val",
                              src_path, "give more text")
        meta.update(train_tokens=len(train), val_tokens=len(val))
        meta["train_files"] = [p.name for p in write_split(out, "train", train, shard_size, meta["vocab_size"])]
        meta["val_files"] = [p.name for p in write_split(out, "val", val, shard_size, meta["vocab_size"])]
    finally:
        bar.close()
        spool.remove()
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "meta.json")
    return out


def _hf_vocab(vocab):
    """The tokenizer of a `--vocab` that names a (non-GPT-2) tokenizer.json, else None."""
    tok = load_vocab(vocab)
    return tok if tok.kind == "hf" else None


def default_dataset_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def ensure_prepared(name: str, input: str | Path | None = None, log=None) -> Path:
    """The prepared directory of a preset dataset in the cache, preparing it on first use (and
    saying so, and from which text, through `log`)."""
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
    if log is not None:
        try:
            source = json.loads((d / "meta.json").read_text(encoding="utf-8")).get("source", "?")
        except (OSError, ValueError):
            source = "?"
        log(f"prepared {name} from {source} into {d}")
    return d


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

"""Token shards in llm.c's layout, and a seeded, resumable batch loader over them.

Shard layouts (llm.c dev/data/data_common.py): 256 little-endian int32 header
[20240520, 1, ntok, 0, ...] then ntok uint16 tokens, file size = 1024 + 2*ntok (GPT-2's); or, for
vocabularies over 65,536 tokens (Llama 3's 128,256), [20240801, 7, ntok, 0, ...] then ntok uint32
tokens, file size = 1024 + 4*ntok.
A split is `train.bin` or `train_000000.bin, train_000001.bin, ...` (likewise `val`).

The loader memory-maps every shard of a split. In `random` mode batch i is a pure function of
(seed, i*world + rank), so its state is just the step counter; in `sequential` mode it walks the split
in file order as llm.c's DataLoader does with shuffling off (llmc/dataloader.h), and its state is the
position: see TokenLoader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError
from gptkit.formats.llmc import (HEADER_BYTES, HEADER_INTS, MAX_SHARD_TOKEN, SHARD32_MAGIC, SHARD_LAYOUTS,
                                 SHARD_MAGIC, read_header_bytes)


def shard_magic(vocab_size: int) -> int:
    """The shard layout for a vocabulary: uint16 ids (GPT-2's) when every id fits, else uint32."""
    return SHARD_MAGIC if vocab_size <= MAX_SHARD_TOKEN + 1 else SHARD32_MAGIC


def shard_dtype(vocab_size: int) -> np.dtype:
    """The token dtype of that layout: little-endian uint16 or uint32."""
    return np.dtype(SHARD_LAYOUTS[shard_magic(vocab_size)][1])


class ShardWriter:
    """Write an llm.c shard piece by piece in bounded memory: a placeholder header, the tokens,
    then the real header; the file appears under its name only when closed (atomic rename).
    `vocab_size` picks the layout: uint16 ids up to 65,536 tokens, uint32 above."""

    def __init__(self, path: str | Path, vocab_size: int = MAX_SHARD_TOKEN + 1):
        self.path = Path(path)
        self.magic = shard_magic(vocab_size)
        self.version, self.dtype = SHARD_LAYOUTS[self.magic]
        self.max_id = int(np.iinfo(np.dtype(self.dtype)).max)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(bytes(HEADER_BYTES))
        self.ntok = 0

    def write(self, tokens) -> None:
        toks = np.asarray(tokens)
        if toks.size and (toks.min() < 0 or toks.max() > self.max_id):
            self.abort()
            raise GptkitError(f"token ids must be in [0, {self.max_id}], found range [{toks.min()}, {toks.max()}]",
                              self.path, "give the writer the vocabulary size: above 65,536 tokens the shard "
                              "holds uint32 ids")
        self.f.write(toks.astype(self.dtype, copy=False).tobytes())
        self.ntok += int(toks.size)

    def close(self) -> Path:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (self.magic, self.version, self.ntok)
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.f.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens, vocab_size: int | None = None) -> None:
    """Write tokens (any int array-like) as an llm.c shard: uint16 ids if the vocabulary (by default:
    the largest id + 1) has at most 65,536 tokens, else uint32."""
    toks = np.asarray(tokens)
    w = ShardWriter(path, vocab_size if vocab_size is not None else int(toks.max(initial=0)) + 1)
    w.write(toks)
    w.close()


def shard_header(path: str | Path) -> tuple[int, str]:
    """Check a shard's header and size; return its token count and token dtype ("<u2" or "<u4")."""
    path = Path(path)
    raw, size = read_header_bytes(path, "shard")
    if len(raw) < HEADER_BYTES:
        raise GptkitError(f"shard is truncated: {size} bytes, the header alone is {HEADER_BYTES}", path,
                          "re-run `gptkit prepare`")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) not in SHARD_LAYOUTS:
        raise GptkitError(f"bad magic {header[0]}, expected {' or '.join(map(str, SHARD_LAYOUTS))}", path,
                          "not an llm.c token shard; re-run `gptkit prepare`")
    version, dtype = SHARD_LAYOUTS[int(header[0])]
    if header[1] != version:
        raise GptkitError(f"unsupported shard version {header[1]} for magic {header[0]}, expected {version}", path,
                          "re-run `gptkit prepare`")
    ntok, width = int(header[2]), np.dtype(dtype).itemsize
    if size != HEADER_BYTES + width * ntok:
        raise GptkitError(f"size mismatch: header says {ntok} tokens ({HEADER_BYTES + width * ntok} bytes), "
                          f"file has {size} bytes", path, "the shard is truncated or damaged; re-run `gptkit prepare`")
    return ntok, dtype


def read_header(path: str | Path) -> int:
    """Check a shard's header and size; return its token count."""
    return shard_header(path)[0]


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (uint16 or uint32, as the shard holds them)."""
    ntok, dtype = shard_header(path)
    if ntok == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """`split.bin` or `split_NNNNNN.bin` files of a data directory, in order."""
    d = Path(data_dir)
    if not d.is_dir():
        raise GptkitError("data directory not found", d, "run `gptkit prepare` first or fix --data")
    single = d / f"{split}.bin"
    numbered = sorted(p for p in d.glob(f"{split}_*.bin") if re.fullmatch(rf"{split}_\d{{6}}\.bin", p.name))
    files = ([single] if single.is_file() else []) + numbered
    if not files:
        hint = ("run `gptkit prepare` first" if split in ("train", "val") else
                "`gptkit prepare` writes the train and val splits: use --split val (or train)")
        raise GptkitError(f"no {split} shards ({split}.bin or {split}_000000.bin)", d, hint)
    return files


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GptkitError(f"unreadable meta.json: {e}", p, "re-run `gptkit prepare`") from None


def check_char_table(model_chars: list[str] | None, meta: dict[str, Any], model_where, data_dir) -> None:
    """A char model reads only data prepared with its own character table: the same id must mean
    the same character, or the losses are of another text."""
    data_chars = meta.get("chars")
    if model_chars and data_chars and len(data_chars) > len(model_chars):
        return  # more ids than the model has: the vocabulary-size check says so, more precisely
    if model_chars and data_chars and list(model_chars) != list(data_chars):
        def show(chars):
            text = "".join(chars)
            return json.dumps(text if len(text) <= 40 else text[:37] + "...", ensure_ascii=False)

        raise GptkitError(f"the model's character table ({len(model_chars)} chars: {show(model_chars)}) differs "
                          f"from the data's ({len(data_chars)} chars: {show(data_chars)}, {Path(data_dir) / 'meta.json'})",
                          str(model_where), "use data prepared from the model's text, or train a new model on this data")


class TokenLoader:
    """Batches (x, y) of shape (B, T) from every shard of a split.

    mode="random": each row starts at a uniformly random offset; batch i is a pure function of
    (seed, i*world + rank).

    mode="sequential" (llm.c's DataLoader, shuffling off): a global batch is world*B*T tokens of one
    shard; rank r reads the B*T+1 tokens at offset r*B*T inside it (row b = tokens [b*T, b*T+T+1)),
    and the next global batch starts world*B*T further on. When a global batch would need a token past
    the shard's end (offset + world*B*T + 1 > ntok), the next shard starts at 0; after the last shard,
    the first. Shards shorter than world*B*T+1 tokens are skipped (llm.c refuses them).
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, *,
                 mode: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown loader mode {mode!r}")
        self.files = split_files(data_dir, split)
        self.shards = [read_shard(f) for f in self.files]
        self.B, self.T = batch_size, block_size
        self.mode, self.seed, self.rank, self.world = mode, seed, rank, world_size
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        usable = np.maximum(sizes - block_size, 0)  # start offsets with T+1 tokens after them
        if usable.sum() == 0:
            raise GptkitError(f"the {split} split has {int(sizes.sum())} tokens, fewer than block_size+1 = "
                              f"{block_size + 1}", data_dir, "use a smaller block_size or more data")
        self.sizes, self.usable = sizes, usable
        self.chunk = world_size * batch_size * block_size  # tokens per global batch (sequential mode)
        if mode == "sequential" and not (sizes >= self.chunk + 1).any():
            raise GptkitError(f"no {split} shard holds world*B*T+1 = {self.chunk + 1} tokens (largest: "
                              f"{int(sizes.max())})", data_dir, "use a smaller batch_size or block_size")
        self.cum_usable = np.cumsum(usable)
        if vocab_size is not None:
            check_vocab(data_dir, self.files, self.shards, vocab_size)
        self.step = 0  # batches served (random mode)
        self.shard_idx, self.pos = 0, 0  # where the next window starts (sequential mode)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe position. Every rank's state is the same (ranks advance in lockstep), so one
        rank's state resumes them all."""
        return {"mode": self.mode, "seed": self.seed, "step": self.step, "shard": self.shard_idx, "pos": self.pos,
                "files": [f.name for f in self.files], "tokens": int(self.sizes.sum())}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("mode", self.mode) != self.mode:
            raise GptkitError(f"saved loader state is for {st['mode']} batches, this loader serves {self.mode}",
                              "loader", "resume with the same loader mode")
        if "tokens" in st and (st["tokens"] != int(self.sizes.sum()) or st.get("files") != [f.name for f in self.files]):
            raise GptkitError(f"the data changed since the checkpoint ({st['tokens']:,} tokens in {len(st['files'])} "
                              f"files then, {int(self.sizes.sum()):,} in {len(self.files)} now)", self.files[0].parent,
                              "resume with the data the run was started on")
        shard, pos = int(st["shard"]), int(st["pos"])
        if not 0 <= shard < len(self.shards):
            raise GptkitError(f"saved loader state points at shard {shard}, the split has {len(self.shards)}", "loader",
                              "resume with the data the run was started on")
        self.step, self.shard_idx, self.pos = int(st["step"]), shard, pos

    def _window(self, shard: int, start: int) -> np.ndarray:
        return np.asarray(self.shards[shard][start:start + self.T + 1], dtype=np.int64)

    def next_batch(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "random":
            # rank r's i-th batch is global batch i*world + r: the ranks of one step together draw the
            # same batches as a single process with world times the accumulation (identical losses)
            rng = np.random.default_rng([self.seed, 0, self.step * self.world + self.rank])
            flat = rng.integers(0, self.cum_usable[-1], size=self.B)
            shard = np.searchsorted(self.cum_usable, flat, side="right")
            starts = flat - np.concatenate([[0], self.cum_usable[:-1]])[shard]
            rows = [self._window(s, o) for s, o in zip(shard, starts)]
        else:
            # llm.c's dataloader_next_batch: move on to the next shard when this global batch and
            # its one extra target token do not fit
            while self.pos + self.chunk + 1 > self.sizes[self.shard_idx]:
                self.shard_idx, self.pos = (self.shard_idx + 1) % len(self.shards), 0
            start = self.pos + self.rank * self.B * self.T
            buf = np.asarray(self.shards[self.shard_idx][start:start + self.B * self.T + 1], dtype=np.int64)
            rows = [buf[b * self.T: b * self.T + self.T + 1] for b in range(self.B)]
            self.pos += self.chunk
        self.step += 1
        buf = torch.from_numpy(np.stack(rows))  # (B, T+1)
        x, y = buf[:, :-1], buf[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def check_vocab(data_dir, files, shards, vocab_size: int) -> None:
    """Fail if the data holds ids >= vocab_size. meta.json's vocab_size answers without reading the
    shards; only data without one is scanned."""
    meta = read_meta(data_dir)
    if "vocab_size" in meta:
        if int(meta["vocab_size"]) > vocab_size:
            raise GptkitError(f"the data's vocabulary has {meta['vocab_size']} tokens, the model's {vocab_size}",
                              Path(data_dir) / "meta.json", "prepare the data with the model's tokenizer")
        return
    for f, s in zip(files, shards):
        if len(s) and int(s.max()) >= vocab_size:
            raise GptkitError(f"shard holds token id {int(s.max())} >= the model's vocab_size {vocab_size}",
                              f, "prepare the data with the model's tokenizer")


class SplitTokens:
    """Every shard of a split as one read-only sequence: len() and contiguous slices."""

    def __init__(self, data_dir: str | Path, split: str):
        self.files = split_files(data_dir, split)
        self.shards = [read_shard(f) for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi, _ = sl.indices(len(self))
        parts = []
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            s0 = int(self.starts[i])
            take = self.shards[i][lo - s0:min(hi, int(self.starts[i + 1])) - s0]
            parts.append(np.asarray(take, dtype=np.int64))
            lo += len(take)
            i += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def eval_windows(data_dir: str | Path, split: str, block_size: int, batch_size: int):
    """Yield (x, y) batches, each (B, T), covering a whole split once as one token stream (its
    shards in order): every token but the first is predicted exactly once, in consecutive
    non-overlapping windows of block_size; a short last window is padded with y = -1 (ignored)."""
    toks = SplitTokens(data_dir, split)
    starts = range(0, max(len(toks) - 1, 0), block_size)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        x = torch.zeros(len(chunk), block_size, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -1, dtype=torch.long)
        for r, s in enumerate(chunk):
            w = torch.from_numpy(toks[s:s + block_size + 1])
            x[r, : len(w) - 1] = w[:-1]
            y[r, : len(w) - 1] = w[1:]
        yield x, y


def count_eval_batches(data_dir: str | Path, split: str, block_size: int, batch_size: int) -> int:
    """How many batches eval_windows yields (for a progress bar), from the headers alone."""
    n = sum(read_header(f) for f in split_files(data_dir, split))
    windows = len(range(0, max(n - 1, 0), block_size))
    return (windows + batch_size - 1) // batch_size

"""Evaluation: `gptkit eval`, the whole-split loss, and the quick loss estimate used during training.

`evaluate` averages the loss over every target token of a split, in the fixed windows of
`data.eval_windows`; `estimate_loss` averages a few fixed random batches (the same ones at every
periodic eval of a run); `evaluate_model` is `gptkit eval` on any loadable model, and
`split_bits_per_byte` turns its loss into bits per byte. Multiple-choice tasks (HellaSwag) are
in gptkit/tasks.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

import torch
from tqdm.auto import tqdm

from gptkit import sft
from gptkit.data import (SplitTokens, TokenLoader, check_char_table, check_vocab, count_eval_batches, eval_windows,
                         read_meta, split_files)
from gptkit.errors import GptkitError
from gptkit.loading import load_model
from gptkit.model import GPT
from gptkit.runtime import autocast, pick_device, pick_dtype
from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer

def evaluate(model: GPT, data_dir: Path, block_size: int, batch_size: int, device, dtype, split: str = "val",
             progress: bool = False) -> tuple[float, int]:
    """Mean loss over every target token of a whole split: (loss, tokens)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        if sft.is_chat_data(read_meta(data_dir)):  # one conversation per row, assistant targets only
            batches, n_batches = sft.eval_batches(data_dir, split, block_size, batch_size), None
        else:
            batches = eval_windows(data_dir, split, block_size, batch_size)
            n_batches = count_eval_batches(data_dir, split, block_size, batch_size)
        if progress:
            batches = tqdm(batches, total=n_batches,
                           desc=f"eval {split}", leave=False, dynamic_ncols=True)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            n = int((y != -1).sum())
            total += float(loss) * n
            count += n
    return total / max(count, 1), count


def estimate_loss(model: GPT, loader: TokenLoader, batches: int, device, dtype) -> float:
    """Mean loss over `batches` fixed random batches (the same ones at every eval)."""
    model.eval()
    saved = loader.state_dict()
    loader.load_state_dict({**saved, "step": 0, "shard": 0, "pos": 0})
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x, y = loader.next_batch(device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            losses.append(float(loss))
    loader.load_state_dict(saved)
    return sum(losses) / len(losses)


def evaluate_model(model_path: str, data_dir: str, split: str = "val", batch_size: int = 16,
                   block_size: int | None = None, device: str = "auto", dtype: str = "float32") -> tuple[float, int]:
    """`gptkit eval`: (mean loss, tokens) of a model over a whole split of a prepared data directory."""
    if batch_size <= 0:
        raise GptkitError(f"must be > 0, got {batch_size}", "--batch-size", "give a positive batch size")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    split_files(data_dir, split)  # fail early, naming the directory
    loaded = load_model(model_path)
    model = loaded.model.to(dev)
    T = block_size or model.config.block_size
    if not 0 < T <= model.config.block_size:
        raise GptkitError(f"must be in 1..{model.config.block_size}, got {T}", "--block-size",
                          "leave it out to use the model's context")
    meta = read_meta(data_dir)
    check_char_table(loaded.chars, meta, model_path, data_dir)
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise GptkitError(f"data vocab {meta['vocab_size']} exceeds the model's {model.config.vocab_size}",
                          data_dir, "evaluate on data prepared with the model's tokenizer")
    if "vocab_size" not in meta:  # e.g. llm.c's own shards: scan the ids instead
        toks = SplitTokens(data_dir, split)
        check_vocab(data_dir, toks.files, toks.shards, model.config.vocab_size)
    return evaluate(model, Path(data_dir), T, batch_size, dev, dt, split=split, progress=sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------
# bits per byte: the loss per UTF-8 byte of text, comparable across tokenizers (nanochat's measure)


def token_byte_lengths(tokenizer, size: int) -> torch.Tensor:
    """(size,) int64: how many UTF-8 bytes each token id decodes to.

    Char models: each character's UTF-8 length. BPE: the token's own bytes. Special tokens
    (GPT-2's <|endoftext|>, a tokenizer's bos/eos) mark document boundaries and stand for no
    text: 0 bytes.
    Ids beyond the tokenizer's vocabulary (a padded model vocab) also count 0."""
    n = min(size, tokenizer.vocab_size)
    out = torch.zeros(size, dtype=torch.long)
    special = {i for i in (getattr(tokenizer, k, None) for k in ("eot", "bos", "eos")) if i is not None}
    if getattr(tokenizer, "kind", None) == "char":
        lengths = [len(c.encode("utf-8")) for c in tokenizer.chars[:n]]
    else:
        lengths = [0 if i in special else len(tokenizer.token_bytes(i)) for i in range(n)]
    out[:n] = torch.tensor(lengths, dtype=torch.long)
    return out


def data_tokenizer(meta: dict, vocab: str | None = None, model_dir=None):
    """The tokenizer a prepared data directory was made with (its meta.json), or None if unknown.
    Without a meta.json (llm.c's own shards), the tokens are GPT-2's."""
    kind = meta.get("tokenizer")
    if kind == "char" and meta.get("chars"):
        return CharTokenizer(meta["chars"])
    if kind == "gpt2" or not meta:
        return gpt2_tokenizer(vocab, model_dir)
    return None


def bits_per_byte(loss_nats_total: float, n_bytes: int) -> float:
    """Total loss in nats over some tokens -> bits per UTF-8 byte of the text those tokens decode to."""
    return loss_nats_total / math.log(2) / n_bytes if n_bytes else float("nan")


def split_target_bytes(data_dir: str | Path, split: str, lengths: torch.Tensor) -> int:
    """UTF-8 bytes of the tokens a whole-split eval predicts: every token of the split but the first
    (data.eval_windows), each counted by `lengths` (token_byte_lengths). Chat data: the assistant's
    tokens of every row (gptkit/sft.py), which are the only targets there."""
    table = lengths.numpy()
    if sft.is_chat_data(read_meta(data_dir)):
        rows = sft.ChatRows(data_dir, split)
        ids = np.asarray(rows.tokens[:, 1:], dtype=np.int64)[np.asarray(rows.mask[:, 1:]) == 1]
        return int(table[ids].sum())
    toks = SplitTokens(data_dir, split)
    total = 0
    for i, shard in enumerate(toks.shards):
        ids = np.asarray(shard[1:] if i == 0 else shard, dtype=np.int64)
        if len(ids) and ids.max() >= len(table):
            raise GptkitError(f"token id {int(ids.max())} is outside the tokenizer's {len(table)} ids", toks.files[i],
                              "the data was not prepared with the tokenizer its meta.json names")
        total += int(table[ids].sum())
    return total


def split_bits_per_byte(data_dir: str | Path, split: str, mean_loss: float, n_tokens: int,
                        vocab: str | None = None, model_dir=None) -> tuple[float, int] | None:
    """(bits per byte, bytes) of a whole-split eval's mean loss over n_tokens, or None when the
    data's tokenizer is unknown. bpb = mean_loss * n_tokens / ln 2 / bytes."""
    tok = data_tokenizer(read_meta(data_dir), vocab, model_dir)
    if tok is None:
        return None
    n_bytes = split_target_bytes(data_dir, split, token_byte_lengths(tok, tok.vocab_size))
    return bits_per_byte(mean_loss * n_tokens, n_bytes), n_bytes


"""Evaluation: `gptkit eval`, the whole-split loss, and the quick loss estimate used during training.

`evaluate` averages the loss over every target token of a split, in the fixed windows of
`data.eval_windows`; `estimate_loss` averages a few fixed random batches (the same ones at every
periodic eval of a run); `evaluate_model` is `gptkit eval` on any loadable model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptkit.data import SplitTokens, TokenLoader, check_vocab, count_eval_batches, eval_windows, read_meta, split_files
from gptkit.errors import GptkitError
from gptkit.loading import load_model
from gptkit.model import GPT
from gptkit.runtime import autocast, pick_device, pick_dtype

def evaluate(model: GPT, data_dir: Path, block_size: int, batch_size: int, device, dtype, split: str = "val",
             progress: bool = False) -> tuple[float, int]:
    """Mean loss over every target token of a whole split: (loss, tokens)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        batches = eval_windows(data_dir, split, block_size, batch_size)
        if progress:
            batches = tqdm(batches, total=count_eval_batches(data_dir, split, block_size, batch_size),
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
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise GptkitError(f"data vocab {meta['vocab_size']} exceeds the model's {model.config.vocab_size}",
                          data_dir, "evaluate on data prepared with the model's tokenizer")
    if "vocab_size" not in meta:  # e.g. llm.c's own shards: scan the ids instead
        toks = SplitTokens(data_dir, split)
        check_vocab(data_dir, toks.files, toks.shards, model.config.vocab_size)
    return evaluate(model, Path(data_dir), T, batch_size, dev, dt, split=split, progress=True)

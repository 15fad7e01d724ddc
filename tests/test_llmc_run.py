"""README's recipe for llm.c's CPU run (train_gpt2.c) and its test_gpt2 check, with gptkit alone.

A tiny random GPT-2 stands in for the 124M model and random shards for tiny Shakespeare, so the
commands run offline; everything else is the recipe as written. The reference is a transformers
GPT2LMHeadModel with torch.optim.AdamW (llm.c's settings) fed llm.c's batches, computed here by
hand: train batch i is the B*T+1 tokens at i*B*T, each val estimate the first 5 batches of val.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_hf_model
from gptkit.data import write_shard

B, T, V = 4, 64, 320


def _gptkit(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _batch(toks, i):
    buf = torch.tensor(toks[i * B * T: i * B * T + B * T + 1].astype(np.int64))
    return buf[:-1].view(B, T), buf[1:].view(B, T)


@pytest.mark.slow
def test_llmc_cpu_run_recipe_matches_transformers_with_llmc_batches(tmp_path):
    hf = make_hf_model(tmp_path / "hf", initializer_range=0.3, vocab_size=V, n_positions=64)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    train_toks, val_toks = rng.integers(0, V, 2100), rng.integers(0, V, 1400)
    write_shard(data / "train.bin", train_toks)
    write_shard(data / "val.bin", val_toks)
    # the recipe: llm.c's model.bin, the debug state and test_gpt2's check, then train_gpt2.c's run
    _gptkit("convert", "hf", "llmc", "--to", "llmc", cwd=tmp_path)
    _gptkit("validate", "--write-state", "llmc/debug_state.bin", "--model", "llmc/model.bin", "--data", data,
            cwd=tmp_path)
    r = _gptkit("validate", "--model", "llmc/model.bin", "--debug-state", "llmc/debug_state.bin", "--steps", "3",
                cwd=tmp_path)
    assert "OK: matches the debug state" in r.stdout
    _gptkit("train", "--config", "finetune-shakespeare.toml", "--init", "llmc/model.bin", "--data", data,
            "--out", "runs/llmc", "max_steps=6", "eval_interval=3", "progress=false", cwd=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "runs/llmc/metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["train_loss"] for r in rows if not r.get("final") and r["step"] > 0}
    losses = [by_step[s] for s in sorted(by_step)]
    val3 = [r["val_loss"] for r in rows if r["step"] == 3 and "val_loss" in r]

    # reference: transformers + torch AdamW, llm.c's sequential batches
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref, ref_val = [], None
    hf.train(False)  # no dropout (the model has none in use either)
    for i in range(6):
        x, y = _batch(train_toks, i)
        opt.zero_grad()
        loss = F.cross_entropy(hf(x).logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        ref.append(loss.item())
        if i == 2:
            with torch.no_grad():
                ref_val = np.mean([F.cross_entropy(hf(xv).logits.reshape(-1, V), yv.reshape(-1)).item()
                                   for xv, yv in (_batch(val_toks, j) for j in range(5))])
    assert len(losses) == 6
    np.testing.assert_allclose(losses, ref, rtol=0, atol=2e-5)
    assert ref[-1] < ref[0] - 0.01  # the steps moved the model
    assert val3 and abs(val3[0] - ref_val) < 2e-5

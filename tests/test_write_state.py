"""`gptkit validate --write-state`: the debug state gptkit writes holds what transformers computes.

The file is parsed here from llm.c's layout (not with gptkit's reader), x and y are checked
against the shard's first B*T+1 tokens, and the logits, loss and the 16 gradients against a
transformers GPT2LMHeadModel run on the same batch. Weights are drawn at std 0.3 so that every op
moves the numbers well above fp32 noise.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_hf_model
from gptkit.data import write_shard

B, T, V, Vp, L, C = 2, 16, 320, 384, 2, 32


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def _parse(path):
    """llm.c's debug state: 256 int32 header [20240327, 2, B, T], x, y (int32), logits, loss, grads (fp32)."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:4]) == [20240327, 2, B, T]
    body = raw[1024:]
    ints = np.frombuffer(body[: 8 * B * T], dtype="<i4")
    floats = np.frombuffer(body[8 * B * T:], dtype="<f4")
    logits = floats[: B * T * V].reshape(B, T, V)
    loss = floats[B * T * V]
    shapes = [("wte", (Vp, C)), ("wpe", (64, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
              ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
              ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
              ("lnfw", (C,)), ("lnfb", (C,))]
    grads, pos = {}, B * T * V + 1
    for name, shape in shapes:
        n = int(np.prod(shape))
        grads[name] = floats[pos: pos + n].reshape(shape)
        pos += n
    assert pos == len(floats)  # nothing left over
    return ints[: B * T].reshape(B, T), ints[B * T:].reshape(B, T), logits, loss, grads


def _hf_grads(hf):
    """transformers' gradients in llm.c's layout: Conv1D (in, out) -> (out, in), layers stacked, wte padded."""
    h = hf.transformer.h
    g = lambda p: p.grad.detach().numpy()  # noqa: E731
    stack = lambda f: np.stack([f(blk) for blk in h])  # noqa: E731
    wte = np.zeros((Vp, C), np.float32)
    wte[:V] = g(hf.transformer.wte.weight)
    return {"wte": wte, "wpe": g(hf.transformer.wpe.weight),
            "ln1w": stack(lambda b: g(b.ln_1.weight)), "ln1b": stack(lambda b: g(b.ln_1.bias)),
            "qkvw": stack(lambda b: g(b.attn.c_attn.weight).T), "qkvb": stack(lambda b: g(b.attn.c_attn.bias)),
            "attprojw": stack(lambda b: g(b.attn.c_proj.weight).T), "attprojb": stack(lambda b: g(b.attn.c_proj.bias)),
            "ln2w": stack(lambda b: g(b.ln_2.weight)), "ln2b": stack(lambda b: g(b.ln_2.bias)),
            "fcw": stack(lambda b: g(b.mlp.c_fc.weight).T), "fcb": stack(lambda b: g(b.mlp.c_fc.bias)),
            "fcprojw": stack(lambda b: g(b.mlp.c_proj.weight).T), "fcprojb": stack(lambda b: g(b.mlp.c_proj.bias)),
            "lnfw": g(hf.transformer.ln_f.weight), "lnfb": g(hf.transformer.ln_f.bias)}


def test_written_state_holds_transformers_logits_loss_and_grads(tmp_path):
    model_dir, data = tmp_path / "hf", tmp_path / "data"
    hf = make_hf_model(model_dir, initializer_range=0.3, n_layer=L, n_embd=C, vocab_size=V, n_positions=64)
    data.mkdir()
    toks = np.random.default_rng(3).integers(0, V, 500)
    write_shard(data / "val.bin", toks)
    write_shard(data / "train.bin", toks[::-1].copy())
    out = tmp_path / "state.bin"
    r = _run("validate", "--write-state", out, "--model", model_dir, "--data", data, "-B", B, "-T", T)
    assert r.returncode == 0, r.stderr
    x, y, logits, loss, grads = _parse(out)
    # llm.c's first batch: the val shard's first B*T+1 tokens, row b = tokens [b*T, b*T+T]
    assert np.array_equal(x, toks[: B * T].reshape(B, T)) and np.array_equal(y, toks[1: B * T + 1].reshape(B, T))
    hf.train(False)
    ref_logits = hf(torch.tensor(x, dtype=torch.long)).logits
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), torch.tensor(y, dtype=torch.long).reshape(-1))
    ref_loss.backward()
    scale = float(ref_logits.detach().abs().max())
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=0, atol=2e-5 * scale)
    assert loss == pytest.approx(ref_loss.item(), abs=1e-5)
    for name, ref in _hf_grads(hf).items():
        tol = 1e-4 * max(float(np.abs(ref).max()), 1e-3)
        np.testing.assert_allclose(grads[name], ref, rtol=0, atol=tol, err_msg=name)
    assert np.abs(grads["qkvw"]).max() > 1e-3  # the gradients are not trivially zero
    # and gptkit validate accepts it, step 0's loss being the state's
    r = _run("validate", "--model", model_dir, "--debug-state", out, "--steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"step 0: loss {ref_loss.item():.6f}" in r.stdout or f"step 0: loss {loss:.6f}" in r.stdout


def test_write_state_errors_are_one_line(tmp_path):
    model_dir, data = tmp_path / "hf", tmp_path / "data"
    make_hf_model(model_dir, vocab_size=V, n_positions=64)
    data.mkdir()
    write_shard(data / "val.bin", np.arange(100) % V)
    r = _run("validate", "--write-state", tmp_path / "s.bin", "--model", model_dir)
    assert r.returncode == 2 and r.stderr.startswith("error: --write-state needs --data")
    r = _run("validate", "--write-state", tmp_path / "s.bin", "--model", model_dir, "--data", data, "-T", 128)
    assert r.returncode == 2 and "exceeds the model's context 64" in r.stderr
    r = _run("validate", "--write-state", tmp_path / "s.bin", "--model", model_dir, "--data", data)  # 4*64+1 > 100
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "257" in r.stderr
    r = _run("validate", "--model", model_dir)
    assert r.returncode == 2 and "--debug-state" in r.stderr

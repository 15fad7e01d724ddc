"""Precision, optimizers, the time budget, compile fallback and `gptkit bench train`.

Reference points: fp32 training with torch.optim.AdamW is the reference for bf16 autocast and for
AdamW with bf16 moments; the MFU formula is recomputed from the reported numbers.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gptkit.train as train_mod
import gptkit.optim as optim_mod
from gptkit.config import GPTConfig, resolve_config
from gptkit.model import GPT
from gptkit.optim import LowPrecisionAdamW, lr_at, make_adamw
from gptkit.precision import ShadowWeights
from gptkit.runtime import autocast
from gptkit.train import train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"{i % 7} the quick brown fox jumps over the lazy dog; {i % 5} shall I compare thee?\n"
               for i in range(300))


def _silent(*a, **k):
    pass


def _markov_tokens(n: int, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """n tokens of a seeded random first-order Markov source: learnable, but its entropy keeps
    the loss well above 0, as on real text (a memorised corpus would make relative errors blow up)."""
    g = torch.Generator().manual_seed(seed)
    cdf = torch.softmax(4.0 * torch.randn(vocab, vocab, generator=g), dim=-1).cumsum(-1)
    u = torch.rand(n, generator=g)
    ids = [0]
    for i in range(n - 1):
        ids.append(min(int(torch.searchsorted(cdf[ids[-1]], u[i])), vocab - 1))
    return torch.tensor(ids)


def _char_batches(n: int, B: int = 8, T: int = 32, seed: int = 0):
    """n (x, y) batches of a Markov-source corpus: a loss curve that descends to a plateau."""
    ids = _markov_tokens(20_000)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ix = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        out.append((torch.stack([ids[i:i + T] for i in ix]), torch.stack([ids[i + 1:i + T + 1] for i in ix])))
    return out, 32


def _loss_curve(batches, vocab, *, dtype=torch.float32, state_dtype=torch.float32, lr=3e-3, shadow=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    sh = ShadowWeights(model, torch.bfloat16) if shadow else None
    if state_dtype == torch.float32:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)  # the reference optimizer
    else:
        opt = LowPrecisionAdamW(model.parameters(), lr=lr, weight_decay=0.1, state_dtype=state_dtype)
    losses = []
    for x, y in batches:
        with autocast(torch.device("cpu"), dtype):
            _, loss = (sh.module if sh else model)(x, y)
        loss.backward()
        if sh:
            sh.grads_to_master()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sh:
            sh.pull()
        losses.append(loss.item())
    return torch.tensor(losses)


def _smooth(t, k=10):
    return torch.nn.functional.avg_pool1d(t[None, None], k, stride=1)[0, 0]


def test_bf16_moments_adamw_loss_curve_within_1_percent_of_fp32_adamw_over_200_steps():
    batches, vocab = _char_batches(200)
    ref = _loss_curve(batches, vocab)
    low = _loss_curve(batches, vocab, state_dtype=torch.bfloat16)
    assert ref[-1] < 0.6 * ref[0]  # the curve actually descends
    # every point of the (10-step averaged) curve, and the final loss, within 1% of fp32 AdamW
    rel = ((_smooth(low) - _smooth(ref)).abs() / _smooth(ref)).max()
    assert rel < 0.01, f"max relative deviation {rel:.4f}"
    assert abs(low[-1] - ref[-1]) / ref[-1] < 0.01


def test_bf16_weights_with_fp32_master_loss_curve_within_1_percent_of_fp32_adamw_over_200_steps():
    batches, vocab = _char_batches(200)
    ref = _loss_curve(batches, vocab)
    low = _loss_curve(batches, vocab, shadow=True)
    assert not torch.equal(ref, low)  # the forward really ran in bf16
    rel = ((_smooth(low) - _smooth(ref)).abs() / _smooth(ref)).max()
    assert rel < 0.01, f"max relative deviation {rel:.4f}"
    assert abs(low[-1] - ref[-1]) / ref[-1] < 0.01


def _fused_pair(max_norm: float, compiled: bool = True):
    """Two copies of a small model with bf16 shadows: one updated as the trainer does without
    compile (fp32 gradients, clip_grad_norm_, torch.optim.AdamW(fused=True), pull), the other by
    the fused update (compiled, or its eager function), fed the same bf16 gradients each step."""
    import gptkit.precision as precision

    torch.manual_seed(0)
    a = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    b = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    b.load_state_dict(a.state_dict())
    oa, _ = optim_mod.make_adamw(a, 1e-2, 0.1)
    ob, _ = optim_mod.make_adamw(b, 1e-2, 0.1)
    sa, sb = ShadowWeights(a, sparse_tied=False), ShadowWeights(b, sparse_tied=False)
    assert sb.fuse_adamw(ob)
    assert not ShadowWeights(a).fuse_adamw(LowPrecisionAdamW(a.parameters(), state_dtype=torch.bfloat16))
    if not compiled:
        sb._update, sb._norm = precision._adamw_master_update, precision._grad_norm
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for s1, s2 in zip(sa.shadow_params, sb.shadow_params):
            s1.grad = (torch.randn(s1.shape, generator=g) * 0.1).to(torch.bfloat16)
            s2.grad = s1.grad.clone()
        sa.grads_to_master()
        sb.grads_to_master()  # fused: leaves them in the shadow
        assert all(p.grad is None for p in b.parameters())
        na, nb = sa.clip_grad_norm_(max_norm), sb.clip_grad_norm_(max_norm)
        assert float(nb) == pytest.approx(float(na), rel=1e-5)
        sa.step(oa)
        sb.step(ob)
        oa.zero_grad(set_to_none=True)
        ob.zero_grad(set_to_none=True)
        sa.after_step()
        sb.after_step()
    return (a, oa, sa), (b, ob, sb)


@pytest.mark.slow
def test_compiled_fused_master_adamw_update_matches_its_eager_math():
    (a, oa, _), (b, ob, _) = _fused_pair(1.0, compiled=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ob.state[q]["exp_avg_sq"], oa.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("max_norm", [float("inf"), 1.0])  # unclipped, and clipped (the norm is ~5)
def test_fused_master_adamw_update_is_torch_adamw_over_the_same_bf16_gradients(max_norm):
    # eager here (the compiled pass is checked in the slow trainer test): the same math and state
    (a, oa, sa), (b, ob, sb) = _fused_pair(max_norm, compiled=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ob.state[q][k], oa.state[p][k], rtol=1e-6, atol=1e-9)
    for s1, s2 in zip(sa.shadow_params, sb.shadow_params):
        assert s2.dtype == torch.bfloat16 and s2.grad is None
        assert (s2.float() - s1.float()).abs().max() <= 2 ** -7 * s1.float().abs().max()  # ≤ 1 bf16 ulp apart
    assert ob.state_dict()["state"].keys() == oa.state_dict()["state"].keys()  # checkpoints alike


# Stated tolerance of bf16 autocast against fp32 over the same 100 steps: every point of the
# 10-step averaged loss curve within 2%, and the mean over the last 20 steps within 1%.
BF16_CURVE_RTOL, BF16_FINAL_RTOL = 0.02, 0.01


def test_bf16_autocast_loss_curve_stays_within_stated_tolerance_of_fp32():
    batches, vocab = _char_batches(100)
    ref = _loss_curve(batches, vocab)
    bf = _loss_curve(batches, vocab, dtype=torch.bfloat16)
    assert not torch.equal(ref, bf)  # autocast really ran in bf16
    rel = ((_smooth(bf) - _smooth(ref)).abs() / _smooth(ref)).max()
    assert rel < BF16_CURVE_RTOL, f"max relative deviation {rel:.4f}"
    assert abs(bf[-20:].mean() - ref[-20:].mean()) / ref[-20:].mean() < BF16_FINAL_RTOL


def test_low_precision_adamw_with_fp32_state_equals_torch_adamw():
    # a small regression net: every gradient is well above noise (GPT's key bias has none)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_b = LowPrecisionAdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              state_dtype=torch.float32)
    for _ in range(10):
        x, y = torch.randn(32, 8), torch.randn(32, 4)
        for m, o in ((a, opt_a), (b, opt_b)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    st = opt_b.state[next(b.parameters())]
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(st)


def test_make_adamw_bf16_state_keeps_fp32_params_and_bf16_moments():
    m = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    opt, names = make_adamw(m, 1e-3, 0.1, state_dtype=torch.bfloat16)
    m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    p = m.transformer.wte.weight
    assert p.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert len(names) == len(list(m.parameters()))


def test_lr_time_ratio_takes_over_only_when_ahead_of_the_steps():
    args = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(60, **args, time_ratio=0.0) == lr_at(60, **args)
    assert lr_at(60, **args, time_ratio=0.2) == lr_at(60, **args)  # the steps are further along
    assert lr_at(60, **args, time_ratio=0.9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(60, **args, time_ratio=1.0) == 0.1
    assert lr_at(5, **args, time_ratio=0.9) == lr_at(5, **args)  # warmup is by steps


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16,
                max_steps=6, warmup_steps=2, eval_interval=0, log_interval=1, sample_tokens=10,
                progress=False, dtype="float32", max_time=0)
    base.update(kw)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


class _FakeClock:
    """A wall clock that advances 2 ms per reading, so a time budget is spent by counting, not by
    how fast this machine happens to be (no timed assertions in tests)."""

    def __init__(self):
        self.t = 1_000_000.0

    def time(self):
        self.t += 0.002
        return self.t

    perf_counter = monotonic = time


def test_max_time_ends_training_in_budget_with_lr_decayed_by_wall_clock(char_data, tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(train_mod, "time", clock)
    monkeypatch.setattr(optim_mod, "time", clock)  # the budget's clock
    monkeypatch.setattr(train_mod, "PROCESS_START", clock.t)
    cfg, mov = _cfg(char_data, tmp_path / "run", max_time=4, max_steps=10**7, warmup_steps=5, lr=1e-3,
                    min_lr=1e-4)
    res = train(cfg, mov, log=_silent)
    assert 5 < res.step < 10**7  # the budget, not max_steps, ended the run
    assert clock.t - train_mod.PROCESS_START <= 4.0 + 0.5  # ...within the budget, final eval included
    assert res.final_val_loss is not None and math.isfinite(res.final_val_loss)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r.get("lr") is not None]  # the step-0 val row has no lr yet
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] < 1e-4 + 0.1 * (1e-3 - 1e-4)  # the cosine has run (almost) to min_lr


def test_param_dtype_bf16_trains_bf16_copy_and_checkpoints_fp32_master(char_data, tmp_path):
    from safetensors.torch import load_file

    cfg, mov = _cfg(char_data, tmp_path / "run", param_dtype="bfloat16", dtype="bfloat16", lr=1e-2)
    res = train(cfg, mov, log=_silent)
    assert res.step == 6 and math.isfinite(res.final_val_loss)
    tensors = load_file(str(tmp_path / "run" / "ckpt_00000006" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    w = tensors["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(w, w.bfloat16().float())  # the master keeps fp32 precision


def test_fp16_trains_through_the_grad_scaler(char_data, tmp_path, monkeypatch):
    # fp16 is a CUDA mode; the CPU's fp16 autocast and GradScaler exercise the same code path
    monkeypatch.setattr(train_mod, "pick_dtype", lambda name, dev: torch.float16)
    monkeypatch.setattr(train_mod, "measure_peak_flops", lambda *a, **k: 1e12)  # fp16 GEMMs crawl on CPUs
    used = []
    real = torch.amp.GradScaler

    class Spy(real):
        def step(self, opt, *a, **k):
            used.append(self.get_scale())
            return super().step(opt, *a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    cfg, mov = _cfg(char_data, tmp_path / "run", dtype="float16")
    res = train(cfg, mov, log=_silent)
    assert len(used) == 6 and math.isfinite(res.final_val_loss)


def test_compile_failure_falls_back_to_eager(char_data, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    logs = []
    cfg, mov = _cfg(char_data, tmp_path / "run", compile=True)
    res = train(cfg, mov, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert res.step == 6 and math.isfinite(res.final_val_loss)
    assert any("torch.compile unavailable" in line for line in logs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,optimizer,rel", [("float32", "auto", 1e-3), ("bfloat16", "auto", 2e-2),
                                                ("bfloat16", "adamw", 2e-2)])
def test_compiled_training_matches_eager(char_data, tmp_path, dtype, optimizer, rel):
    # bfloat16 on a CPU trains a bf16 copy with fp32 masters (the default run's setting); its tied
    # embedding's sparse gradient, which Inductor cannot compile, stays dense under compile. With
    # AdamW, the update (gradients to fp32, clipping, AdamW, the bf16 copy) is one compiled pass.
    kw = dict(dtype=dtype, optimizer=optimizer, n_layer=2, n_embd=32, max_steps=30, grad_clip=0.5)
    res_e = train(*_cfg(char_data, tmp_path / "eager", **kw), log=_silent)
    logs = []
    res_c = train(*_cfg(char_data, tmp_path / "compiled", compile=True, **kw),
                  log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert dtype == "float32" or any("bf16 weights + fp32 master" in line for line in logs)
    assert any("compiled update" in line for line in logs) == (optimizer == "adamw")
    assert res_c.final_val_loss == pytest.approx(res_e.final_val_loss, rel=rel)
    rows = [json.loads(line) for line in (res_c.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r["train_loss"] for r in rows if r.get("train_loss") is not None)
    assert res_c.final_val_loss < 0.8 * first  # it learned: not a failure both runs share


def test_bench_train_cli_prints_json_lines_for_gptkit_and_transformers():
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "gptkit", "bench", "train", "--model", "gpt2-tiny", "--batch-size",
                          "2", "--block-size", "32", "--steps", "2", "--warmup", "1", "--dtype", "float32",
                          "--compare", "hf", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["system"] for r in rows] == ["gptkit", "transformers"]
    for r in rows:
        assert {"model", "batch_size", "block_size", "dtype", "median_step_s", "tok_per_s", "mfu"} <= set(r)
        assert (r["model"], r["batch_size"], r["block_size"], r["dtype"]) == ("gpt2-tiny", 2, 32, "float32")
        assert r["tok_per_s"] == pytest.approx(64 / r["median_step_s"], rel=1e-3)
        # MFU = (6N + 12·L·C·T) · tok/s / peak, gpt2-tiny: L=2, C=64
        flops_per_tok = 6 * r["params"] + 12 * 2 * 64 * 32
        assert r["mfu"] == pytest.approx(flops_per_tok * r["tok_per_s"] / r["peak_flops"], rel=1e-2, abs=1e-4)
        # training memory holds at least the fp32 weights, their gradients and AdamW's two moments
        # (the second system's figure too: the first's freed pages are not counted as reused)
        assert r["peak_mem_mib"] >= 4 * r["params"] * 4 / 2**20 * 0.9, r


def test_bench_rejects_unknown_compare_system():
    from gptkit.cli import main

    assert main(["bench", "train", "--model", "gpt2-tiny", "--compare", "llmc"]) == 2


def test_busy_cores_sees_another_process_spinning():
    from gptkit.runtime import _busy_cores

    if not Path("/proc/stat").exists():
        pytest.skip("needs Linux's /proc/stat")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert _busy_cores(0.3) >= 0.5
    finally:
        spin.kill()
        spin.wait()


@pytest.mark.slow
def test_bench_train_compile_runs_both_systems_compiled_with_their_training_memory():
    # --compile with bf16 weights crashed in gptkit's first backward (a sparse embedding gradient),
    # and its memory was measured uncompiled; now both run compiled, the peak counted after compiling
    pytest.importorskip("transformers")
    from gptkit.bench.train import bench_train

    rows = bench_train("gpt2-tiny", batch_size=2, block_size=32, dtype="bfloat16", steps=2, warmup=1,
                       compare=["hf"], compile=True, memory=True)
    assert [r["system"] for r in rows] == ["gptkit", "transformers"]
    assert rows[0]["weights"] == "bf16 + fp32 master"
    for r in rows:
        assert r["compile"] and r["median_step_s"] > 0
        # fp32 masters (or weights) and AdamW's two moments at least
        assert r["peak_mem_mib"] >= 3 * r["params"] * 4 / 2**20 * 0.9, r

"""LoRA runs: adapters-only training and checkpoints, exact resume, bf16 weights, torchrun, loading
through the base reference, and the bad-input errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.checkpoint import MODEL_FILE, OPTIM_FILE, read_state, read_tensors
from gptkit.config import resolve_config
from gptkit.errors import GptkitError
from gptkit.loading import load_checkpoint_model, load_model
from gptkit.lora import lora_layers
from gptkit.train import train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))


def _silent(*a, **k):
    pass


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), batch_size=4, block_size=16, max_steps=6, warmup_steps=2,
                eval_interval=0, log_interval=1, final_eval=False, sample_tokens=0, progress=False,
                dtype="float32", device="cpu")
    base.update(kw)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


@pytest.fixture
def base_run(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "base", n_layer=2, n_head=2, n_embd=16, max_steps=2)
    train(cfg, mov, log=_silent)
    return tmp_path / "base"


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_trains_adapters_only_and_checkpoints_hold_no_base_copy(char_data, base_run, tmp_path):
    run = tmp_path / "lora"
    cfg, mov = _cfg(char_data, run, init=base_run, lora_rank=4, lora_alpha=8, lora_targets="c_attn,c_fc", lr=1e-2)
    train(cfg, mov, log=_silent)
    ck = run / "ckpt_00000006"
    tensors, opt = read_tensors(ck / MODEL_FILE), read_tensors(ck / OPTIM_FILE)
    assert set(tensors) == {f"transformer.h.{i}.{m}.lora_{ab}.{m.split('.')[1]}" for i in (0, 1)
                            for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB"}
    assert {k.rsplit(".", 1)[0] for k in opt} == set(tensors)  # AdamW moments for the adapters alone
    state = read_state(ck)
    assert state["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["c_attn", "c_fc"],
                             "base": str((base_run / "ckpt_00000002").resolve())}
    # the run loads through its base reference, adapters merged: a plain GPT that differs from the base
    base = load_model(base_run).model
    merged = load_model(run).model
    unmerged = load_checkpoint_model(ck, merge=False).model
    assert not lora_layers(merged) and lora_layers(unmerged)
    assert set(merged.state_dict()) == set(base.state_dict())
    for k, v in base.state_dict().items():  # untargeted weights are the base's, bit for bit
        assert torch.equal(v, merged.state_dict()[k]) == ("c_attn.weight" not in k and "c_fc.weight" not in k), k
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        assert (merged(idx) - unmerged(idx)).abs().max() < 1e-5


def test_lora_resume_reproduces_an_uninterrupted_run_exactly(char_data, base_run, tmp_path):
    common = dict(init=base_run, lora_rank=2, lora_dropout=0.1, max_steps=6, decay_steps=6, lr=1e-2)
    train(*_cfg(char_data, tmp_path / "straight", **common), log=_silent)
    train(*_cfg(char_data, tmp_path / "split", **{**common, "max_steps": 3}), log=_silent)
    train(*_cfg(char_data, tmp_path / "split", **common), resume=True, log=_silent)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
    assert len(_losses(tmp_path / "split")) == 6


def test_lora_with_bf16_weights_keeps_the_base_frozen(char_data, base_run, tmp_path):
    run = tmp_path / "bf16"
    cfg, mov = _cfg(char_data, run, init=base_run, lora_rank=4, dtype="bfloat16", param_dtype="bfloat16", lr=1e-2)
    train(cfg, mov, log=_silent)
    assert all(np.isfinite(_losses(run)))
    base, merged = load_model(base_run).model.state_dict(), load_model(run).model.state_dict()
    assert torch.equal(base["transformer.h.0.mlp.c_fc.weight"], merged["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(base["transformer.h.0.attn.c_attn.weight"], merged["transformer.h.0.attn.c_attn.weight"])


def test_lora_keys_without_init_are_an_error(char_data, tmp_path):
    with pytest.raises(GptkitError, match="no --init") as e:
        _cfg(char_data, tmp_path / "r", lora_rank=8)
    assert e.value.where == "lora_rank"


def test_unknown_lora_target_is_an_error_through_the_cli(char_data, base_run, tmp_path):
    from gptkit.cli import main

    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--init", str(base_run), "--data", str(char_data),
                        "--out", str(tmp_path / "x"), "lora_rank=4", "lora_targets=q_proj", "max_steps=1",
                        "block_size=16", "device=cpu"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown LoRA target module 'q_proj'")
    assert "c_attn" in r.stderr and "Traceback" not in r.stderr
    assert main(["train", "--data", str(char_data), "--out", str(tmp_path / "y"), "lora_rank=4"]) == 2


@pytest.mark.slow
def test_lora_under_torchrun_two_ranks_equals_one_process(char_data, base_run, tmp_path):
    common = ["--data", str(char_data), "--init", str(base_run), "lora_rank=4", "batch_size=4", "block_size=16",
              "max_steps=4", "warmup_steps=1", "eval_interval=0", "log_interval=1", "final_eval=false",
              "sample_tokens=0", "progress=false", "dtype=float32", "device=cpu", "grad_accum=4", "lr=1e-2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "gptkit", "train", "--out", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gptkit", "train", "--out", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    assert set(read_tensors(tmp_path / "two" / "ckpt_00000004" / MODEL_FILE)) == \
        set(read_tensors(tmp_path / "one" / "ckpt_00000004" / MODEL_FILE))


def test_peft_export_loads_in_peft_onto_the_base_hf_export_with_equal_logits(char_data, base_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gptkit.convert import convert

    run = tmp_path / "lora"
    cfg, mov = _cfg(char_data, run, init=base_run, lora_rank=4, lora_targets="c_attn,c_proj", lr=1e-2)
    train(cfg, mov, log=_silent)
    convert(base_run, tmp_path / "base_hf", "hf")
    res = convert(run, tmp_path / "adapters", "peft")
    assert sorted(f.name for f in res.files) == ["adapter_config.json", "adapter_model.safetensors"]
    convert(run, tmp_path / "merged_hf", "hf")

    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base_hf").float().eval()
    pm = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapters").eval()
    hf_merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged_hf").float().eval()
    ours = load_model(run).model
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(idx)
        got = pm(input_ids=idx).logits
        merged = hf_merged(input_ids=idx).logits
        with pm.disable_adapter():
            base_logits = pm(input_ids=idx).logits
    assert (got - want).abs().max() < 1e-5
    assert (merged - want).abs().max() < 1e-5
    assert (base_logits - want).abs().max() > 1e-3  # the adapters change the model: the test has teeth


def test_peft_export_of_a_run_without_lora_is_an_error(base_run, tmp_path):
    from gptkit.convert import convert

    with pytest.raises(GptkitError, match="not a LoRA run"):
        convert(base_run, tmp_path / "x", "peft")


@pytest.mark.slow
def test_lora_run_killed_with_sigkill_resumes_on_the_uninterrupted_curve(char_data, base_run, tmp_path):
    import signal
    import time

    from test_kill_resume import _last_step

    def args(out):
        return [sys.executable, "-m", "gptkit", "train", "--data", str(char_data), "--init", str(base_run), "--out",
                str(out), "--threads", "1", "lora_rank=4", "lora_dropout=0.1", "batch_size=4", "block_size=16",
                "max_steps=40", "warmup_steps=2", "eval_interval=0", "log_interval=1", "ckpt_interval=3",
                "keep_last=2", "final_eval=false", "sample_tokens=0", "progress=false", "dtype=float32",
                "device=cpu", "lr=1e-2"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(args(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(args(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while _last_step(run) < 14 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(args(run) + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(run) == _losses(tmp_path / "straight")


def test_lora_run_on_a_llama_base_exports_to_peft_with_equal_logits(char_data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    from gptkit.convert import convert
    from gptkit.data import read_meta

    meta = read_meta(char_data)
    cfg = GPTConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                    vocab_size=meta["vocab_size"], block_size=32)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", 0, GPT(cfg), {"model_config": cfg.to_dict(), "chars": meta["chars"]})
    run = tmp_path / "lora"
    train(*_cfg(char_data, run, init=tmp_path / "base", lora_rank=4, lr=1e-2, lora_targets="q_proj,v_proj,up_proj"),
          log=_silent)
    assert read_state(run / "ckpt_00000006")["lora"]["targets"] == ["q_proj", "v_proj", "up_proj"]
    convert(tmp_path / "base", tmp_path / "base_hf", "hf")
    convert(run, tmp_path / "adapters", "peft")
    pm = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base_hf").float(), tmp_path / "adapters").eval()
    ours = load_model(run).model
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (pm(input_ids=idx).logits - ours(idx)).abs().max() < 1e-5
        with pm.disable_adapter():
            assert (pm(input_ids=idx).logits - ours(idx)).abs().max() > 1e-3


@pytest.mark.slow
def test_bench_lora_measures_full_and_lora_side_by_side():
    from gptkit.bench.train import bench_lora_memory

    full, lo = bench_lora_memory("gpt2-tiny", batch_size=2, block_size=16, dtype="float32", steps=1, warmup=1,
                                 device="cpu", lora_rank=4)
    assert (full["mode"], lo["mode"]) == ("full", "lora")
    assert full["trainable_params"] == full["params"]
    assert lo["trainable_params"] == 2 * 4 * (64 + 192)  # 2 layers x c_attn's A (4, 64) and B (192, 4)
    assert full["peak_mem_mib"] > 0 and lo["peak_mem_mib"] > 0
    assert {"model", "batch_size", "block_size", "dtype", "median_step_s", "tok_per_s", "mfu"} <= set(lo)

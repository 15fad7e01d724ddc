"""Scale-out: torchrun under gloo on the CPU gives the losses of one process doing all the work.

2 ranks x accumulation k must equal 1 process x accumulation 2k (the ranks of one step together
draw the same batches, and averaging gradients over ranks equals averaging over micro-steps).
The torchrun tests start real processes and are slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.data import TokenLoader

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))
COMMON = ["n_layer=2", "n_head=2", "n_embd=16", "batch_size=4", "block_size=16", "warmup_steps=2",
          "eval_interval=0", "log_interval=1", "final_eval=false", "sample_tokens=1", "progress=false",
          "dtype=float32", "device=cpu", "seed=7",
          # AdamW: these compare data-parallel training with one process to 1e-5 (and FSDP, which
          # `optimizer=auto` gives AdamW); Muon's bf16 Newton-Schulz would amplify all-reduce rounding
          "optimizer=adamw"]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_two_ranks_draw_the_same_batches_as_one_process(char_data, mode):
    k = 3  # micro-steps per rank; one process does 2k
    single = TokenLoader(char_data, "train", 4, 16, mode=mode, seed=5)
    ranks = [TokenLoader(char_data, "train", 4, 16, mode=mode, seed=5, rank=r, world_size=2) for r in range(2)]
    for _step in range(3):
        one = sorted(map(tuple, torch.cat([single.next_batch()[0] for _ in range(2 * k)]).tolist()))
        two = sorted(map(tuple, torch.cat([ranks[r].next_batch()[0] for r in (0, 1) for _ in range(k)]).tolist()))
        assert one == two


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gptkit", "train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _single(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", *args], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["fsdp=true", "activation_checkpointing=true"]], ids=["ddp", "fsdp"])
def test_two_ranks_times_k_equal_one_process_times_2k(char_data, tmp_path, extra):
    k, steps = 2, 5
    common = ["--data", str(char_data), *COMMON, f"max_steps={steps}", "ckpt_interval=2"]
    _single(["--out", str(tmp_path / "one"), *common, f"grad_accum={2 * k}"])
    r = _torchrun(2, ["--out", str(tmp_path / "two"), *common, f"grad_accum={2 * k}", *extra])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == steps
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    # rank 0 alone logs and writes: one set of lines, one metrics file, checkpoints at 2, 4, 5
    assert r.stdout.count("done: ") == 1
    assert sorted(p.name for p in (tmp_path / "two").glob("ckpt_*"))[-1] == "ckpt_00000005"
    # the checkpoint holds full tensors: it resumes in a single process, on the same curve
    from gptkit.loading import load_checkpoint_model

    sd_two = load_checkpoint_model(tmp_path / "two" / "ckpt_00000005").model.state_dict()
    sd_one = load_checkpoint_model(tmp_path / "one" / "ckpt_00000005").model.state_dict()
    for name in sd_one:
        torch.testing.assert_close(sd_two[name], sd_one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_resume_continues_the_same_curve(char_data, tmp_path):
    """Stop a 2-rank FSDP run at step 3, resume it under DDP with 2 ranks: same losses as straight."""
    common = ["--data", str(char_data), *COMMON, "grad_accum=2", "dropout=0.1", "decay_steps=6"]
    _torchrun(2, ["--out", str(tmp_path / "straight"), *common, "max_steps=6"])
    _torchrun(2, ["--out", str(tmp_path / "split"), *common, "max_steps=3", "fsdp=true"])
    _torchrun(2, ["--out", str(tmp_path / "split"), *common, "max_steps=6", "--resume"])
    np.testing.assert_allclose(_losses(tmp_path / "split"), _losses(tmp_path / "straight"), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_changes_no_math(char_data, tmp_path, monkeypatch):
    from gptkit.config import resolve_config
    from gptkit.model import MLP
    from gptkit.train import train

    calls = []
    mlp_forward = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: (calls.append(torch.is_grad_enabled()), mlp_forward(self, x))[1])

    def run(name, **kw):
        calls.clear()
        ov = {"data": str(char_data), "out": str(tmp_path / name), "max_steps": "3", "eval_interval": "0",
              "final_eval": "false", "sample_tokens": "0", **dict(a.split("=") for a in COMMON), **kw}
        cfg, mov = resolve_config(None, ov)
        train(cfg, mov, log=lambda *a, **k: None)
        return _losses(tmp_path / name), sum(calls)  # MLP forwards with grad enabled: training, not eval

    plain, plain_calls = run("plain", dropout="0.1")
    ckpt, ckpt_calls = run("ckpt", dropout="0.1", activation_checkpointing="true")
    assert plain == ckpt
    # each block's forward ran again during backward: the recompute happened
    assert plain_calls > 0 and ckpt_calls == 2 * plain_calls

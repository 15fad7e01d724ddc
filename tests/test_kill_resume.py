"""The kill test: `kill -9` a training process at 5 random moments, resume it each time, and the
run's loss sequence equals an uninterrupted run's exactly. No checkpoint is ever left unreadable.

Dropout is on, so the RNG states in the checkpoints are exercised too. Checkpoints are written
every 3 steps with keep_last=2, so kills land before, during and after saves and prunes.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptkit.checkpoint import OPTIM_FILE, list_checkpoints, read_state, read_tensors
from gptkit.loading import load_checkpoint_model
from gptkit.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))
STEPS = 150


def _args(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(out), "--threads", "1",
            "n_layer=2", "n_head=2", "n_embd=32", "batch_size=8", "block_size=32", f"max_steps={STEPS}",
            "warmup_steps=10", "dropout=0.1", "eval_interval=50", "eval_batches=2", "log_interval=1",
            "ckpt_interval=3", "keep_last=2", "final_eval=false", "sample_tokens=1", "progress=false",
            "dtype=float32", "device=cpu", "seed=3"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when the process died
            pass
    return out


def _last_step(run: Path) -> int:
    return max((r["step"] for r in _records(run)), default=0)


def _assert_every_checkpoint_readable(run: Path):
    for ck in sorted(run.glob("ckpt_*")):  # every visible checkpoint directory, not only complete ones
        assert ck in list_checkpoints(run), f"{ck.name} is visible but incomplete"
        state = read_state(ck)
        load_checkpoint_model(ck)
        read_tensors(ck / OPTIM_FILE)
        assert state["step"] == int(ck.name.split("_")[1])


@pytest.mark.slow
def test_kill_9_at_five_random_moments_then_resume_equals_uninterrupted_run(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text(TEXT)
    data = prepare(str(src), tokenizer="char", out=tmp_path / "data")

    straight = tmp_path / "straight"
    r = subprocess.run(_args(data, straight), capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    resume = []
    while kills < 5:
        proc = subprocess.Popen(_args(data, run) + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env())
        # a random moment while it trains: once it has logged a random later step, plus up to 20 ms
        target = rng.randint(_last_step(run) + 1, _last_step(run) + (STEPS - _last_step(run)) // 3)
        deadline = time.time() + 300
        while _last_step(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        assert proc.poll() is None, f"the run finished before kill {kills + 1}: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        _assert_every_checkpoint_readable(run)
        resume = ["--resume"]

    r = subprocess.run(_args(data, run) + resume, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_every_checkpoint_readable(run)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"

    def losses(run_dir):
        return [(x["step"], x.get("train_loss"), x.get("val_loss")) for x in _records(run_dir)]

    want = losses(straight)
    # a val loss of the initial weights at step 0, then one record per step; the val loss at step 50
    # shares the step's record
    assert len(want) == STEPS + 1 and want[0][:2] == (0, None) and want[50][2] is not None
    assert losses(run) == want

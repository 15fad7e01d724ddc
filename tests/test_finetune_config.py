"""finetune-shakespeare.toml: llm.c's headline fine-tune, run end to end on a stand-in.

OpenAI's weights cannot be downloaded here, so --init points at a tiny random GPT-2 with GPT-2's
vocabulary that transformers saved; everything else comes from the config file."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_hf_model
from gptkit.config import resolve_config

CONFIG = ROOT / "gptkit" / "configs" / "finetune-shakespeare.toml"


def test_config_holds_llmc_finetune_settings():
    cfg, model_overrides = resolve_config(CONFIG)
    assert (cfg.init, cfg.dataset, cfg.batch_size, cfg.block_size, cfg.max_steps) == ("gpt2", "shakespeare", 4, 64, 40)
    assert (cfg.lr, cfg.min_lr, cfg.eval_interval) == (1e-4, 1e-4, 10)
    assert model_overrides == {}
    assert (cfg.sample_temperature, cfg.sample_top_k, cfg.sample_top_p) == (0.8, 50, 0.95)


def test_shipped_config_is_found_by_bare_name():
    assert resolve_config("finetune-shakespeare.toml") == resolve_config(CONFIG)
    assert resolve_config("finetune-shakespeare") == resolve_config(CONFIG)


def run_config(tmp_path, *overrides):
    standin = tmp_path / "gpt2-standin"
    make_hf_model(standin, vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                  bos_token_id=50256, eos_token_id=50256)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--config", CONFIG, "--init", standin,
                        "--out", tmp_path / "run", "progress=false", *overrides],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return r, rows


def test_finetune_config_trains_from_a_random_standin(tmp_path, shakespeare_path):
    # the config as shipped, cut to 12 steps and a short eval so the default suite stays fast
    r, rows = run_config(tmp_path, "max_steps=12", "eval_batches=2", "final_eval=false")
    assert max(row["step"] for row in rows) == 12
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 10]  # llm.c also reports step 0
    assert "--- sample ---" in r.stdout + r.stderr
    assert list((tmp_path / "run").glob("ckpt_00000012"))


@pytest.mark.slow  # 40 steps + the whole val split: about a minute on a busy 2-core CPU
def test_finetune_config_runs_all_40_steps_with_random_weights(tmp_path, shakespeare_path):
    r, rows = run_config(tmp_path)
    assert max(row["step"] for row in rows) == 40
    assert [row["step"] for row in rows if "val_loss" in row and not row.get("final")] == [0, 10, 20, 30]
    final = [row for row in rows if row.get("final")]
    assert final and final[0]["step"] == 40
    assert list((tmp_path / "run").glob("ckpt_00000040"))

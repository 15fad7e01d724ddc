"""The trainer: run-directory layout, metrics, checkpoints, exact resume, configs, the default job."""

import json
import math

import pytest

from gptkit.config import TrainConfig
from gptkit.errors import GptkitError
from gptkit.optim import lr_at
from gptkit.config import resolve_config
from gptkit.train import train

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16,
                max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=2, sample_tokens=20,
                progress=False, dtype="float32")
    base.update(kw)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


def _silent(*a, **k):
    pass


def test_run_directory_holds_config_metrics_and_checkpoints(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "run", ckpt_interval=3, keep_last=5)
    res = train(cfg, mov, log=_silent)
    run = tmp_path / "run"
    assert (run / "config.toml").is_file()
    assert sorted(p.name for p in run.glob("ckpt_*")) == ["ckpt_00000003", "ckpt_00000006"]
    ck = run / "ckpt_00000006"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 6 and state["chars"] and state["model_config"]["n_embd"] == 16
    assert state["loader"]["step"] == 6 and "torch" in state["rng"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the val loss of the initial weights, logged every 2 steps, an eval at 3, the final eval
    assert [r["step"] for r in rows] == [0, 2, 3, 4, 6, 6]
    for r in rows:
        assert {"step", "tokens", "elapsed_s", "train_loss", "lr", "tok_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 16
    assert any("val_loss" in r and r["step"] == 3 for r in rows)
    for r in rows:  # every row, eval-only and final ones too, carries INTERFACES.md's fields
        assert {"step", "tokens", "elapsed_s", "train_loss", "lr", "tok_per_s", "mfu"} <= set(r), r
    assert rows[-1]["final"] and rows[-1]["val_loss"] == res.final_val_loss
    assert res.final_val_loss is not None and math.isfinite(res.final_val_loss)
    assert res.sample is not None and len(res.sample) == 20


def test_keep_last_prunes_old_checkpoints(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "run", ckpt_interval=1, keep_last=2, final_eval=False, sample_tokens=1)
    train(cfg, mov, log=_silent)
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*")) == ["ckpt_00000005", "ckpt_00000006"]


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # with dropout the RNG state must be restored too
def test_resume_reproduces_an_uninterrupted_run_exactly(char_data, tmp_path, dropout):
    # one thread, fixed: threads=0 picks 1 or 2 by how busy the cores are (and drops to 1 mid-run
    # when throughput halves), and two thread counts sum in different orders
    common = dict(max_steps=8, decay_steps=8, log_interval=1, eval_interval=0, final_eval=False, sample_tokens=1,
                  dropout=dropout, threads=1)
    cfg, mov = _cfg(char_data, tmp_path / "straight", **common)
    train(cfg, mov, log=_silent)
    cfg, mov = _cfg(char_data, tmp_path / "split", **{**common, "max_steps": 4})
    train(cfg, mov, log=_silent)
    cfg, mov = _cfg(char_data, tmp_path / "split", **common)
    train(cfg, mov, resume=True, log=_silent)

    def losses(run):
        return [json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("straight") == losses("split")


def test_existing_run_without_resume_is_refused(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "run", max_steps=1, final_eval=False, sample_tokens=1)
    train(cfg, mov, log=_silent)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(GptkitError, match="already holds a run"):
        train(cfg, mov, log=_silent)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_toml_config_with_model_table_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.001\nmax_steps = 50\n[model]\nn_layer = 3\nn_embd = 48\n')
    cfg, mov = resolve_config(f, {"max_steps": "7", "n_head": "4"})
    assert cfg.lr == 0.001 and cfg.max_steps == 7
    assert mov == {"n_layer": 3, "n_embd": 48, "n_head": 4}
    f.write_text("lr_typo = 1\n")
    with pytest.raises(GptkitError, match="lr_typo"):
        resolve_config(f, {})


def test_naming_max_steps_turns_the_main_jobs_time_budget_off(tmp_path):
    assert TrainConfig().max_time == 110.0
    assert resolve_config(None, {})[0].max_time == 110.0
    assert resolve_config(None, {"max_steps": "50"})[0].max_time == 0.0
    assert resolve_config(None, {"max_steps": "50", "max_time": "30"})[0].max_time == 30.0
    f = tmp_path / "c.toml"
    f.write_text("max_steps = 50\n")
    assert resolve_config(f, {})[0].max_time == 0.0


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:100], lrs[10:100]))
    assert lrs[100] == lrs[119] == 0.1
    assert lrs[55] == pytest.approx(0.1 + 0.5 * 0.9, abs=1e-9)  # cosine midpoint


def test_weight_decay_only_on_matrices():
    from gptkit import GPT, GPTConfig
    from gptkit.optim import make_adamw

    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=20))
    opt, names = make_adamw(m, 1e-3, 0.1)
    decayed = {names[i] for i, p in enumerate(opt.param_groups[0]["params"])}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "ln_" not in n for n in decayed)
    assert "transformer.wte.weight" in decayed and "lm_head.weight" not in names.values()


def test_default_job_prepares_nanogpt_char_split(tmp_path, monkeypatch, shakespeare_path):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(max_steps=2, eval_interval=0, final_eval=False, sample_tokens=5, progress=False,
                      batch_size=2)
    res = train(cfg, log=_silent)
    assert res.run_dir.parent.name == "runs"
    from gptkit.data import read_meta
    from gptkit.prepare import default_dataset_dir

    meta = read_meta(default_dataset_dir("shakespeare-char"))
    assert meta["vocab_size"] == 65 and meta["val_tokens"] == 111_540 and meta["train_tokens"] == 1_003_854


def test_sample_tokens_zero_turns_the_samples_off(char_data, tmp_path):
    """Like every other *_interval/*_tokens knob, 0 means off: no sample at the end or on the way."""
    lines = []
    cfg, mov = _cfg(char_data, tmp_path / "run", sample_tokens=0, sample_interval=2, final_eval=False)
    res = train(cfg, mov, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert res.sample is None
    assert not any("--- sample" in x for x in lines), lines
    assert res.step == 6


@pytest.mark.parametrize("grad_clip,grad_accum,eps", [(1e-3, 1, 1e-6), (0.0, 2, 1e-3)],
                         ids=["clip", "accumulate"])
def test_training_steps_equal_clip_grad_norm_and_torch_adamw(char_data, tmp_path, grad_clip, grad_accum, eps):
    """Three steps end at the weights that the mean micro-batch loss, clip_grad_norm_ and
    torch.optim.AdamW reach from the same initial weights and batches. With grad_clip=1e-3 every
    step is clipped (without it the weights differ); a large eps makes AdamW see the gradient's scale,
    so accumulation must average, not sum."""
    import torch

    from gptkit.checkpoint import find_checkpoint
    from gptkit.loading import load_checkpoint_model
    from gptkit.data import TokenLoader
    from gptkit.model import GPT
    from gptkit.optim import param_groups

    common = dict(max_steps=3, warmup_steps=1, decay_steps=3, eval_interval=0, final_eval=False, sample_tokens=0,
                  dropout=0.0, grad_accum=grad_accum, eps=eps, ckpt_interval=3, batch_size=2,
                  optimizer="adamw")  # from scratch, `auto` would be Muon

    def weights(name, **kw):
        cfg, mov = _cfg(char_data, tmp_path / name, **{**common, **kw})
        train(cfg, mov, log=_silent)
        return cfg, load_checkpoint_model(find_checkpoint(tmp_path / name)).model

    cfg, trained = weights("run", grad_clip=grad_clip)
    torch.manual_seed(cfg.seed)  # the trainer's initial weights: GPT-2 init right after seeding
    model = GPT(trained.config).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=eps)
    loader = TokenLoader(char_data, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps)
        for _ in range(grad_accum):
            x, y = loader.next_batch()
            (model(x, y)[1] / grad_accum).backward()
        if grad_clip:
            assert torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) > grad_clip  # the clip is active
        opt.step()
        opt.zero_grad()
    ref = dict(model.named_parameters())
    err = max((p - ref[n]).abs().max().item() for n, p in trained.named_parameters())
    assert err < 1e-6, err
    if grad_clip:
        _, unclipped = weights("unclipped", grad_clip=0.0)
        gap = max((p - ref[n]).abs().max().item() for n, p in unclipped.named_parameters())
        assert gap > 1e-5, gap

"""A NaN or inf loss or gradient skips the step (counted and logged); too many stop the run with
one clear line, and the checkpoints already written stay good."""

import json

import pytest
import torch

from gptkit.checkpoint import list_checkpoints
from gptkit.loading import load_checkpoint_model
from gptkit.cli import main
from gptkit.model import GPT
from gptkit.config import resolve_config
from gptkit.train import train

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(200))


def _overrides(data, out, **kw):
    base = dict(data=str(data), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16,
                max_steps=8, warmup_steps=1, eval_interval=0, log_interval=1, final_eval="false", sample_tokens=1,
                progress="false", dtype="float32", device="cpu")
    base.update(kw)
    return {k: str(v) for k, v in base.items()}


def _poison(monkeypatch, bad_calls, kind):
    """Make training forward number i (0-based) in `bad_calls` give a NaN loss or a NaN gradient."""
    real = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = real(self, idx, targets, **kw)
        if targets is None or not self.training:
            return out
        i, calls["n"] = calls["n"], calls["n"] + 1
        if (i >= bad_calls) if isinstance(bad_calls, int) else (i in bad_calls):
            logits, loss = out
            if kind == "loss":
                loss = loss * float("nan")
            else:  # loss unchanged, gradient NaN: d sqrt(u)/du is inf at u = 0, times du/dw = 0
                w = self.transformer.wpe.weight
                loss = loss + torch.sqrt(w.sum() * 0.0)
            out = (logits, loss)
        return out

    monkeypatch.setattr(GPT, "forward", forward)
    steps = {"n": 0}
    real_step = torch.optim.AdamW.step

    def counted(self, *a, **k):
        steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return steps


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_step_is_skipped_counted_and_logged(char_data, tmp_path, monkeypatch, kind):
    steps = _poison(monkeypatch, {2, 5}, kind)  # steps 3 and 6
    lines = []
    cfg, mov = resolve_config(None, _overrides(char_data, tmp_path / "run", ckpt_interval=4))
    res = train(cfg, mov, log=lines.append)
    assert res.step == 8 and steps["n"] == 6  # AdamW ran on the 6 good steps only
    assert [x for x in lines if "skipped" in x] == [f"step 3: non-finite {kind}, step skipped (1 so far)",
                                                    f"step 6: non-finite {kind}, step skipped (2 so far)"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3, 6]
    assert rows[-1]["skipped_steps"] == 2
    for ck in list_checkpoints(tmp_path / "run"):
        m = load_checkpoint_model(ck).model  # refuses NaN weights
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_too_many_non_finite_steps_stop_with_one_line_and_keep_the_checkpoints(char_data, tmp_path, monkeypatch,
                                                                               capsys):
    _poison(monkeypatch, 3, "loss")  # every step from the 4th on
    ov = _overrides(char_data, tmp_path / "run", ckpt_interval=2, max_bad_steps=2)
    rc = main(["train"] + [f"{k}={v}" for k, v in ov.items()])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in "".join(err)
    assert err[0].startswith("error: training diverged: 3 steps with a non-finite loss or gradient (max_bad_steps=2)")
    cks = list_checkpoints(tmp_path / "run")
    assert [c.name for c in cks] == ["ckpt_00000002", "ckpt_00000004"]  # none at step 6, where it stopped
    for ck in cks:
        load_checkpoint_model(ck)

"""Run logs a person can read: the progress bar, TensorBoard and W&B beside metrics.jsonl, `gptkit plot`."""

import json
import os
import time

import pytest

from gptkit.cli import main
from gptkit.config import resolve_config
from gptkit.train import train

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(200))


def _run(data, out, **kw):
    base = dict(data=str(data), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16,
                max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=1, final_eval="true",
                sample_tokens=1, progress="false", dtype="float32", device="cpu")
    base.update(kw)
    cfg, mov = resolve_config(None, {k: str(v) for k, v in base.items()})
    return train(cfg, mov, log=lambda *a, **k: None)


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_progress_bar_shows_step_loss_tok_s_mfu_and_eta(char_data, tmp_path, capsys, monkeypatch):
    import gptkit.metrics

    monkeypatch.setattr(gptkit.metrics, "on_terminal", lambda: True)
    _run(char_data, tmp_path / "run", progress="true", final_eval="false")
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "step 6/6" in last and "ETA" in last
    for key in ("loss=", "tok_s=", "mfu="):
        assert key in last, last


def test_tensorboard_logger_records_the_same_scalars(char_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(char_data, run, loggers="tensorboard")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = _metrics(run)
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = [(r["step"], r["train_loss"]) for r in rows if not r.get("final") and r["step"]]  # the final row repeats the last
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3]  # the initial weights' val loss, then step 3
    assert len(acc.Scalars("train/lr")) == 6 and len(acc.Scalars("val/final_loss")) == 1


def test_wandb_logger_offline(char_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run = tmp_path / "run"
    _run(char_data, run, loggers="wandb")
    run_id = (run / "wandb_id").read_text()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    records = b""
    for _ in range(100):  # W&B's writer process may still be flushing after finish()
        records = next(offline[0].glob("*.wandb")).read_bytes()  # protobuf records name the logged keys
        if b"final_val_loss" in records:
            break
        time.sleep(0.1)
    for key in (b"train_loss", b"val_loss", b"lr", b"tok_per_s", b"final_val_loss"):
        assert key in records


def test_unknown_logger_is_a_user_error(capsys):
    rc = main(["train", "loggers=tensorboard,mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: unknown logger 'mlflow' (loggers)")


def test_plot_draws_a_png_of_the_run(char_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _run(char_data, run)
    assert main(["plot", str(run)]) == 0
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0 and out.is_file()
    import matplotlib.image

    img = matplotlib.image.imread(str(out))
    assert img.shape[0] > 300 and img.shape[1] > 2 * img.shape[0] - 200  # two panels side by side


def test_plot_of_a_directory_without_metrics_is_a_user_error(tmp_path, capsys):
    rc = main(["plot", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no metrics.jsonl in the run directory")
    assert not os.listdir(tmp_path)

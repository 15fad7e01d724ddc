"""Run logs: metrics.jsonl always, TensorBoard and Weights & Biases on request (`loggers=...`).

metrics.jsonl (INTERFACES.md) holds one JSON object per logged step. It is the record a resumed
run continues: on resume, records past the checkpoint's step (written before a crash, and about
to be written again) and a half-written last line are dropped, so the file reads as one run.

TensorBoard needs the `tensorboard` package and W&B the `wandb` package (extras `tensorboard`
and `wandb`); both are imported only when asked for. W&B honours its own environment, e.g.
WANDB_MODE=offline.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

METRICS_FILE = "metrics.jsonl"
SCALARS = ("train_loss", "val_loss", "lr", "tok_per_s", "mfu", "skipped_steps")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a damaged last line, left by a crash, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise GptkitError(f"no {METRICS_FILE} in the run directory", run_dir, "give a directory written by `gptkit train`")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records with step <= last_step (rewritten atomically)."""
    if not path.is_file():
        return
    keep = [json.dumps(r) for r in read_metrics(path.parent) if r["step"] <= last_step and not r.get("final")]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


class RunLogger:
    """Fans each record out to metrics.jsonl and the optional loggers named in cfg.loggers."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.sinks = []
        names = [n.strip() for n in cfg.loggers.split(",") if n.strip()]
        if "tensorboard" in names:
            self.sinks.append(TensorBoardSink(run_dir))
        if "wandb" in names:
            self.sinks.append(WandbSink(run_dir, cfg))

    def log(self, rec: dict[str, Any]) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        for s in self.sinks:
            s.log(rec)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        for s in self.sinks:
            s.close()
        self.sinks = []


class TensorBoardSink:
    """Scalars under train/, val/ and perf/ in RUN_DIR/tensorboard, x = step."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptkitError("the tensorboard logger needs the tensorboard package", "loggers",
                              "pip install 'gptkit[tensorboard]' or drop tensorboard from loggers") from None
        self.w = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, rec: dict[str, Any]) -> None:
        tags = {"train_loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "tok_per_s": "perf/tok_per_s",
                "mfu": "perf/mfu", "skipped_steps": "train/skipped_steps"}
        for k, tag in tags.items():
            if k in rec and not rec.get("final"):
                self.w.add_scalar(tag, rec[k], rec["step"])
        if rec.get("final"):
            self.w.add_scalar("val/final_loss", rec["val_loss"], rec["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbSink:
    """One W&B run per run directory (its id is kept in RUN_DIR/wandb_id, so a resume continues it)."""

    def __init__(self, run_dir: Path, cfg):
        try:
            import wandb
        except ImportError:
            raise GptkitError("the wandb logger needs the wandb package", "loggers",
                              "pip install 'gptkit[wandb]' or drop wandb from loggers") from None
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                              name=Path(run_dir).name, config=cfg.to_dict())

    def log(self, rec: dict[str, Any]) -> None:
        data = {k: rec[k] for k in SCALARS if k in rec}
        if rec.get("final"):
            data = {"final_val_loss": rec["val_loss"]}
        data["tokens"] = rec.get("tokens", 0)
        self.run.log(data, step=rec["step"])

    def close(self) -> None:
        self.run.finish()

"""Run logs: metrics.jsonl always, TensorBoard and Weights & Biases on request (`loggers=...`).

metrics.jsonl (INTERFACES.md) holds one JSON object per logged step. It is the record a resumed
run continues: on resume, records past the checkpoint's step (written before a crash, and about
to be written again) and a half-written last line are dropped, so the file reads as one run.

TensorBoard needs the `tensorboard` package and W&B the `wandb` package (extras `tensorboard`
and `wandb`); both are imported only when asked for. W&B honours its own environment, e.g.
WANDB_MODE=offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

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


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(loggers: str) -> None:
    """Fail (before anything is written) when a logger named in `loggers` lacks its package."""
    for name in (n.strip() for n in loggers.split(",")):
        pkg = LOGGER_PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise GptkitError(f"the {name} logger needs the {pkg} package", "loggers",
                              f"pip install 'gptkit[{name}]' or drop {name} from loggers")


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
            if rec.get(k) is not None and not rec.get("final"):
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
        data = {k: rec[k] for k in SCALARS if rec.get(k) is not None}
        if rec.get("final"):
            data = {"final_val_loss": rec["val_loss"]}
        data["tokens"] = rec.get("tokens", 0)
        self.run.log(data, step=rec["step"])

    def close(self) -> None:
        self.run.finish()


class Speedometer:
    """tok/s and MFU between logged steps, and whether the speed fell to under half its best (other
    work took the cores)."""

    def __init__(self, step: int, tokens_per_step: int, flops_per_step: float, peak_flops: float):
        self.t, self.step = time.time(), step
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.last, self.best = 0.0, 0.0

    def measure(self, now: float, step: int) -> tuple[float, float]:
        dt, steps = max(now - self.t, 1e-9), step - self.step
        self.t, self.step = now, step
        self.last = steps * self.tokens_per_step / dt
        self.best = max(self.best, self.last)
        return self.last, self.flops_per_step * steps / dt / self.peak

    def stalled(self) -> bool:
        return self.last < 0.5 * self.best


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """What a person watching the run sees: on a terminal, a tqdm bar (step n/total, elapsed and ETA,
    loss, tok/s and MFU); elsewhere (a log file, a pipe), plain `step N: loss ...` lines as nanoGPT
    prints them, at most one a second. Under a time budget the bar's total is the projected last
    step, and the percentage never goes back when a projection grows."""

    def __init__(self, total: int, initial: int, enabled: bool, log):
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and on_terminal()), dynamic_ncols=True,
                        unit="step",
                        bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]")
        self.log, self.plain = log, enabled and self.bar.disable
        self.last_plain_t, self.pct = 0.0, 0.0

    def say(self, text: str) -> None:
        """A line between the bar's updates (rank 0's: the others have no bar and a silent log)."""
        tqdm.write(text) if not self.bar.disable else self.log(text)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def report(self, step: int, fields: dict[str, Any], projected_total: int | None, last: bool) -> None:
        """A logged step: its loss, lr, tok/s and MFU."""
        if projected_total is not None:
            total = projected_total if not self.pct else min(projected_total, int(step / self.pct))
            self.bar.total = max(total, step)
            self.pct = step / self.bar.total
        self.bar.set_postfix(loss=f"{fields['train_loss']:.4f}", tok_s=f"{fields['tok_per_s']:,.0f}",
                             mfu=f"{fields['mfu']:.1%}")
        now = time.time()
        if self.plain and (now - self.last_plain_t >= 1.0 or last):
            self.last_plain_t = now
            self.log(f"step {step}: loss {fields['train_loss']:.4f}, lr {fields['lr']:.2e}, "
                     f"{fields['tok_per_s']:,.0f} tok/s, mfu {fields['mfu']:.1%}")

    def close(self) -> None:
        self.bar.close()

"""Where a run lives and how it ends: run directories, `runs/latest`, what `--resume` continues, and
the signals that stop a run cleanly.

- A new run gets `runs/<timestamp>`, made with an exclusive mkdir, so two runs started in the same
  second get two directories; `runs/latest` names the newest.
- `--resume` continues a run with its own saved config (its latest checkpoint's state.json); only the
  keys that may change mid-run (RESUME_KEYS) may be given again with other values.
- SIGINT and SIGTERM ask the trainer to save at the next step boundary and stop (StopSignals).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from gptkit.checkpoint import clean_partial, find_checkpoint, list_checkpoints, read_state
from gptkit.config import ARCH_TABLE, TRAIN_KEYS, TrainConfig, load_toml, resolve_config
from gptkit.errors import GptkitError, make_dir
from gptkit.metrics import truncate_metrics

RUNS_DIR = "runs"
LATEST = "latest"  # runs/latest: a link to (or, where links are unavailable, a file naming) the newest run


RESUME_KEYS = ("max_steps", "max_time", "eval_interval", "eval_batches", "final_eval", "sample_interval",
               "sample_tokens", "sample_temperature", "sample_top_k", "sample_top_p", "ckpt_interval",
               "ckpt_every_s", "keep_last", "log_interval", "device", "dtype", "compile", "threads", "progress",
               "max_bad_steps", "loggers", "wandb_project", "out", "data", "attention", "activation_checkpointing",
               "fsdp")


def resume_config(saved: dict[str, Any], saved_model: dict[str, Any], config_file: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """The config of a resumed run: the run's own (`saved`, from its checkpoint), with the keys of
    `config_file` and `overrides` that differ from it applied. Only RESUME_KEYS may differ.
    Returns (TrainConfig, {}, {key: [old, new]} of what changed)."""
    given, given_model = resolve_config(config_file, overrides)
    named = set(overrides or {})
    if config_file:
        raw = load_toml(config_file)
        named |= {k for k in raw if not isinstance(raw[k], dict)}
        for table in ("model", ARCH_TABLE):
            if isinstance(raw.get(table), dict):
                named |= {k for k in raw[table] if k in TRAIN_KEYS}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in TRAIN_KEYS})
    vals = base.to_dict()
    changes: dict[str, Any] = {}
    for k in sorted(named):
        if k not in TRAIN_KEYS:
            continue
        new = getattr(given, k)
        if new == vals[k]:
            continue
        if k not in RESUME_KEYS:
            where = f"{k}={overrides[k]}" if overrides and k in overrides else str(config_file or k)
            raise GptkitError(f"{k} cannot change when a run is resumed (the run has {k}={vals[k]!r})", where,
                              f"keys that may change: {', '.join(k for k in RESUME_KEYS if k != 'out')}; "
                              "or start a new run with --init RUN_DIR")
        changes[k] = [vals[k], new]
        vals[k] = new
    for k, v in given_model.items():
        if k in saved_model and saved_model[k] != v:
            raise GptkitError(f"{k} cannot change when a run is resumed (the model has {k}={saved_model[k]!r})",
                              f"{k}={v}", "the architecture is the checkpoint's; start a new run with --init RUN_DIR")
    if "max_steps" in changes and "max_time" not in named and vals["max_time"]:
        # as in a new run: naming the length turns the default run's time budget off
        changes["max_time"] = [vals["max_time"], 0.0]
        vals["max_time"] = 0.0
    if "max_steps" in changes and not vals["decay_steps"]:
        # the cosine keeps the horizon it had (decay_steps=0 meant "until max_steps"), so the LR
        # goes on from where it was: a longer run continues at min_lr, a shorter one stops earlier
        changes["decay_steps"] = [0, changes["max_steps"][0]]
        vals["decay_steps"] = changes["max_steps"][0]
    return TrainConfig(**vals), {}, changes


def new_run_dir(base: str | Path = RUNS_DIR) -> Path:
    """Create and return a fresh `base/<timestamp>` directory. The mkdir is exclusive, so two runs
    started in the same second get two directories (the second one a `-1` suffix)."""
    base = make_dir(base, "--out")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(10_000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise GptkitError(f"cannot create the run directory: {e.strerror or e}", d, "choose --out DIR") from None
        return d
    raise GptkitError("no free run directory name", base, "choose --out DIR")


def point_latest(run_dir: Path) -> None:
    """Make `runs/latest` name `run_dir` (replaced atomically; a plain file where links are unavailable)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(run_dir.name, target_is_directory=True)
        except OSError:
            tmp.write_text(run_dir.name + "\n", encoding="utf-8")
        if link.is_dir() and not link.is_symlink():
            return  # a real directory the user named `latest`: leave it alone
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


def resolve_run_dir(out: str | Path | None) -> Path:
    """The run directory `--resume` continues: --out, or else the newest run (runs/latest)."""
    if out:
        return Path(out)
    link = Path(RUNS_DIR) / LATEST
    if link.is_symlink() or link.is_dir():
        return link.resolve()
    if link.is_file():
        return Path(RUNS_DIR) / link.read_text(encoding="utf-8").strip()
    raise GptkitError("--resume without --out: no runs/latest to continue", "--resume",
                      "give the run with --out runs/<timestamp>")


def find_resume_checkpoint(run_dir: Path, resume: bool, is_main: bool, log, fresh: bool = False) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after checking the run directory."""
    if fresh:  # a new runs/<timestamp>
        return None
    if not resume:
        if run_dir.exists() and (list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists()):
            raise GptkitError("run directory already holds a run", run_dir,
                              "pass --resume to continue it, or choose another --out")
        return None
    if is_main:
        clean_partial(run_dir)  # a crash mid-save leaves a hidden temporary directory
    resume_ckpt = find_checkpoint(run_dir)
    if resume_ckpt is None and (run_dir / "config.toml").is_file():
        log(f"--resume: {run_dir} has no checkpoint yet (stopped early); starting it from step 0")
        if is_main:
            truncate_metrics(run_dir / "metrics.jsonl", -1)
    elif resume_ckpt is None:
        raise GptkitError("--resume: no checkpoint in the run directory", run_dir,
                          "start a new run without --resume, or point --out at an existing run")
    return resume_ckpt


def resume_run_config(out: str | Path | None, config_file: str | Path | None, overrides: dict[str, Any]
                      ) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """`gptkit train --resume`: the run's own config (its latest checkpoint's state.json, or its
    config.toml when it stopped before the first save), with the allowed keys of `config_file` and
    `overrides` changed. Returns (TrainConfig, model overrides, {key: [old, new]})."""
    run_dir = resolve_run_dir(out or overrides.get("out"))
    overrides = {**overrides, "out": str(run_dir)}
    ckpt = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None:
        state = read_state(ckpt)
        saved, saved_model = state.get("train_config"), state.get("model_config", {})
    elif (run_dir / "config.toml").is_file():
        saved_cfg, saved_model = resolve_config(run_dir / "config.toml")
        saved = saved_cfg.to_dict()
    else:
        raise GptkitError("--resume: no checkpoint in the run directory", run_dir,
                          "start a new run without --resume, or point --out at an existing run")
    if not saved:  # a converted checkpoint: no training config of its own
        cfg, model_ov = resolve_config(config_file, overrides)
        return cfg, model_ov, {}
    return resume_config({**saved, "out": str(run_dir)}, saved_model, config_file, overrides)


class StopSignals:
    """SIGINT and SIGTERM set `name` instead of killing the process; the loop asks `requested()` at
    each step boundary. A second signal acts as it would have (interrupts at once)."""

    def __init__(self):
        self.name: str | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        old = {}

        def handler(signum, frame):
            self.name = signal.Signals(signum).name
            for sig, h in old.items():
                signal.signal(sig, h)

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def requested(self, dist, device) -> bool:
        """Whether to stop now; under torchrun any rank's signal stops every rank at the same step."""
        if not dist.enabled:
            return self.name is not None
        flag = torch.tensor([1.0 if self.name else 0.0], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and self.name is None:
            self.name = "SIGTERM"
        return bool(flag.item())


def create_run_dir(dist) -> Path:
    """runs/<timestamp>, created by rank 0 and broadcast (every rank writes to the same one)."""
    name = [None]
    if dist.is_main:
        d = new_run_dir()
        point_latest(d)
        name[0] = str(d)
    if dist.enabled:
        tdist.broadcast_object_list(name, src=0)
    return Path(name[0])


def save_due(last_save_t: float, now: float, every_s: float, dist, device) -> bool:
    """Whether a long run should save now (every rank takes part in a save: rank 0's clock decides)."""
    due = every_s > 0 and now - last_save_t >= every_s
    if dist.enabled:
        flag = torch.tensor([1.0 if due else 0.0], device=device)
        tdist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due

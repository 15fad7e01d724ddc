"""The training loop: accumulation, autocast, clipping, eval, samples, checkpoints, logging, resume.

`Trainer(cfg).run()` trains and returns a TrainResult; `train()` wraps it with the distributed
set-up and teardown. Every knob is a TrainConfig field (gptkit/config.py, which also resolves
TOML files and `key=value` overrides), so the CLI, TOML files and the Python API share one
vocabulary. The run goes through named phases: setup, restore, then per step `_step` (one
optimizer update), `_log` (the metrics row and periodic eval), `_sample` and `_checkpoint`; the
last step runs the same phases with `last_step=True` (whole-split eval, final sample and save),
then `_finish`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from gptkit import checkpoint as ckpt_lib
from gptkit import parallel
from gptkit.config import MODEL_PRESETS, GPTConfig, TrainConfig, model_preset, write_toml
from gptkit.data import TokenLoader, read_meta
from gptkit.errors import GptkitError, make_dir
from gptkit.evaluate import estimate_loss, evaluate
from gptkit.loading import build_model, load_checkpoint_model, load_model
from gptkit.metrics import RunLogger, truncate_metrics
from gptkit.model import GPT
from gptkit.optim import lr_at, make_adamw
from gptkit.precision import ShadowWeights
from gptkit.prepare import PRESETS, ensure_prepared
from gptkit.runtime import (DTYPES, autocast, bf16_weights, measure_peak_flops, pick_dtype, process_start_time,
                            resolve_attention, setup_cuda_matmul, setup_distributed, setup_threads, synchronize,
                            teardown_distributed)
from gptkit.inference import sample_text
from gptkit.tasks import TrainTasks
from gptkit.tokenizer import CharTokenizer, carry_tokenizer, gpt2_tokenizer, tokenizer_from_data

PROCESS_START = process_start_time()  # wall time is counted from the process start (before imports)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    sample: str | None
    elapsed_s: float
    train_loss: float | None = None


def new_run_dir(base: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = Path(base) / stamp
    i = 1
    while d.exists():
        d = Path(base) / f"{stamp}-{i}"
        i += 1
    return d


class Trainer:
    """One training run. Construct with a resolved TrainConfig, then call run()."""

    def __init__(self, cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, resume: bool = False,
                 log=print):
        self.cfg, self.model_overrides, self.resume, self.log = cfg, dict(model_overrides or {}), resume, log
        self.dist, self.device = setup_distributed(cfg.device)
        if not self.dist.is_main:
            self.log = lambda *a, **k: None
        self.threads = setup_threads(cfg.threads)
        self.attention = resolve_attention(cfg.attention, self.device, cfg.block_size)
        setup_cuda_matmul()
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if cfg.grad_accum % self.dist.world_size:
            raise GptkitError(f"grad_accum={cfg.grad_accum} is not divisible by the {self.dist.world_size} processes",
                              "grad_accum", "make grad_accum a multiple of the number of processes")
        self.micro_steps = cfg.grad_accum // self.dist.world_size

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        if self.resume_ckpt is not None:
            self._restore()
        self._start()
        try:
            while True:
                last_step = self._last_step()
                if not last_step:
                    self._step()
                self._log(last_step)
                self._sample(last_step)
                self._checkpoint(last_step)
                if last_step:
                    break
        except BaseException:
            if self.metrics:
                self.metrics.close()
            raise
        finally:
            self.bar.close()
        return self._finish()

    # ------------------------------------------------------------------------------------------
    # setup: the run directory, the data, the model, the loaders and the optimizer
    def _setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights (FSDP shards them as they are)
        self.run_dir = Path(cfg.out) if cfg.out else new_run_dir()
        self.resume_ckpt = find_resume_checkpoint(self.run_dir, self.resume, dist.is_main, self.log)
        if cfg.fsdp and not dist.enabled:
            self.log("note: fsdp=true needs several processes (torchrun --nproc_per_node=N); training unsharded")
        self.data_dir = data_dir_of(cfg)
        meta = read_meta(self.data_dir)
        model, self.chars = build_run_model(cfg, self.model_overrides, self.attention, meta, self.resume_ckpt)
        self.mcfg = mcfg = model.config
        if cfg.block_size > mcfg.block_size:
            raise GptkitError(f"block_size {cfg.block_size} exceeds the model's context {mcfg.block_size}",
                              "block_size", "use a block_size up to the model's context")
        model.to(self.device)
        torch.manual_seed(cfg.seed + dist.rank)  # then each rank its own dropout stream
        if cfg.activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        self.fsdp = cfg.fsdp and dist.enabled
        if self.fsdp:
            parallel.wrap_fsdp(model)
        self.model = model
        self.train_loader = TokenLoader(self.data_dir, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed,
                                        rank=dist.rank, world_size=dist.world_size, vocab_size=mcfg.vocab_size)
        self.val_loader = TokenLoader(self.data_dir, "val", cfg.batch_size, cfg.block_size, seed=cfg.seed + 1,
                                      vocab_size=mcfg.vocab_size)
        self.optimizer, self.names = make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                                self.device.type, state_dtype=DTYPES[cfg.optim_dtype],
                                                **({"fused": False} if self.fsdp else {}))
        # fp16 needs loss scaling (CUDA); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.step = 0

    # ------------------------------------------------------------------------------------------
    # restore: the state of the checkpoint being resumed
    def _restore(self) -> None:
        self.step = restore_training_state(self.resume_ckpt, self.model, self.optimizer, self.names,
                                           self.train_loader, self.fsdp, self.dist, self.device)
        self.log(f"resuming {self.run_dir} from step {self.step} ({self.resume_ckpt.name})")

    # ------------------------------------------------------------------------------------------
    # start: the model wrappers that train, the run's files, the counters of the loop
    def _start(self) -> None:
        cfg, dist, model, mcfg = self.cfg, self.dist, self.model, self.mcfg
        train_model = model
        self.shadow = None
        if bf16_weights(cfg.param_dtype, self.dtype, self.device, dist.enabled):  # fp32 master weights update
            if dist.enabled:
                raise GptkitError("param_dtype=bfloat16 runs in a single process", "param_dtype",
                                  "use param_dtype=float32 with torchrun")
            self.shadow = ShadowWeights(model, torch.bfloat16)
            train_model = self.shadow.module
        if cfg.compile:
            train_model = compile_model(train_model, self.log)
        if dist.enabled and not self.fsdp:
            train_model = parallel.wrap_ddp(train_model, self.device)
        self.train_model = train_model

        if dist.is_main:
            make_dir(self.run_dir, "--out")
            write_toml(self.run_dir / "config.toml", cfg.to_dict(), mcfg.to_dict())
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        self.flops_per_step = model.flops_per_token(cfg.block_size) * self.tokens_per_step
        self.peak = measure_peak_flops(self.device, self.dtype, n=1024) if dist.is_main else 1.0
        self.log(f"model: {model.num_params():,} parameters ({mcfg.n_layer} layers, {mcfg.n_head} heads, "
                 f"{mcfg.n_embd} dims, vocab {mcfg.vocab_size}); device {self.device}, {str(self.dtype)[6:]}; "
                 f"{self.tokens_per_step:,} tokens/step; {self.attention} attention; "
                 f"{'bf16 weights + fp32 master' if self.shadow else 'fp32 weights'}; {self.threads} threads; "
                 f"run dir {self.run_dir}")
        self.tokenizer = run_tokenizer(self.chars, mcfg, self.log, self.data_dir, dist.is_main and self.run_dir)
        self.tasks = TrainTasks.for_run(cfg, self.tokenizer, mcfg.block_size)  # read now: a bad file stops the run
        # metrics.jsonl (+ TensorBoard / W&B); on resume, records past the checkpoint are dropped
        self.metrics = RunLogger(self.run_dir, cfg, resume_step=self.step if self.resume_ckpt is not None else None) \
            if dist.is_main else None
        self.bar = progress_bar(cfg.max_steps, self.step, enabled=cfg.progress and dist.is_main)
        self.t_start = time.time()
        self.budget = _TimeBudget(cfg.max_time, PROCESS_START, sum(len(s) for s in self.val_loader.shards))
        self.tokens_seen = self.step * self.tokens_per_step
        self.best_tok_s = 0.0
        self.last_log_t, self.last_log_step = time.time(), self.step
        # train_loss, lr and speed of the last logged training row: the final row repeats them
        self.last_train: dict[str, Any] = {"train_loss": None, "lr": None, "tok_per_s": None, "mfu": None}
        self.lr, self.loss_avg = None, None
        self.skipped, self.step_skipped = 0, False
        # with FSDP every forward is collective: evals and samples run on every rank
        self.everyone = dist.is_main or self.fsdp
        self.final_val, self.sample = None, None

    # ------------------------------------------------------------------------------------------
    # the loop's phases
    def _last_step(self) -> bool:
        """Whether this pass is the last: max_steps done, or the time budget spent."""
        cfg = self.cfg
        last = self.step >= cfg.max_steps
        if not last and self.budget.enabled:
            self.budget.tick(self.step, cfg.warmup_steps, self.tokens_per_step)
            if self.budget.out_of_time():
                self.log(f"time budget of {cfg.max_time:g} s reached at step {self.step}")
                last = True
        if last:
            self.bar.close()
        return last

    def _step(self) -> None:
        """One optimizer update over grad_accum micro-batches (skipped if the loss or gradient is not finite)."""
        cfg, dist, optimizer, scaler = self.cfg, self.dist, self.optimizer, self.scaler
        self.lr = lr_at(self.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps,
                        self.budget.ratio)
        for g in optimizer.param_groups:
            g["lr"] = self.lr
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            x, y = self.train_loader.next_batch(self.device)
            with parallel.set_gradient_sync(self.train_model, micro == self.micro_steps - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.train_model(x, y)
                scaled = loss / self.micro_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach()
        loss_avg = loss_sum / self.micro_steps
        if self.shadow:
            self.shadow.grads_to_master()
        if dist.enabled:
            tdist.all_reduce(loss_avg, op=tdist.ReduceOp.AVG)
        if scaler:
            scaler.unscale_(optimizer)
        # the norm is taken even without clipping: a non-finite gradient must not reach AdamW
        gnorm = parallel.local_scalar(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        self.step_skipped = False
        if scaler:  # the scaler skips steps with inf/NaN gradients and lowers its scale
            scaler.step(optimizer)
            scaler.update()
        elif not (torch.isfinite(loss_avg) and torch.isfinite(gnorm)):
            self.skipped += 1
            self.step_skipped = True
            self._say(f"step {self.step + 1}: non-finite {'loss' if not torch.isfinite(loss_avg) else 'gradient'}, "
                      f"step skipped ({self.skipped} so far)")
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.shadow:
            self.shadow.pull()
        self.loss_avg = loss_avg
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.bar.update(1)

    def _log(self, last_step: bool) -> None:
        """The metrics row of this step, with the periodic val estimate (or, last, the whole-split eval)."""
        cfg, step = self.cfg, self.step
        if last_step:
            self._final_eval()
            return
        if self.step_skipped:
            self._write(self._row(skipped=True, skipped_steps=self.skipped))
            if self.skipped > cfg.max_bad_steps:
                raise GptkitError(f"training diverged: {self.skipped} steps with a non-finite loss or gradient "
                                  f"(max_bad_steps={cfg.max_bad_steps})", "lr",
                                  "lower lr or use float32; the last good checkpoint is intact")
        log_now = step % cfg.log_interval == 0 or step == cfg.max_steps
        eval_now = cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.max_steps
        if not (log_now or eval_now):
            return
        # every row carries INTERFACES.md's fields; an eval-only row repeats the last measured speed
        fields = {**self.last_train, "train_loss": float(self.loss_avg), "lr": self.lr}
        t = None
        if log_now:
            synchronize(self.device)
            t = time.time()
            tok_s, mfu = self._measure_speed(t)
            fields.update(tok_per_s=round(tok_s, 1), mfu=round(mfu, 4))
            self.last_train = dict(fields)
            if self.skipped:
                fields["skipped_steps"] = self.skipped
        if eval_now:
            with self.budget.timing_eval(cfg.eval_batches * cfg.batch_size * cfg.block_size):
                fields["val_loss"] = estimate_loss(self.model, self.val_loader, cfg.eval_batches, self.device,
                                                   self.dtype)
            train_part = f"train {fields['train_loss']:.4f}, " if log_now else ""
            self._say(f"step {step}: {train_part}val {fields['val_loss']:.4f}")
            fields.update(score_tasks(self, f"step {step}"))
        self._write(self._row(t, **fields))
        if log_now:
            if self.budget.enabled:  # the time budget, not max_steps, ends this run: show where
                self.bar.total = min(cfg.max_steps, self.budget.projected_end_step(step, self.tokens_per_step))
            self.bar.set_postfix(loss=f"{fields['train_loss']:.4f}", tok_s=f"{fields['tok_per_s']:,.0f}",
                                 mfu=f"{fields['mfu']:.1%}")

    def _final_eval(self) -> None:
        cfg = self.cfg
        if not (cfg.final_eval and self.everyone):
            return
        self.final_val, n = evaluate(self.model, self.data_dir, cfg.block_size, max(cfg.batch_size, 64), self.device,
                                     self.dtype, progress=cfg.progress and self.dist.is_main)
        self.log(f"final val loss {self.final_val:.4f} (perplexity {math.exp(min(self.final_val, 50)):.2f}) "
                 f"over the whole val split, {n:,} tokens")
        self._write(self._row(**self.last_train, val_loss=self.final_val, **score_tasks(self, "final"), final=True))

    def _sample(self, last_step: bool) -> None:
        cfg, step = self.cfg, self.step
        if not (self.tokenizer and self.everyone and cfg.sample_tokens):
            return
        if last_step:
            self.sample = sample_during_training(self.model, self.tokenizer, cfg, self.device)
            self.log(f"--- sample ---\n{self.sample}\n---")
        elif cfg.sample_interval and step % cfg.sample_interval == 0 and step != cfg.max_steps:
            text = sample_during_training(self.model, self.tokenizer, cfg, self.device)
            self._say(f"--- sample at step {step} ---\n{text}\n---")

    def _checkpoint(self, last_step: bool) -> None:
        cfg, step = self.cfg, self.step
        if last_step or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step != cfg.max_steps):
            self._save()

    def _finish(self) -> TrainResult:
        if self.metrics:
            self.metrics.close()
        elapsed = time.time() - self.t_start
        self.log(f"done: {self.step} steps in {elapsed:.1f} s ({time.time() - PROCESS_START:.1f} s since start); "
                 f"checkpoint in {self.run_dir}")
        return TrainResult(self.run_dir, self.step, self.final_val, self.sample, elapsed, self.last_train["train_loss"])

    def _row(self, t: float | None = None, **fields) -> dict[str, Any]:
        """A metrics.jsonl row of the current step: step, tokens, elapsed_s (at time `t`), then `fields`."""
        t = time.time() if t is None else t
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed_s": round(t - self.t_start, 3), **fields}

    def _write(self, row: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.log(row)

    def _measure_speed(self, now: float) -> tuple[float, float]:
        """tok/s and MFU since the last logged row; on a CPU whose cores got busy, drop to one thread."""
        dt = max(now - self.last_log_t, 1e-9)
        steps = self.step - self.last_log_step
        tok_s = steps * self.tokens_per_step / dt
        mfu = self.flops_per_step * steps / dt / self.peak
        self.last_log_t, self.last_log_step = now, self.step
        if self.cfg.threads == 0 and self.threads > 1 and self.device.type == "cpu":
            # other work took our cores mid-run: a thread team sharing them stalls
            self.best_tok_s = max(self.best_tok_s, tok_s)
            if tok_s < 0.5 * self.best_tok_s:
                self.threads = setup_threads(1)
                self._say(f"step {self.step}: throughput halved (cores busy elsewhere); now 1 thread")
        return tok_s, mfu

    def _say(self, text: str) -> None:
        """A line between progress-bar updates, from rank 0 only."""
        if self.dist.is_main:
            tqdm.write(text) if self.cfg.progress else self.log(text)

    def _save(self) -> None:
        save_training_state(self.run_dir, self.step, self.cfg, self.mcfg, self.model, self.optimizer, self.names,
                            self.train_loader, self.chars, self.fsdp, self.dist, self.device)


# ---------------------------------------------------------------------------------------------
# the Trainer's helpers: setup, restore and save
def find_resume_checkpoint(run_dir: Path, resume: bool, is_main: bool, log) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after checking the run directory."""
    if not resume:
        if run_dir.exists() and (ckpt_lib.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists()):
            raise GptkitError("run directory already holds a run", run_dir,
                              "pass --resume to continue it, or choose another --out")
        return None
    if is_main:
        ckpt_lib.clean_partial(run_dir)  # a crash mid-save leaves a hidden temporary directory
    resume_ckpt = ckpt_lib.find_checkpoint(run_dir)
    if resume_ckpt is None and (run_dir / "config.toml").is_file():
        log(f"--resume: {run_dir} has no checkpoint yet (stopped early); starting it from step 0")
        if is_main:
            truncate_metrics(run_dir / "metrics.jsonl", 0)
    elif resume_ckpt is None:
        raise GptkitError("--resume: no checkpoint in the run directory", run_dir,
                          "start a new run without --resume, or point --out at an existing run")
    return resume_ckpt


def data_dir_of(cfg: TrainConfig) -> Path:
    """The prepared data directory: `data`, or the `dataset` preset (prepared on first use)."""
    if cfg.data:
        return Path(cfg.data)
    if cfg.dataset not in PRESETS:
        raise GptkitError(f"unknown dataset preset {cfg.dataset!r}", "dataset",
                          f"use one of {', '.join(PRESETS)} or pass --data DIR")
    return ensure_prepared(cfg.dataset)


def build_run_model(cfg: TrainConfig, model_overrides: dict[str, Any], attention: str, meta: dict,
                    resume_ckpt: Path | None) -> tuple[GPT, list[str] | None]:
    """The model to train and its char vocab: from the checkpoint, from --init weights, or from scratch."""
    chars = meta.get("chars")
    if resume_ckpt is not None:
        loaded = load_checkpoint_model(resume_ckpt)
        return loaded.model, loaded.chars or chars
    if cfg.init != "scratch":
        loaded = load_model(cfg.init)
        model = loaded.model
        conflicts = {k: v for k, v in model_overrides.items() if getattr(model.config, k) != v}
        if conflicts:
            raise GptkitError(f"architecture options {sorted(conflicts)} conflict with the weights of --init",
                              "--init", "drop them: the architecture comes from the initial weights")
        if cfg.block_size > model.config.block_size:
            raise GptkitError(f"block_size {cfg.block_size} exceeds the model's context {model.config.block_size}",
                              "block_size", "use a block_size up to the model's context")
        # the run's dropout and attention backend: the same weights in a model built for them
        new_cfg = model.config.replace(dropout=cfg.dropout, attention=attention)
        return build_model(new_cfg, model.state_dict(), cfg.init), loaded.chars or chars
    # from scratch: the architecture from a preset or from a model path's config
    if cfg.model in MODEL_PRESETS:
        base = model_preset(cfg.model).to_dict()
    else:
        base = load_model(cfg.model).model.config.to_dict()
    base.update(block_size=cfg.block_size, dropout=cfg.dropout, attention=attention)
    if "vocab_size" in meta:
        base["vocab_size"] = int(meta["vocab_size"])
    base.update(model_overrides)
    return GPT(GPTConfig.from_dict(base)), chars


def restore_training_state(ckpt: Path, model: GPT, optimizer, names: dict[int, str], loader: TokenLoader,
                           fsdp: bool, dist, device) -> int:
    """Load the optimizer, loader position and RNG streams of `ckpt` (its weights are already in the
    model); return its step. A damaged state (a missing key, a value of the wrong type or size) is a
    GptkitError naming the checkpoint."""
    try:
        return _restore_training_state(ckpt, model, optimizer, names, loader, fsdp, dist, device)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise GptkitError(f"damaged training state: {type(e).__name__}: {' '.join(str(e).split())}", ckpt,
                          "use an older ckpt_* directory, or start the run again without --resume") from None


def _restore_training_state(ckpt: Path, model: GPT, optimizer, names: dict[int, str], loader: TokenLoader,
                            fsdp: bool, dist, device) -> int:
    state = ckpt_lib.read_state(ckpt)
    if "optimizer" in state:
        opt_tensors = ckpt_lib.read_tensors(ckpt / ckpt_lib.OPTIM_FILE)
        opt_sd = ckpt_lib.optimizer_from_flat(opt_tensors, state["optimizer"], names)
        if fsdp:
            parallel.load_full_optimizer_state(model, optimizer, opt_sd, names)
        else:
            optimizer.load_state_dict(opt_sd)
    loader.load_state_dict(state["loader"])
    ckpt_lib.set_rng_state(state.get("rng", {}))
    if dist.enabled and len(state.get("rng_ranks", [])) == dist.world_size:
        parallel.set_rng(state["rng_ranks"][dist.rank], device)
    return int(state["step"])


def save_training_state(run_dir: Path, step: int, cfg: TrainConfig, mcfg: GPTConfig, model: GPT, optimizer,
                        names: dict[int, str], loader: TokenLoader, chars: list[str] | None, fsdp: bool, dist,
                        device) -> None:
    """The checkpoint of `step`: rank 0 writes; under FSDP every rank first helps gather the full tensors."""
    tensors, opt_state, rng_ranks = model, optimizer, None
    if fsdp:
        tensors = parallel.full_model_tensors(model)
        opt_state = parallel.full_optimizer_state(model, optimizer, names)
    if dist.enabled:
        rng_ranks = parallel.gather_rng(device)
    if not dist.is_main:
        return
    state = {"model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
             "schedule": {"step": step, "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                          "decay_steps": cfg.decay_steps or cfg.max_steps},
             "loader": loader.state_dict(), "rng": ckpt_lib.rng_state(), "chars": chars}
    if rng_ranks:
        state["rng_ranks"] = rng_ranks
    ckpt_lib.save_checkpoint(run_dir, step, tensors, state, opt_state, names, keep_last=cfg.keep_last)


def compile_model(model: torch.nn.Module, log) -> torch.nn.Module:
    try:
        # a graph that fails to compile (no C++ compiler, unsupported op) runs eagerly instead
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model)
    except Exception as e:  # unsupported platform: fall back to eager
        log(f"warning: torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model


def run_tokenizer(chars: list[str] | None, mcfg: GPTConfig, log, data_dir: Path | None = None,
                  run_dir: Path | None = None):
    """The tokenizer for samples during training (None: no samples). Data prepared with a
    tokenizer.json: that one, which the run then carries (saved into run_dir, by the main rank)."""
    if data_dir is not None:
        tok = carry_tokenizer(data_dir, run_dir, mcfg.block_size) if run_dir else tokenizer_from_data(data_dir)
        if tok is not None:
            return tok
    if chars:
        return CharTokenizer(chars)
    if mcfg.vocab_size == 50257:
        try:
            return gpt2_tokenizer()
        except GptkitError as e:
            log(f"warning: no samples during training: {e.line()}")
    return None


def score_tasks(tr: Trainer, when: str) -> dict[str, float]:
    """The eval_tasks' metrics for a metrics row ({} without eval_tasks), said in the log; timed, so
    that the time budget keeps room for scoring them once more after the last step."""
    if tr.tasks is None:
        return {}
    t = time.time()
    scores = tr.tasks(tr.model, tr.device, tr.dtype)
    tr.budget.tasks_s = time.time() - t
    tr.budget.eval_since += tr.budget.tasks_s
    tr._say(f"{when}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def sample_during_training(model: GPT, tokenizer, c: TrainConfig, device) -> str:
    """One sample from the empty prompt, in the run's sampling settings; the model's mode is kept."""
    was_training = model.training
    text = sample_text(model, tokenizer, "", c.sample_tokens, temperature=c.sample_temperature,
                       top_k=c.sample_top_k or None, top_p=c.sample_top_p, seed=c.seed, device=device)[0]
    model.train(was_training)
    return text


class _TimeBudget:
    """The wall-clock budget of `max_time`: when to stop, and how far the LR schedule has got.

    Training stops early enough for the final full-split eval (and the checkpoint and sample) to
    finish by `max_time` seconds after the process started. The eval's cost is extrapolated from
    the periodic evals, or from the training speed before the first one.
    """

    def __init__(self, max_time: float, process_start: float, val_tokens: int):
        self.enabled = max_time > 0
        self.end = process_start + max_time
        self.val_tokens = val_tokens
        self.ratio = 0.0  # fraction of the budget spent since the warmup ended
        self.t_warm = None  # time at which the warmup ended
        self.last_t, self.last_step, self.ticks = None, 0, 0
        self.train_s_per_tok = None  # a running average that skips the first steps (compilation, warm-up)
        self.eval_s_per_tok = None
        self.eval_since = 0.0  # eval time since the last tick
        self.tasks_s = 0.0  # the last scoring of eval_tasks, which the final eval repeats

    def reserve(self) -> float:
        """Seconds kept for the final eval, checkpoint and sample."""
        per_tok = self.eval_s_per_tok or (self.train_s_per_tok or 0.0) / 2.0
        return 1.2 * (per_tok * self.val_tokens + self.tasks_s) + 1.0

    def tick(self, step: int, warmup_steps: int, tokens_per_step: int) -> None:
        now = time.time()
        if self.last_t is not None and step > self.last_step:
            per_tok = (now - self.last_t - self.eval_since) / ((step - self.last_step) * tokens_per_step)
            self.ticks += 1
            if self.ticks > 2:
                prev = self.train_s_per_tok
                self.train_s_per_tok = per_tok if prev is None else 0.95 * prev + 0.05 * per_tok
        self.last_t, self.last_step, self.eval_since = now, step, 0.0
        if step < warmup_steps:
            return
        if self.t_warm is None:
            self.t_warm = now
        deadline = self.end - self.reserve()
        self.ratio = min(1.0, max(0.0, (now - self.t_warm) / max(deadline - self.t_warm, 1e-9)))

    def projected_end_step(self, step: int, tokens_per_step: int) -> int:
        """The step at which the budget will stop training, at the current speed."""
        if not self.train_s_per_tok:
            return step + 1
        left = self.end - self.reserve() - time.time()
        return step + max(1, int(left / (self.train_s_per_tok * tokens_per_step)))

    def out_of_time(self) -> bool:
        return time.time() >= self.end - self.reserve()

    @contextlib.contextmanager
    def timing_eval(self, tokens: int):
        t = time.time()
        yield
        dt = time.time() - t
        self.eval_since += dt
        self.eval_s_per_tok = dt / max(tokens, 1)


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm bar: step n/total, elapsed and ETA; loss, tok/s and MFU are set as its postfix."""
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]")


def train(cfg: TrainConfig | None = None, model_overrides: dict[str, Any] | None = None, resume: bool = False,
          log=print) -> TrainResult:
    """Train with `cfg` (defaults: the default run, char-level tiny Shakespeare)."""
    trainer = Trainer(cfg or TrainConfig(), model_overrides, resume, log)
    try:
        result = trainer.run()
    except BaseException:
        teardown_distributed(barrier=False)
        raise
    teardown_distributed(barrier=True)  # gloo aborts if a rank leaves while another still talks to it
    return result

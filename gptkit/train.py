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

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from gptkit import checkpoint as ckpt_lib
from gptkit import lora, parallel, sft
from gptkit.config import MODEL_PRESETS, GPTConfig, TrainConfig, model_preset, write_toml
from gptkit.data import TokenLoader, check_char_table, read_meta
from gptkit.errors import GptkitError, make_dir
from gptkit.evaluate import estimate_loss, evaluate
from gptkit.loading import build_model, load_checkpoint_model, load_model
from gptkit.metrics import Progress, RunLogger, Speedometer, check_loggers
from gptkit.model import GPT
from gptkit.optim import TimeBudget, lr_at, make_optimizer, optimizer_kind, set_lr
from gptkit.precision import ShadowWeights
from gptkit.prepare import PRESETS, ensure_prepared
from gptkit.runs import StopSignals, create_run_dir, find_resume_checkpoint, resolve_run_dir, save_due
from gptkit.runtime import (autocast, bf16_weights, measure_peak_flops, pick_dtype, process_start_time,
                            resolve_attention, setup_distributed, setup_threads, setup_training, synchronize,
                            teardown_distributed)
from gptkit.inference import sample_text
from gptkit.tasks import TrainTasks
from gptkit.tokenizer import CharTokenizer, carry_tokenizer, gpt2_tokenizer, save_gpt2_vocab, tokenizer_from_data

PROCESS_START = process_start_time()  # wall time is counted from the process start (before imports)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    sample: str | None
    elapsed_s: float
    train_loss: float | None = None
    stopped_by: str | None = None  # the signal's name when SIGINT/SIGTERM stopped the run early


class Trainer:
    """One training run. Construct with a resolved TrainConfig, then call run()."""

    def __init__(self, cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, resume: bool = False,
                 log=print, changes: dict[str, Any] | None = None):
        self.cfg, self.model_overrides, self.resume = cfg, dict(model_overrides or {}), resume
        self.dist, self.device = setup_distributed(cfg.device)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)  # one process speaks
        self.threads = setup_training(self.device, cfg.threads)
        self.attention = resolve_attention(cfg.attention, self.device, cfg.block_size)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.micro_steps = micro_steps_per_process(cfg.grad_accum, self.dist.world_size)
        self.changes = dict(changes or {})  # keys changed on resume: recorded in config.toml and metrics.jsonl
        self.signals = StopSignals()  # SIGINT/SIGTERM: save at the step boundary and stop

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        if self.resume_ckpt is not None:
            self._restore()
        self._start()
        try:
            with self.signals.installed():
                while True:
                    last_step = self._last_step()
                    if not last_step:
                        self._step()
                    if self.signals.requested(self.dist, self.device):
                        self._stop()
                        break
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
            self.progress.close()
        return self._finish()

    def _stop(self) -> None:
        """Stopped by a signal: the metrics row and a checkpoint of this step, then how to go on."""
        if self.step > 0 and self.loss_avg is not None:
            self._write(self._row(**{**self.last_train, "train_loss": float(self.loss_avg), "lr": self.lr}))
        self._save()
        self.progress.close()
        self.log(f"{self.signals.name}: stopped at step {self.step}; checkpoint saved in {self.run_dir}. "
                 f"Continue with: gptkit train --out {self.run_dir} --resume")

    # ------------------------------------------------------------------------------------------
    # setup: the run directory, the data, the model, the loaders and the optimizer
    def _setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights (FSDP shards them as they are)
        if dist.is_main:
            check_loggers(cfg.loggers)  # a missing logger package fails before the run directory exists
        self.run_dir = Path(cfg.out) if cfg.out else resolve_run_dir(None) if self.resume else create_run_dir(dist)
        self.resume_ckpt = find_resume_checkpoint(self.run_dir, self.resume, dist.is_main, self.log,
                                                  fresh=not cfg.out)
        if cfg.fsdp and not dist.enabled:
            self.log("note: fsdp=true needs several processes (torchrun --nproc_per_node=N); training unsharded")
        self.data_dir = data_dir_of(cfg, self.log)
        meta = read_meta(self.data_dir)
        model, self.chars = build_run_model(cfg, self.model_overrides, self.attention, meta, self.resume_ckpt)
        self.lora = lora.setup_training(model, cfg, self.resume_ckpt, self.log)  # None: full fine-tuning
        self.mcfg = mcfg = model.config
        model.to(self.device)
        torch.manual_seed(cfg.seed + dist.rank)  # then each rank its own dropout stream
        if cfg.activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        self.fsdp = cfg.fsdp and dist.enabled
        if self.fsdp:
            parallel.wrap_fsdp(model)
        self.model = model
        self.train_loader, self.val_loader = sft.make_loaders(cfg, self.data_dir, meta, mcfg.vocab_size, dist)
        self.extra_state = {**({"lora": self.lora} if self.lora else {}), **sft.carried_state(meta, self.data_dir)}
        if cfg.optimizer == "auto":  # resolved once: config.toml and the checkpoints name what the run uses,
            # so a resume (with or without FSDP) goes on with the same optimizer
            self.cfg = cfg = dataclasses.replace(cfg, optimizer=optimizer_kind(cfg, self.fsdp))
        self.optimizer, self.names = make_optimizer(model, cfg, self.device.type, self.fsdp)
        # fp16 needs loss scaling (CUDA); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.step = 0
        self.start_ratio = 0.0  # how far a time budget had taken the LR schedule (a resumed run goes on from there)

    # ------------------------------------------------------------------------------------------
    # restore: the state of the checkpoint being resumed
    def _restore(self) -> None:
        self.step, schedule = restore_training_state(self.resume_ckpt, self.model, self.optimizer, self.names,
                                                     self.train_loader, self.fsdp, self.dist, self.device)
        self.start_ratio = float(schedule.get("time_ratio", 0.0))
        self.log(f"resuming {self.run_dir} from step {self.step} ({self.resume_ckpt.name})")

    # ------------------------------------------------------------------------------------------
    # start: the model wrappers that train, the run's files, the counters of the loop
    def _start(self) -> None:
        cfg, dist, model, mcfg, opt = self.cfg, self.dist, self.model, self.mcfg, self.optimizer
        self.train_model, self.shadow = training_module(model, cfg, self.dtype, self.device, dist, self.fsdp, self.log, opt)
        if dist.is_main:
            make_dir(self.run_dir, "--out")
            write_toml(self.run_dir / "config.toml", cfg.to_dict(), mcfg.to_dict(), resume_note(self.step, self.changes))
            sft.write_run_template(self.run_dir, self.extra_state)  # serve and chat render with it
        # one step: micro_steps micro-batches on each of the processes
        self.tokens_per_step = cfg.batch_size * cfg.block_size * self.micro_steps * dist.world_size
        self.flops_per_step = model.flops_per_token(cfg.block_size) * self.tokens_per_step
        self.peak = measure_peak_flops(self.device, self.dtype, n=1024) if dist.is_main else 1.0
        self.log(model_line(self))
        self.tokenizer = run_tokenizer(self.chars, mcfg, self.log, self.data_dir, dist.is_main and self.run_dir)
        self.tasks = TrainTasks.for_run(cfg, self.tokenizer, mcfg.block_size)  # read now: a bad file stops the run
        # metrics.jsonl (+ TensorBoard / W&B); on resume, records past the checkpoint are dropped
        self.metrics = RunLogger(self.run_dir, cfg, resume_step=self.step if self.resume_ckpt is not None else None) \
            if dist.is_main else None
        self.progress = Progress(cfg.max_steps, self.step, cfg.progress and dist.is_main, self.log)
        self.t_start = time.time()
        self.budget = TimeBudget(cfg.max_time, PROCESS_START, sum(len(s) for s in self.val_loader.shards),
                                  self.start_ratio)
        self.last_save_t = time.time()
        self.tokens_seen = self.step * self.tokens_per_step
        self.speed = Speedometer(self.step, self.tokens_per_step, self.flops_per_step, self.peak)
        # train_loss, lr and speed of the last logged training row: the final row repeats them
        self.last_train: dict[str, Any] = {"train_loss": None, "lr": None, "tok_per_s": None, "mfu": None}
        self.lr, self.loss_avg = None, None
        self.skipped, self.step_skipped = 0, False
        # with FSDP every forward is collective: evals and samples run on every rank
        self.everyone = dist.is_main or self.fsdp
        self.final_val, self.sample = None, None
        if self.step == 0 and cfg.eval_interval and cfg.max_steps > 0 and self.everyone:
            self._eval_at_start()

    def _eval_at_start(self) -> None:
        """The val loss of the initial weights: the curve's first point, on the periodic estimates' batches."""
        # not timed for the budget's eval estimate: the first forwards are cold (and it runs before the first tick)
        val = estimate_loss(self.model, self.val_loader, self.cfg.eval_batches, self.device, self.dtype)
        self.progress.say(f"step 0: val {val:.4f}")
        self._write(self._row(**self.last_train, val_loss=val))

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
            self.progress.close()
        return last

    def _step(self) -> None:
        """One optimizer update over grad_accum micro-batches (skipped if the loss or gradient is not finite)."""
        cfg, dist, optimizer, scaler = self.cfg, self.dist, self.optimizer, self.scaler
        self.lr = lr_at(self.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps,
                        self.budget.ratio)
        set_lr(optimizer, self.lr, cfg.lr)  # Muon's groups keep their own peak, scaled alike
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
        if self.shadow:  # (under compile=true with AdamW, the update reads the bf16 gradients itself)
            self.shadow.grads_to_master()
        if dist.enabled:
            tdist.all_reduce(loss_avg, op=tdist.ReduceOp.AVG)
        if scaler:
            scaler.unscale_(optimizer)
        # the norm is taken even without clipping: a non-finite gradient must not reach AdamW
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = parallel.local_scalar(self.shadow.clip_grad_norm_(max_norm) if self.shadow else
                                      torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.step_skipped = False
        if scaler:  # the scaler skips steps with inf/NaN gradients and lowers its scale
            scaler.step(optimizer)
            scaler.update()
        elif not (torch.isfinite(loss_avg) and torch.isfinite(gnorm)):
            self.skipped += 1
            self.step_skipped = True
            self.progress.say(f"step {self.step + 1}: non-finite {'loss' if not torch.isfinite(loss_avg) else 'gradient'}, "
                      f"step skipped ({self.skipped} so far)")
        else:
            self.shadow.step(optimizer) if self.shadow else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.shadow:
            self.shadow.after_step()
        self.loss_avg = loss_avg
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.progress.update(1)

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
            tok_s, mfu = self.speed.measure(t, step)
            if self.cfg.threads == 0 and self.threads > 1 and self.device.type == "cpu" and self.speed.stalled():
                self.threads = setup_threads(1)  # other work took our cores: a thread team sharing them stalls
                self.progress.say(f"step {step}: throughput halved (cores busy elsewhere); now 1 thread")
            fields.update(tok_per_s=round(tok_s, 1), mfu=round(mfu, 4))
            self.last_train = dict(fields)
            if self.skipped:
                fields["skipped_steps"] = self.skipped
        if eval_now:
            with self.budget.timing_eval(cfg.eval_batches * cfg.batch_size * cfg.block_size):
                fields["val_loss"] = estimate_loss(self.model, self.val_loader, cfg.eval_batches, self.device,
                                                   self.dtype)
            train_part = f"train {fields['train_loss']:.4f}, " if log_now else ""
            self.progress.say(f"step {step}: {train_part}val {fields['val_loss']:.4f}")
            fields.update(score_tasks(self, f"step {step}"))
        self._write(self._row(t, **fields))
        if log_now:
            # the time budget, not max_steps, ends this run: show where
            projected = (min(cfg.max_steps, self.budget.projected_end_step(step, self.tokens_per_step))
                         if self.budget.enabled else None)
            self.progress.report(step, fields, projected, step == cfg.max_steps)

    def _final_eval(self) -> None:
        cfg = self.cfg
        if not (cfg.final_eval and self.everyone):
            return
        self.final_val, n = evaluate(self.model, self.data_dir, cfg.block_size, max(cfg.batch_size, 64), self.device,
                                     self.dtype, progress=not self.progress.bar.disable)
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
            self.progress.say(f"--- sample at step {step} ---\n{text}\n---")

    def _checkpoint(self, last_step: bool) -> None:
        cfg, step = self.cfg, self.step
        if last_step or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step != cfg.max_steps):
            self._save()
        elif cfg.ckpt_every_s and step % (cfg.eval_interval or cfg.log_interval) == 0 \
                and save_due(self.last_save_t, time.time(), cfg.ckpt_every_s, self.dist, self.device):
            self._save()  # a long run saves at its eval steps, so a crash or a kill -9 loses little

    def _finish(self) -> TrainResult:
        if self.metrics:
            self.metrics.close()
        elapsed = time.time() - self.t_start
        self.log(f"done: {self.step} steps in {elapsed:.1f} s ({time.time() - PROCESS_START:.1f} s since start); "
                 f"checkpoint in {self.run_dir}")
        return TrainResult(self.run_dir, self.step, self.final_val, self.sample, elapsed, self.last_train["train_loss"],
                           self.signals.name)

    def _row(self, t: float | None = None, **fields) -> dict[str, Any]:
        """A metrics.jsonl row of the current step: step, tokens, elapsed_s (at time `t`), then `fields`."""
        t = time.time() if t is None else t
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed_s": round(t - self.t_start, 3), **fields}

    def _write(self, row: dict[str, Any]) -> None:
        if self.changes:  # the first row after a resume says what the resume changed
            row["resumed_with"] = {k: new for k, (old, new) in self.changes.items()}
            self.changes = {}
        if self.metrics:
            self.metrics.log(row)

    def _save(self) -> None:
        save_training_state(self.run_dir, self.step, self.cfg, self.mcfg, self.model, self.optimizer, self.names,
                            self.train_loader, self.chars, self.fsdp, self.dist, self.device, self.budget.ratio,
                            self.extra_state)
        self.last_save_t = time.time()


# ---------------------------------------------------------------------------------------------
# the Trainer's helpers: setup, restore and save
def micro_steps_per_process(grad_accum: int, world: int) -> int:
    """grad_accum counts the micro-batches of a step over all processes (nanoGPT's
    gradient_accumulation_steps); fewer than the processes means one each."""
    if grad_accum > world and grad_accum % world:
        raise GptkitError(f"grad_accum={grad_accum} is not divisible by the {world} processes", "grad_accum",
                          f"grad_accum counts micro-batches over all processes: use a multiple of {world}")
    return max(1, grad_accum // world)


def training_module(model: GPT, cfg: TrainConfig, dtype, device, dist, fsdp: bool, log, optimizer=None):
    """(the module forward/backward run through, its ShadowWeights or None): bf16 weights with fp32
    masters, torch.compile (with plain AdamW over masters, a compiled update too) and DDP, as the config asks."""
    train_model, shadow = model, None
    if bf16_weights(cfg.param_dtype, dtype, device, dist.enabled):  # fp32 master weights update
        if dist.enabled:
            raise GptkitError("param_dtype=bfloat16 runs in a single process", "param_dtype",
                              "use param_dtype=float32 with torchrun")
        shadow = ShadowWeights(model, torch.bfloat16, sparse_tied=not cfg.compile)
        train_model = shadow.module
    if cfg.compile:
        train_model = compile_model(train_model, log)
        if shadow:
            shadow.fuse_adamw(optimizer)  # with plain AdamW: one compiled update pass
    if dist.enabled and not fsdp:
        train_model = parallel.wrap_ddp(train_model, device)
    return train_model, shadow


def resume_note(step: int, changes: dict[str, Any]) -> str:
    if not changes:
        return ""
    return f"resumed at step {step} with " + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def model_line(t: Trainer) -> str:
    """The run's one-line summary: the model, where its weights came from, how and where it trains."""
    m, cfg = t.mcfg, t.cfg
    weights = t.resume_ckpt if t.resume_ckpt is not None else cfg.init  # a checkpoint, a model path or "scratch"
    par = ""
    if t.dist.enabled:
        par = (f"; {'FSDP' if t.fsdp else 'DDP'} over {t.dist.world_size} processes, {t.micro_steps} micro-batch"
               f"{'es' if t.micro_steps != 1 else ''} each")
    return (f"model: {t.model.num_params():,} parameters ({m.n_layer} layers, {m.n_head} heads, {m.n_embd} dims, "
            f"vocab {m.vocab_size}, context {m.block_size}), weights from {weights}; device {t.device}, "
            f"{str(t.dtype)[6:]}{par}; {t.tokens_per_step:,} tokens/step; {t.attention} attention; "
            f"{'bf16 weights + fp32 master' if t.shadow else 'fp32 weights'}; "
            f"{'Muon + AdamW' if cfg.optimizer == 'muon' else 'AdamW'}"
            f"{' (compiled update over the masters)' if t.shadow and t.shadow.adamw is not None else ''}; "
            f"{t.threads} thread{'s' if t.threads != 1 else ''}; run dir {t.run_dir}")


def data_dir_of(cfg: TrainConfig, log=None) -> Path:
    """The prepared data directory: `data`, or the `dataset` preset (prepared on first use)."""
    if cfg.data:
        return Path(cfg.data)
    if cfg.dataset not in PRESETS:
        raise GptkitError(f"unknown dataset preset {cfg.dataset!r}", "dataset",
                          f"use one of {', '.join(PRESETS)} or pass --data DIR")
    return ensure_prepared(cfg.dataset, log=log)


def build_run_model(cfg: TrainConfig, model_overrides: dict[str, Any], attention: str, meta: dict,
                    resume_ckpt: Path | None) -> tuple[GPT, list[str] | None]:
    """The model to train and its char vocab: from the checkpoint, from --init weights, or from scratch."""
    chars = meta.get("chars")
    if resume_ckpt is not None:
        loaded = load_checkpoint_model(resume_ckpt, merge=False)
        check_char_table(loaded.chars, meta, resume_ckpt, data_dir_of(cfg))
        if cfg.block_size > loaded.model.config.block_size:
            raise GptkitError(f"block_size {cfg.block_size} exceeds the model's context "
                              f"{loaded.model.config.block_size}", "block_size", "use a block_size up to the context")
        return loaded.model, loaded.chars or chars
    if cfg.init != "scratch":
        loaded = load_model(cfg.init)
        check_char_table(loaded.chars, meta, "--init " + str(cfg.init), data_dir_of(cfg))
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
    return int(state["step"]), state.get("schedule", {})


def save_training_state(run_dir: Path, step: int, cfg: TrainConfig, mcfg: GPTConfig, model: GPT, optimizer,
                        names: dict[int, str], loader: TokenLoader, chars: list[str] | None, fsdp: bool, dist,
                        device, time_ratio: float = 0.0, extra: dict | None = None) -> None:
    """The checkpoint of `step`: rank 0 writes; under FSDP every rank first helps gather the full tensors."""
    tensors = lora.adapter_tensors(model) if "lora" in (extra or {}) else model  # LoRA: no copy of the base
    opt_state, rng_ranks = optimizer, None
    if fsdp:
        tensors = parallel.full_model_tensors(model)
        opt_state = parallel.full_optimizer_state(model, optimizer, names)
    if dist.enabled:
        rng_ranks = parallel.gather_rng(device)
    if not dist.is_main:
        return
    state = {"model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
             "schedule": {"step": step, "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                          "decay_steps": cfg.decay_steps or cfg.max_steps, "time_ratio": time_ratio},
             "loader": loader.state_dict(), "rng": ckpt_lib.rng_state(), "chars": chars,
             **({"rng_ranks": rng_ranks} if rng_ranks else {}), **(extra or {})}
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
    tokenizer.json: that one, which the run then carries (saved into run_dir, by the main rank); a
    GPT-2 BPE run keeps its vocabulary there too (gpt2.tiktoken), so it samples offline later."""
    if data_dir is not None:
        tok = carry_tokenizer(data_dir, run_dir, mcfg.block_size) if run_dir else tokenizer_from_data(data_dir)
        if tok is not None:
            return tok
    if chars:
        return CharTokenizer(chars)
    if mcfg.vocab_size == 50257:
        try:
            tok = gpt2_tokenizer()
        except GptkitError as e:
            log(f"warning: no samples during training: {e.line()}")
            return None
        if run_dir:
            save_gpt2_vocab(tok, run_dir)
        return tok
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
    tr.progress.say(f"{when}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def sample_during_training(model: GPT, tokenizer, c: TrainConfig, device) -> str:
    """One sample from the empty prompt, in the run's sampling settings; the model's mode is kept."""
    was_training = model.training
    text = sample_text(model, tokenizer, "", c.sample_tokens, temperature=c.sample_temperature,
                       top_k=c.sample_top_k or None, top_p=c.sample_top_p, seed=c.seed, device=device)[0]
    model.train(was_training)
    return text


def train(cfg: TrainConfig | None = None, model_overrides: dict[str, Any] | None = None, resume: bool = False,
          log=print, changes: dict[str, Any] | None = None) -> TrainResult:
    """Train with `cfg` (defaults: the default run, char-level tiny Shakespeare). `changes`: the keys a
    resume changed ({key: [old, new]}, from config.resume_config), recorded in the run's files."""
    trainer = Trainer(cfg or TrainConfig(), model_overrides, resume, log, changes)
    try:
        result = trainer.run()
    except BaseException:
        teardown_distributed(barrier=False)
        raise
    teardown_distributed(barrier=True)  # gloo aborts if a rank leaves while another still talks to it
    return result

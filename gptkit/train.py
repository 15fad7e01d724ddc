"""The training loop: accumulation, autocast, clipping, eval, samples, checkpoints, logging, resume.

`resolve_config` turns a TOML file plus `key=value` overrides into a TrainConfig and model
overrides; `Trainer(cfg).run()` trains and returns a TrainResult. Every knob is a TrainConfig
field (gptkit/config.py), so the CLI, TOML files and the Python API share one vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from gptkit import checkpoint as ckpt_lib
from gptkit import parallel
from gptkit.config import MODEL_KEYS, MODEL_PRESETS, TRAIN_KEYS, GPTConfig, TrainConfig, coerce_value, model_preset
from gptkit.data import TokenLoader, count_eval_batches, eval_windows, read_meta
from gptkit.errors import GptkitError, make_dir
from gptkit.model import GPT
from gptkit.optim import lr_at, make_adamw
from gptkit.runtime import (DTYPES, Dist, autocast, measure_peak_flops, pick_dtype, setup_cuda_matmul, setup_distributed,
                            bf16_weights, process_start_time, resolve_attention, setup_threads, synchronize)

PROCESS_START = process_start_time()  # wall time is counted from the process start (before imports)
BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # `--config NAME.toml` finds these by name

# model keys that a `key=value` may set; block_size/dropout/attention are TrainConfig fields
MODEL_ONLY_KEYS = {k: f for k, f in MODEL_KEYS.items() if k not in TRAIN_KEYS}


# ---------------------------------------------------------------------------------------------
# configuration: TOML + key=value
def load_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():  # a bare name: one of the configs shipped with gptkit
        bundled = BUNDLED_CONFIGS / p.name
        bundled = bundled if bundled.suffix == ".toml" else bundled.with_name(bundled.name + ".toml")
        if p.parent != Path(".") or not bundled.is_file():
            shipped = ", ".join(sorted(q.name for q in BUNDLED_CONFIGS.glob("*.toml")))
            raise GptkitError("config file not found", p, f"give an existing .toml file or a shipped one: {shipped}")
        p = bundled
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"invalid TOML: {e}", p, "fix the TOML syntax") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if v is None:
        return '""'
    return json.dumps(str(v))


def write_toml(path: Path, train: dict[str, Any], model: dict[str, Any]) -> None:
    lines = ["# resolved configuration of this run (gptkit train --config this-file reproduces it)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in train.items()]
    lines += ["", "[model]"] + [f"{k} = {_toml_value(v)}" for k, v in model.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise GptkitError(f"expected key=value, got {it!r}", it, "write options as key=value, e.g. max_steps=500")
        k, v = it.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if k not in TRAIN_KEYS and k not in MODEL_ONLY_KEYS:
            raise GptkitError(f"unknown config key {k!r}", it, "see `gptkit train --help` for the keys")
        out[k] = v
    return out


def resolve_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
                   ) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, model overrides) from defaults < TOML file < overrides."""
    train_vals: dict[str, Any] = {}
    model_vals: dict[str, Any] = {}

    def put(k, v, where):
        if k in TRAIN_KEYS:
            train_vals[k] = coerce_value(k, v, TRAIN_KEYS[k].type)
        elif k in MODEL_ONLY_KEYS:
            model_vals[k] = coerce_value(k, v, MODEL_ONLY_KEYS[k].type)
        else:
            raise GptkitError(f"unknown config key {k!r}", where, "see `gptkit train --help` for the keys")

    if config_file:
        raw = load_toml(config_file)
        for k, v in raw.items():
            if k == "model" and isinstance(v, dict):
                for mk, mv in v.items():
                    if mk in ("block_size", "dropout", "attention"):
                        put(mk, mv, str(config_file))
                    elif mk in MODEL_ONLY_KEYS:
                        model_vals[mk] = coerce_value(mk, mv, MODEL_ONLY_KEYS[mk].type)
                    elif mk not in ("vocab_size", "padded_vocab_size"):
                        raise GptkitError(f"unknown model key {mk!r}", str(config_file),
                                          "see `gptkit train --help` for the keys")
                    elif mk == "vocab_size":
                        model_vals[mk] = coerce_value(mk, mv, int)
            else:
                put(k, v, str(config_file))
    for k, v in (overrides or {}).items():
        if k == "vocab_size":
            model_vals[k] = coerce_value(k, v, int)
        else:
            put(k, v, f"{k}={v}")
    if "max_steps" in train_vals and "max_time" not in train_vals:
        # the 110 s budget belongs to the main job; a run that names its length trains exactly that long
        train_vals["max_time"] = 0.0
    return TrainConfig(**train_vals), model_vals


# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    sample: str | None
    elapsed_s: float
    train_loss: float | None = None


def evaluate(model: GPT, data_dir: Path, block_size: int, batch_size: int, device, dtype, split: str = "val",
             progress: bool = False) -> tuple[float, int]:
    """Mean loss over every target token of a whole split: (loss, tokens)."""
    from tqdm.auto import tqdm

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        batches = eval_windows(data_dir, split, block_size, batch_size)
        if progress:
            batches = tqdm(batches, total=count_eval_batches(data_dir, split, block_size, batch_size),
                           desc=f"eval {split}", leave=False, dynamic_ncols=True)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            n = int((y != -1).sum())
            total += float(loss) * n
            count += n
    return total / max(count, 1), count


def estimate_loss(model: GPT, loader: TokenLoader, batches: int, device, dtype) -> float:
    """Mean loss over `batches` fixed random batches (the same ones at every eval)."""
    model.eval()
    saved = loader.state_dict()
    loader.load_state_dict({**saved, "step": 0, "shard": 0, "pos": 0})
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x, y = loader.next_batch(device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            losses.append(float(loss))
    loader.load_state_dict(saved)
    return sum(losses) / len(losses)


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
    def _data_dir(self) -> Path:
        if self.cfg.data:
            return Path(self.cfg.data)
        from gptkit.prepare import PRESETS, ensure_prepared

        if self.cfg.dataset not in PRESETS:
            raise GptkitError(f"unknown dataset preset {self.cfg.dataset!r}", "dataset",
                              f"use one of {', '.join(PRESETS)} or pass --data DIR")
        return ensure_prepared(self.cfg.dataset)

    def _build_model(self, meta: dict, resume_ckpt: Path | None) -> tuple[GPT, list[str] | None]:
        cfg = self.cfg
        chars = meta.get("chars")
        if resume_ckpt is not None:
            loaded = ckpt_lib.load_checkpoint_model(resume_ckpt)
            return loaded.model, loaded.chars or chars
        if cfg.init != "scratch":
            from gptkit.loading import load_model

            loaded = load_model(cfg.init)
            model = loaded.model
            conflicts = {k: v for k, v in self.model_overrides.items() if getattr(model.config, k) != v}
            if conflicts:
                raise GptkitError(f"architecture options {sorted(conflicts)} conflict with the weights of --init",
                                  "--init", "drop them: the architecture comes from the initial weights")
            if cfg.block_size > model.config.block_size:
                raise GptkitError(f"block_size {cfg.block_size} exceeds the model's context {model.config.block_size}",
                                  "block_size", "use a block_size up to the model's context")
            new_cfg = model.config.replace(dropout=cfg.dropout, attention=self.attention)
            model.config = new_cfg
            for m in model.modules():
                if hasattr(m, "config"):
                    m.config = new_cfg
                if isinstance(m, torch.nn.Dropout):
                    m.p = cfg.dropout
            return model, loaded.chars or chars
        # from scratch: the architecture from a preset or from a model path's config
        if cfg.model in MODEL_PRESETS:
            base = model_preset(cfg.model).to_dict()
        else:
            from gptkit.loading import load_model

            base = load_model(cfg.model).model.config.to_dict()
        base.update(block_size=cfg.block_size, dropout=cfg.dropout, attention=self.attention)
        if "vocab_size" in meta:
            base["vocab_size"] = int(meta["vocab_size"])
        base.update(self.model_overrides)
        model = GPT(GPTConfig.from_dict(base))
        return model, chars

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights (FSDP shards them as they are)
        run_dir = Path(cfg.out) if cfg.out else new_run_dir()
        resume_ckpt = None
        if self.resume:
            if dist.is_main:
                ckpt_lib.clean_partial(run_dir)  # a crash mid-save leaves a hidden temporary directory
            resume_ckpt = ckpt_lib.find_checkpoint(run_dir)
            if resume_ckpt is None and (run_dir / "config.toml").is_file():
                self.log(f"--resume: {run_dir} has no checkpoint yet (stopped early); starting it from step 0")
                if dist.is_main:
                    from gptkit.loggers import truncate_metrics

                    truncate_metrics(run_dir / "metrics.jsonl", 0)
            elif resume_ckpt is None:
                raise GptkitError("--resume: no checkpoint in the run directory", run_dir,
                                  "start a new run without --resume, or point --out at an existing run")
        elif run_dir.exists() and (ckpt_lib.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists()):
            raise GptkitError("run directory already holds a run", run_dir,
                              "pass --resume to continue it, or choose another --out")
        if cfg.fsdp and not dist.enabled:
            self.log("note: fsdp=true needs several processes (torchrun --nproc_per_node=N); training unsharded")

        data_dir = self._data_dir()
        meta = read_meta(data_dir)
        model, chars = self._build_model(meta, resume_ckpt)
        mcfg = model.config
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
        train_loader = TokenLoader(data_dir, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed, rank=dist.rank,
                                   world_size=dist.world_size, vocab_size=mcfg.vocab_size)
        val_loader = TokenLoader(data_dir, "val", cfg.batch_size, cfg.block_size, seed=cfg.seed + 1,
                                 vocab_size=mcfg.vocab_size)
        optimizer, names = make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                      self.device.type, state_dtype=DTYPES[cfg.optim_dtype],
                                      **({"fused": False} if self.fsdp else {}))
        # fp16 needs loss scaling (CUDA); bf16 and fp32 do not
        scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        step = 0
        if resume_ckpt is not None:
            state = ckpt_lib.read_state(resume_ckpt)
            step = int(state["step"])
            if "optimizer" in state:
                opt_tensors = ckpt_lib.read_tensors(resume_ckpt / ckpt_lib.OPTIM_FILE)
                opt_sd = ckpt_lib.optimizer_from_flat(opt_tensors, state["optimizer"], names)
                if self.fsdp:
                    parallel.load_full_optimizer_state(model, optimizer, opt_sd, names)
                else:
                    optimizer.load_state_dict(opt_sd)
            train_loader.load_state_dict(state["loader"])
            ckpt_lib.set_rng_state(state.get("rng", {}))
            if dist.enabled and len(state.get("rng_ranks", [])) == dist.world_size:
                parallel.set_rng(state["rng_ranks"][dist.rank], self.device)
            self.log(f"resuming {run_dir} from step {step} ({resume_ckpt.name})")

        train_model = model
        shadow = None
        if bf16_weights(cfg.param_dtype, self.dtype, self.device, dist.enabled):  # fp32 master weights update
            if dist.enabled:
                raise GptkitError("param_dtype=bfloat16 runs in a single process", "param_dtype",
                                  "use param_dtype=float32 with torchrun")
            from gptkit.precision import ShadowWeights

            shadow = ShadowWeights(model, torch.bfloat16)
            train_model = shadow.module
        if cfg.compile:
            train_model = self._compile(train_model)
        if dist.enabled and not self.fsdp:
            train_model = parallel.wrap_ddp(train_model, self.device)

        if dist.is_main:
            make_dir(run_dir, "--out")
            write_toml(run_dir / "config.toml", cfg.to_dict(), mcfg.to_dict())
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        decay_steps = cfg.decay_steps or cfg.max_steps
        flops_per_step = model.flops_per_token(cfg.block_size) * tokens_per_step
        peak = measure_peak_flops(self.device, self.dtype, n=1024) if dist.is_main else 1.0
        self.log(f"model: {model.num_params():,} parameters ({mcfg.n_layer} layers, {mcfg.n_head} heads, "
                 f"{mcfg.n_embd} dims, vocab {mcfg.vocab_size}); device {self.device}, {str(self.dtype)[6:]}; "
                 f"{tokens_per_step:,} tokens/step; {self.attention} attention; "
                 f"{'bf16 weights + fp32 master' if shadow else 'fp32 weights'}; {self.threads} threads; run dir {run_dir}")

        tokenizer = self._tokenizer(chars, mcfg)
        from gptkit.loggers import RunLogger

        # metrics.jsonl (+ TensorBoard / W&B); on resume, records past the checkpoint are dropped
        metrics = RunLogger(run_dir, cfg, resume_step=step if resume_ckpt is not None else None) \
            if dist.is_main else None
        say = self._say
        bar = progress_bar(cfg.max_steps, step, enabled=cfg.progress and dist.is_main)
        t_start = time.time()
        budget = _TimeBudget(cfg.max_time, PROCESS_START, sum(len(s) for s in val_loader.shards))
        tokens_seen = step * tokens_per_step
        best_tok_s = 0.0
        last_log_t, last_log_step = time.time(), step
        train_loss = None
        last_rec: dict = {}  # the last logged row of metrics.jsonl
        skipped = 0
        # with FSDP every forward is collective: evals and samples run on every rank
        everyone = dist.is_main or self.fsdp
        try:
            while step < cfg.max_steps:
                if budget.enabled:
                    budget.tick(step, cfg.warmup_steps, tokens_per_step)
                    if budget.out_of_time():
                        self.log(f"time budget of {cfg.max_time:g} s reached at step {step}")
                        break
                lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, decay_steps, budget.ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                train_model.train()
                loss_sum = torch.zeros((), device=self.device)
                for micro in range(self.micro_steps):
                    x, y = train_loader.next_batch(self.device)
                    sync_ctx = parallel.set_gradient_sync(train_model, micro == self.micro_steps - 1)
                    with sync_ctx:
                        with autocast(self.device, self.dtype):
                            _, loss = train_model(x, y)
                        scaled = loss / self.micro_steps
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    loss_sum += loss.detach()
                loss_avg = loss_sum / self.micro_steps
                if shadow:
                    shadow.grads_to_master()
                if dist.enabled:
                    import torch.distributed as tdist

                    tdist.all_reduce(loss_avg, op=tdist.ReduceOp.AVG)
                if scaler:
                    scaler.unscale_(optimizer)
                # the norm is taken even without clipping: a non-finite gradient must not reach AdamW
                gnorm = parallel.local_scalar(torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                if scaler:  # the scaler skips steps with inf/NaN gradients and lowers its scale
                    scaler.step(optimizer)
                    scaler.update()
                elif not (torch.isfinite(loss_avg) and torch.isfinite(gnorm)):
                    skipped += 1
                    say(f"step {step + 1}: non-finite {'loss' if not torch.isfinite(loss_avg) else 'gradient'}, "
                        f"step skipped ({skipped} so far)")
                    if metrics:
                        metrics.log({"step": step + 1, "tokens": tokens_seen + tokens_per_step,
                                     "elapsed_s": round(time.time() - t_start, 3), "skipped": True,
                                     "skipped_steps": skipped})
                    if skipped > cfg.max_bad_steps:
                        optimizer.zero_grad(set_to_none=True)
                        raise GptkitError(f"training diverged: {skipped} steps with a non-finite loss or gradient "
                                          f"(max_bad_steps={cfg.max_bad_steps})", "lr",
                                          "lower lr or use float32; the last good checkpoint is intact")
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if shadow:
                    shadow.pull()
                step += 1
                tokens_seen += tokens_per_step
                bar.update(1)

                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    train_loss = float(loss_avg)
                    synchronize(self.device)
                    now = time.time()
                    dt = max(now - last_log_t, 1e-9)
                    tok_s = (step - last_log_step) * tokens_per_step / dt
                    mfu = flops_per_step * (step - last_log_step) / dt / peak
                    last_log_t, last_log_step = now, step
                    if cfg.threads == 0 and self.threads > 1 and self.device.type == "cpu":
                        # other work took our cores mid-run: a thread team sharing them stalls
                        best_tok_s = max(best_tok_s, tok_s)
                        if tok_s < 0.5 * best_tok_s:
                            self.threads = setup_threads(1)
                            say(f"step {step}: throughput halved (cores busy elsewhere); now 1 thread")
                    rec = {"step": step, "tokens": tokens_seen, "elapsed_s": round(now - t_start, 3),
                           "train_loss": train_loss, "lr": lr, "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4)}
                    if skipped:
                        rec["skipped_steps"] = skipped
                    eval_now = cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.max_steps
                    if eval_now:
                        with budget.timing_eval(cfg.eval_batches * cfg.batch_size * cfg.block_size):
                            rec["val_loss"] = estimate_loss(model, val_loader, cfg.eval_batches, self.device,
                                                            self.dtype)
                        say(f"step {step}: train {train_loss:.4f}, val {rec['val_loss']:.4f}")
                    if metrics:
                        metrics.log(rec)
                    last_rec = rec
                    if budget.enabled:  # the time budget, not max_steps, ends this run: show where
                        bar.total = min(cfg.max_steps, budget.projected_end_step(step, tokens_per_step))
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
                elif cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.max_steps:
                    with budget.timing_eval(cfg.eval_batches * cfg.batch_size * cfg.block_size):
                        v = estimate_loss(model, val_loader, cfg.eval_batches, self.device, self.dtype)
                    if metrics:  # every row carries INTERFACES.md's fields; speed is the last measured
                        metrics.log({**_speed(last_rec), "step": step, "tokens": tokens_seen,
                                     "elapsed_s": round(time.time() - t_start, 3), "train_loss": float(loss_avg),
                                     "lr": lr, "val_loss": v})
                    say(f"step {step}: val {v:.4f}")

                if (cfg.sample_interval and cfg.sample_tokens and step % cfg.sample_interval == 0
                        and step != cfg.max_steps and tokenizer and everyone):
                    text = self._sample(model, tokenizer)
                    say(f"--- sample at step {step} ---\n{text}\n---")
                if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step != cfg.max_steps:
                    self._save(run_dir, step, model, optimizer, names, train_loader, chars, mcfg)
        except BaseException:
            if metrics:
                metrics.close()
            raise
        finally:
            bar.close()

        self._save(run_dir, step, model, optimizer, names, train_loader, chars, mcfg)
        final_val = None
        if cfg.final_eval and everyone:
            final_val, n = evaluate(model, data_dir, cfg.block_size, max(cfg.batch_size, 64), self.device, self.dtype,
                                    progress=cfg.progress and dist.is_main)
            self.log(f"final val loss {final_val:.4f} (perplexity {math.exp(min(final_val, 50)):.2f}) "
                     f"over the whole val split, {n:,} tokens")
            if metrics:
                metrics.log({**_speed(last_rec), "step": step, "tokens": tokens_seen,
                             "elapsed_s": round(time.time() - t_start, 3), "train_loss": train_loss,
                             "lr": last_rec.get("lr"), "val_loss": final_val, "final": True})
        if metrics:
            metrics.close()
        sample = None
        if tokenizer and everyone and cfg.sample_tokens:
            sample = self._sample(model, tokenizer)
            self.log(f"--- sample ---\n{sample}\n---")
        elapsed = time.time() - t_start
        self.log(f"done: {step} steps in {elapsed:.1f} s ({time.time() - PROCESS_START:.1f} s since start); "
                 f"checkpoint in {run_dir}")
        return TrainResult(run_dir, step, final_val, sample, elapsed, train_loss)

    # ------------------------------------------------------------------------------------------
    def _compile(self, model: GPT):
        try:
            import torch._dynamo

            # a graph that fails to compile (no C++ compiler, unsupported op) runs eagerly instead
            torch._dynamo.config.suppress_errors = True
            return torch.compile(model)
        except Exception as e:  # unsupported platform: fall back to eager
            self.log(f"warning: torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
            return model

    def _tokenizer(self, chars, mcfg: GPTConfig):
        from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer

        if chars:
            return CharTokenizer(chars)
        if mcfg.vocab_size == 50257:
            try:
                return gpt2_tokenizer()
            except GptkitError as e:
                self.log(f"warning: no samples during training: {e.line()}")
        return None

    def _sample(self, model: GPT, tokenizer) -> str:
        from gptkit.sample import sample_text

        was_training = model.training
        c = self.cfg
        text = sample_text(model, tokenizer, "", c.sample_tokens, temperature=c.sample_temperature,
                           top_k=c.sample_top_k or None, top_p=c.sample_top_p, seed=c.seed, device=self.device)[0]
        model.train(was_training)
        return text

    def _say(self, text: str) -> None:
        """A line between progress-bar updates, from rank 0 only."""
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(text) if self.cfg.progress else self.log(text)

    def _save(self, run_dir, step, model, optimizer, names, loader, chars, mcfg) -> None:
        """Rank 0 writes; under FSDP every rank first helps gather the full tensors."""
        tensors, opt_state, rng_ranks = model, optimizer, None
        if self.fsdp:
            tensors = parallel.full_model_tensors(model)
            opt_state = parallel.full_optimizer_state(model, optimizer, names)
        if self.dist.enabled:
            rng_ranks = parallel.gather_rng(self.device)
        if not self.dist.is_main:
            return
        state = {"model_config": mcfg.to_dict(), "train_config": self.cfg.to_dict(),
                 "schedule": {"step": step, "lr": self.cfg.lr, "min_lr": self.cfg.min_lr,
                              "warmup_steps": self.cfg.warmup_steps,
                              "decay_steps": self.cfg.decay_steps or self.cfg.max_steps},
                 "loader": loader.state_dict(), "rng": ckpt_lib.rng_state(), "chars": chars}
        if rng_ranks:
            state["rng_ranks"] = rng_ranks
        ckpt_lib.save_checkpoint(run_dir, step, tensors, state, opt_state, names, keep_last=self.cfg.keep_last)


def _speed(rec: dict) -> dict:
    """tok_per_s and mfu of the last logged row (None before the first)."""
    return {"tok_per_s": rec.get("tok_per_s"), "mfu": rec.get("mfu")}


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

    def reserve(self) -> float:
        """Seconds kept for the final eval, checkpoint and sample."""
        per_tok = self.eval_s_per_tok or (self.train_s_per_tok or 0.0) / 2.0
        return 1.2 * per_tok * self.val_tokens + 1.0

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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]")


def train(cfg: TrainConfig | None = None, model_overrides: dict[str, Any] | None = None, resume: bool = False,
          log=print) -> TrainResult:
    """Train with `cfg` (defaults: the main job, char-level tiny Shakespeare)."""
    from gptkit.runtime import teardown_distributed

    trainer = Trainer(cfg or TrainConfig(), model_overrides, resume, log)
    try:
        result = trainer.run()
    except BaseException:
        teardown_distributed(barrier=False)
        raise
    teardown_distributed(barrier=True)  # gloo aborts if a rank leaves while another still talks to it
    return result


def config_help() -> str:
    """Every train key with its default, for `gptkit train --help`."""
    d = TrainConfig()
    lines = ["training keys (key=value, or in --config TOML):"]
    for f in fields(TrainConfig):
        lines.append(f"  {f.name} = {getattr(d, f.name)!r}")
    lines.append("model keys (from scratch; also a [model] table in TOML):")
    for k in MODEL_ONLY_KEYS:
        lines.append(f"  {k}")
    return "\n".join(lines)


def evaluate_model(model_path: str, data_dir: str, split: str = "val", batch_size: int = 16,
                   block_size: int | None = None, device: str = "auto", dtype: str = "float32") -> tuple[float, int]:
    """`gptkit eval`: (mean loss, tokens) of a model over a whole split of a prepared data directory."""
    from gptkit.data import SplitTokens, check_vocab, split_files
    from gptkit.loading import load_model
    from gptkit.runtime import pick_device

    if batch_size <= 0:
        raise GptkitError(f"must be > 0, got {batch_size}", "--batch-size", "give a positive batch size")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    split_files(data_dir, split)  # fail early, naming the directory
    loaded = load_model(model_path)
    model = loaded.model.to(dev)
    T = block_size or model.config.block_size
    if not 0 < T <= model.config.block_size:
        raise GptkitError(f"must be in 1..{model.config.block_size}, got {T}", "--block-size",
                          "leave it out to use the model's context")
    meta = read_meta(data_dir)
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise GptkitError(f"data vocab {meta['vocab_size']} exceeds the model's {model.config.vocab_size}",
                          data_dir, "evaluate on data prepared with the model's tokenizer")
    if "vocab_size" not in meta:  # e.g. llm.c's own shards: scan the ids instead
        toks = SplitTokens(data_dir, split)
        check_vocab(data_dir, toks.files, toks.shards, model.config.vocab_size)
    return evaluate(model, Path(data_dir), T, batch_size, dev, dt, split=split, progress=True)

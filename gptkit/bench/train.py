"""`gptkit bench train`: the median training-step time, tokens per second and MFU.

It times whole training steps (forward + backward + AdamW step) of a randomly initialised model.
With `--compare hf` it times transformers' GPT2LMHeadModel (LlamaForCausalLM for a Llama preset) of
the same shape, dtype and optimizer in the same process, so the two numbers share the machine's state.

MFU = (6·N + 12·L·C·T) · tokens/s / peak (PaLM appendix B), with N = `num_params()` and the peak
measured at the start of the run as the rate of a 2048³ GEMM in the run's dtype.

With `--lora` it measures peak training memory instead, full fine-tuning against LoRA (adapters on
a frozen base) of the same shape, side by side: each in a fresh process, so one's buffers never
count in the other's peak. On CUDA the peak is `torch.cuda.max_memory_allocated`; on a CPU it is
the process's peak resident memory (ru_maxrss) minus the same before the model was built.

Every system's line also carries `peak_mem_mib`, its training memory (weights, gradients, optimizer
state, activations) measured the same way: a few more steps in a fresh process per system, so that
neither the other system's pages nor the first system's one-time allocations count (`--no-memory`
skips it).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import resource
import statistics
import time
from typing import Callable

import torch

from gptkit import lora
from gptkit.bench.hf_twin import hf_model_for, transformers_module
from gptkit.config import MODEL_PRESETS, model_preset
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.optim import make_adamw
from gptkit.precision import ShadowWeights
from gptkit.runtime import (autocast, bf16_weights, measure_peak_flops, pick_device, pick_dtype, resolve_attention,
                            setup_training, synchronize)

HELP = "median training-step time (fwd+bwd+AdamW), tokens/s and MFU"


def _step_times(step_fn: Callable[[], object], steps: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        step_fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step_fn()
        sync()
        times.append(time.perf_counter() - t)
    return times



def bench_train(model: str = "gpt2", batch_size: int = 4, block_size: int = 64, dtype: str = "auto",
                steps: int = 10, warmup: int = 2, compare: list[str] | None = None, compile: bool = False,
                device: str = "auto", seed: int = 0, attention: str = "auto", param_dtype: str = "auto",
                threads: int = 0, memory: bool = True) -> list[dict]:
    """Median training-step time of gptkit (and of each system in `compare`, e.g. ["hf"]).

    Returns one dict per system with system, model, batch_size, block_size, dtype, median_step_s,
    tok_per_s, mfu (plus params, peak_flops, steps, compile, threads, and gptkit's attention and
    weights, and with `memory` peak_mem_mib). gptkit runs as the trainer does: `attention` and `param_dtype` resolve as there;
    transformers runs with autocast in `dtype` over fp32 weights and the same AdamW
    (`optim.make_adamw`: the trainer's groups, fused where PyTorch has it)."""
    if model not in MODEL_PRESETS:
        raise GptkitError(f"unknown model preset {model!r}", "--model", f"use one of {', '.join(MODEL_PRESETS)}")
    for name, v in (("--batch-size", batch_size), ("--block-size", block_size), ("--steps", steps)):
        if v <= 0:
            raise GptkitError(f"must be > 0, got {v}", name, "give a positive value")
    unknown = set(compare or []) - {"hf"}
    if unknown:
        raise GptkitError(f"unknown system(s) to compare: {', '.join(sorted(unknown))}", "--compare", "use hf")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    n_threads = setup_training(dev, threads)  # as the trainer; transformers shares the process and its settings
    cfg = model_preset(model, block_size=max(block_size, MODEL_PRESETS[model].get("block_size", 1024)),
                       attention=resolve_attention(attention, dev, block_size))
    if block_size > cfg.block_size:
        raise GptkitError(f"block size {block_size} exceeds the model's context {cfg.block_size}", "--block-size",
                          "use a smaller --block-size")
    peak = measure_peak_flops(dev, dt, n=2048, min_s=1.0)  # the MFU denominator, measured now, in this run's dtype
    sync = lambda: synchronize(dev)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=g).to(dev)
    dtype_name = str(dt).removeprefix("torch.")
    with torch.device("meta"):  # MFU's FLOPs per token, gptkit's count for both systems (no weights needed)
        flops_per_tok = GPT(cfg).flops_per_token(block_size)
    results = []

    def record(system: str, times: list[float], n_params: int) -> dict:
        med = statistics.median(times)
        tok_s = batch_size * block_size / med
        return {"system": system, "model": model, "batch_size": batch_size, "block_size": block_size,
                "dtype": dtype_name, "median_step_s": round(med, 6), "tok_per_s": round(tok_s, 1),
                "mfu": round(flops_per_tok * tok_s / peak, 4), "params": n_params, "peak_flops": round(peak),
                "steps": len(times), "compile": compile, "threads": n_threads}

    for system in ["gptkit"] + (["transformers"] if "hf" in (compare or []) else []):
        torch.manual_seed(seed)
        mode = "hf" if system == "transformers" else "full"
        step, net, n_params, shadowed = _training_step(mode, cfg, dev, dt, param_dtype, x, y, compile)
        row = record(system, _step_times(step, steps, warmup, sync), n_params)
        if mode == "hf":
            row.update(model_class=type(net).__name__)  # GPT2LMHeadModel or LlamaForCausalLM, as the preset's
        else:
            row.update(attention=cfg.attention, weights="bf16 + fp32 master" if shadowed else "fp32")
        results.append(row)
        del step, net
        gc.collect()
    if memory:
        ctx = multiprocessing.get_context("spawn")
        for row in results:
            mode = "hf" if row["system"] == "transformers" else "full"
            with ctx.Pool(1) as pool:
                m = pool.apply(_memory_worker, (mode, model, batch_size, block_size, dtype, min(steps, 3), 1, device,
                                                0, "", param_dtype, threads, compile))
            row.update(peak_mem_mib=m["peak_mem_mib"], mem_source=m["mem_source"])
    return results


def _training_step(mode: str, cfg, dev, dt, param_dtype: str, x, y, compile: bool = False, lora_rank: int = 0,
                   lora_targets: str = ""):
    """One system's training step, built as its users run it: mode "full" is gptkit as the trainer
    runs (bf16 weights with fp32 masters where `param_dtype` resolves so), "lora" the same with LoRA
    adapters on a frozen base, "hf" transformers' model of the same shape with autocast over fp32
    weights; all with `optim.make_adamw`. Returns (step function, model, trainable parameters,
    whether bf16 shadow weights are used)."""
    net = hf_model_for(cfg).to(dev).train() if mode == "hf" else GPT(cfg).to(dev)
    trainable = sum(p.numel() for p in net.parameters()) if mode == "hf" else net.num_params()  # tied head once
    if mode == "lora":
        lora.apply_lora(net, lora.LoraSpec(lora_rank, 2.0 * lora_rank, 0.0, lora.parse_targets(lora_targets, net)))
        trainable = lora.freeze_base(net)
    opt, _ = make_adamw(net, lr=1e-4, weight_decay=0.1, device_type=dev.type)
    use_shadow = mode != "hf" and bf16_weights(param_dtype, dt, dev)
    shadow = ShadowWeights(net, torch.bfloat16, sparse_tied=not compile) if use_shadow else None
    fwd = shadow.module if shadow else net
    fwd = torch.compile(fwd) if compile else fwd
    if compile and shadow:  # as the trainer: with plain AdamW, one compiled update pass
        shadow.fuse_adamw(opt)

    def step():
        with autocast(dev, dt):
            loss = fwd(input_ids=x, labels=x).loss if mode == "hf" else fwd(x, y)[1]  # HF shifts the labels itself
        loss.backward()
        if shadow:
            shadow.grads_to_master()
        shadow.step(opt) if shadow else opt.step()
        opt.zero_grad(set_to_none=True)
        if shadow:
            shadow.after_step()

    return step, net, trainable, shadow is not None


def bench_lora_memory(model: str = "gpt2", batch_size: int = 4, block_size: int = 64, dtype: str = "auto",
                      steps: int = 3, warmup: int = 1, device: str = "auto", lora_rank: int = 8,
                      lora_targets: str = "", param_dtype: str = "float32", threads: int = 0) -> list[dict]:
    """Peak training memory and step time, full fine-tuning vs LoRA, each measured in its own process.
    One dict per mode: the `bench train` fields plus mode, peak_mem_mib, mem_source, trainable_params."""
    if model not in MODEL_PRESETS:
        raise GptkitError(f"unknown model preset {model!r}", "--model", f"use one of {', '.join(MODEL_PRESETS)}")
    if lora_rank <= 0:
        raise GptkitError(f"must be > 0, got {lora_rank}", "--lora-rank", "give a rank such as 8")
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for mode in ("full", "lora"):
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_memory_worker, (mode, model, batch_size, block_size, dtype, steps, warmup,
                                                    device, lora_rank, lora_targets, param_dtype, threads)))
    return rows


def _memory_worker(mode, model, batch_size, block_size, dtype, steps, warmup, device, lora_rank, lora_targets,
                   param_dtype, threads, compile: bool = False) -> dict:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    n_threads = setup_training(dev, threads)  # as the trainer; transformers shares the process and its settings
    cfg = model_preset(model, block_size=max(block_size, MODEL_PRESETS[model].get("block_size", 1024)),
                       attention=resolve_attention("auto", dev, block_size))
    peak = measure_peak_flops(dev, dt, n=1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=g).to(dev)
    if mode == "hf":
        transformers_module()  # its import (and the memory it takes) is not training memory
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
    else:
        start, source = _cpu_peak_start()
    torch.manual_seed(0)
    step, net, trainable, _ = _training_step(mode, cfg, dev, dt, param_dtype, x, y, compile, lora_rank=lora_rank,
                                             lora_targets=lora_targets)
    if compile:  # what compiling allocates is not training memory: the peak starts again after a compiled step
        step()
        synchronize(dev)
        _reset_peak(dev)
    times = _step_times(step, steps, warmup, lambda: synchronize(dev))
    if dev.type == "cuda":
        used, source = torch.cuda.max_memory_allocated(dev) - start, "cuda_max_memory_allocated"
    else:
        used = _cpu_peak() - start
    med = statistics.median(times)
    tok_s = batch_size * block_size / med
    flops_per_tok = net.flops_per_token(block_size) if mode != "hf" else None
    return {"system": "transformers" if mode == "hf" else "gptkit", "mode": mode, "model": model,
            "batch_size": batch_size, "block_size": block_size,
            "dtype": str(dt).removeprefix("torch."), "median_step_s": round(med, 6), "tok_per_s": round(tok_s, 1),
            "mfu": round(flops_per_tok * tok_s / peak, 4) if flops_per_tok else None,
            "peak_mem_mib": round(used / 2**20, 1), "mem_source": source, "trainable_params": trainable,
            "params": trainable if mode == "hf" else net.num_params(), "lora_rank":
            lora_rank if mode == "lora" else 0, "steps": len(times), "threads": n_threads}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak(dev: torch.device) -> None:
    """The peak measured from now on starts at what is in use now (where the platform can reset it)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        _reset_cpu_peak()


def _reset_cpu_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: /proc/self/clear_refs, "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_start() -> tuple[int, str]:
    """Bytes to measure the peak from, and how. On Linux the process's peak RSS is reset first, so
    the peak measured is this run's, not an earlier high-water mark (the GEMM that measured the
    FLOP rate, say); elsewhere ru_maxrss, which cannot be reset."""
    if _reset_cpu_peak():
        return _status_kib("VmRSS") * 1024, "cpu_peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux: KiB


def _cpu_peak() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_arguments(p) -> None:
    p.add_argument("--model", default="gpt2", help="architecture preset (default gpt2, 124M)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention", default="auto", help="gptkit's attention backend (auto: as the trainer)")
    p.add_argument("--param-dtype", default="auto", help="gptkit's weights: auto, float32 or bfloat16 (fp32 master)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic, as the trainer)")
    p.add_argument("--compare", action="append", default=[], metavar="SYSTEM",
                   help="also time this system in the same run: hf (transformers)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (fresh processes)")
    p.add_argument("--lora", action="store_true",
                   help="peak training memory instead: full fine-tuning vs LoRA, side by side")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="", help="comma-separated modules (default: PEFT's, c_attn)")


def run(a) -> None:
    if a.lora:
        rows = bench_lora_memory(a.model, a.batch_size, a.block_size, a.dtype, a.steps, a.warmup, a.device,
                                 a.lora_rank, a.lora_targets, a.param_dtype, a.threads)
        print_rows(rows, a.json, ["mode", "model", "batch_size", "block_size", "dtype", "trainable_params",
                                  "peak_mem_mib", "median_step_s", "tok_per_s"])
        if not a.json:
            print(f"LoRA (rank {a.lora_rank}) uses {rows[1]['peak_mem_mib'] / rows[0]['peak_mem_mib']:.0%} of full "
                  f"fine-tuning's peak training memory ({rows[0]['mem_source']})")
        return
    rows = bench_train(a.model, a.batch_size, a.block_size, a.dtype, a.steps, a.warmup, a.compare, a.compile,
                       a.device, attention=a.attention, param_dtype=a.param_dtype, threads=a.threads,
                       memory=not a.no_memory)
    print_rows(rows, a.json, ["system", "model", "batch_size", "block_size", "dtype", "median_step_s", "tok_per_s",
                              "mfu", "peak_mem_mib"])
    if not a.json and len(rows) > 1:
        base = rows[0]["median_step_s"]
        for r in rows[1:]:
            print(f"gptkit is {r['median_step_s'] / base:.2f}x faster than {r['system']}")


def print_rows(rows: list[dict], as_json: bool, columns: list[str]) -> None:
    """JSON lines, or an aligned table of `columns`."""
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


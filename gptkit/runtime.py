"""Device, dtype, autocast, threads and torch.distributed: decided here and nowhere else.

This is the only module that reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptkit.errors import GptkitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str = "auto", where: str = "--device") -> torch.device:
    """auto = cuda > mps > cpu. `where`: the option that named it (`--device`, or train's `device` key)."""
    if name == "auto":
        if torch.cuda.is_available():  # pragma: no cover (GPU: CI runs on a CPU)
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():  # pragma: no cover (Apple GPU)
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    sep = " " if where.startswith("--") else "="
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise GptkitError(f"unknown device {name!r}", where, f"use {where}{sep}auto, cpu, cuda[:N] or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptkitError("CUDA is not available on this machine", where, f"use {where}{sep}cpu or {where}{sep}auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GptkitError("MPS is not available on this machine", where, f"use {where}{sep}cpu or {where}{sep}auto")
    return dev


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls beat fp32 on this CPU."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype. auto = bf16 where the hardware runs it fast, else fp32."""
    if name != "auto":
        dt = DTYPES[name]
        if dt == torch.float16 and device.type == "cpu":
            raise GptkitError("float16 training is not supported on the CPU", "dtype", "use bfloat16 or float32")
        return dt
    if device.type == "cuda":  # pragma: no cover (GPU: CI runs on a CPU)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for forward passes (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_attention(name: str, device: torch.device, block_size: int) -> str:
    """`auto` = math on a CPU for contexts up to 128 (PyTorch's CPU sdpa backward is slower there,
    measured in bf16 at T=64), else sdpa."""
    if name != "auto":
        return name
    return "math" if device.type == "cpu" and block_size <= 128 else "sdpa"


def bf16_weights(param_dtype: str, dtype: torch.dtype, device: torch.device, distributed: bool = False) -> bool:
    """Whether to run forward/backward on a bf16 copy of fp32 master weights (gptkit.precision).
    `auto` = yes for bf16 compute on a CPU in a single process (1.5x faster than autocast there)."""
    if param_dtype in ("bfloat16", "bf16"):
        return True
    return param_dtype == "auto" and dtype == torch.bfloat16 and device.type == "cpu" and not distributed


def setup_threads(threads: int = 0) -> int:
    """Set PyTorch's CPU threads; 0 = automatic: PyTorch's default (one per core), except on a small
    machine whose cores other processes keep busy, where one thread is used. An OpenMP team whose
    threads share cores with other work stalls at every barrier: measured on 2 busy cores, 2 threads
    ran the default training run's steps 2-7x slower than 1 (and 1.6x faster than 1 on idle cores). Returns the
    number of threads."""
    if threads <= 0:
        cores = os.cpu_count() or 1
        if cores <= 4 and _busy_cores() >= 0.5:
            threads = 1
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(device: torch.device | None = None) -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
    mmap and unmaps it on free, and returns the top of its heap once more than the trim threshold
    is free. A CPU training step frees and allocates the same large buffers every time (activations,
    gradients, logits), so each step page-faults them in again and the kernel zeroes every page.
    Measured on 2 cores: the default run made 584 and 606 steps in 30 s against 420 and 450 without
    this, and a GPT-2 124M step (B=4, T=64) took 0.45-0.47 s against 0.54-0.55 s. PyTorch's own CPU
    launcher reaches the same end by preloading jemalloc or tcmalloc.

    Sets mallopt(M_MMAP_MAX, 0) (no mmap for malloc: every block from the heap, reused) and
    M_TRIM_THRESHOLD to 2 GiB. Does nothing, and returns False, off Linux/glibc, when the user set
    any of glibc's MALLOC_* variables or malloc tunables, or preloads another allocator, or when
    `device` is given and is not the CPU. Process-wide and for the process's lifetime: the trainer
    and `bench train` call it with their device, not the library on import."""
    if device is not None and device.type != "cpu":
        return False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def setup_training(device: torch.device, threads: int = 0) -> int:
    """A training process's settings, in one place for the trainer and `bench train`: PyTorch's
    threads (`setup_threads`), glibc's malloc keeping freed memory on a CPU (`keep_freed_memory`)
    and TF32 on CUDA (`setup_cuda_matmul`). Returns the number of threads."""
    n_threads = setup_threads(threads)
    keep_freed_memory(device)
    setup_cuda_matmul()
    return n_threads


def _busy_cores(window_s: float = 0.2) -> float:
    """How many cores other processes keep busy right now, from /proc/stat over `window_s` while
    this process waits (the 1-minute load average lags by a minute, and counts runs just ended)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (OSError, AttributeError):
            return 0.0
    total = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / total)


def process_start_time() -> float:
    """When this process started (time.time() scale): Linux's /proc, else now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def setup_cuda_matmul() -> None:
    """TF32 for fp32 matmuls on CUDA (Ampere and later)."""
    if torch.cuda.is_available():  # pragma: no cover (GPU: CI runs on a CPU)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # pragma: no cover (GPU: CI runs on a CPU)
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover (Apple GPU)
        torch.mps.synchronize()


_PEAK_CACHE: dict = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 3,
                       min_s: float = 0.0) -> float:
    """Measured matmul peak (FLOP/s) of an n^3 GEMM in `dtype`: the denominator of MFU. The best of
    `reps` GEMMs, and of as many more as fit in `min_s` seconds: on a shared machine a few GEMMs
    can all land in a slow moment, and a low peak inflates every MFU measured against it."""
    key = (str(device), dtype, n)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout, resume) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    synchronize(device)
    best, start, done = float("inf"), time.perf_counter(), 0
    while done < reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best, done = min(best, time.perf_counter() - t0), done + 1
    _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]


@dataclass
class Dist:
    """The process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process of its own (readable before torch.distributed starts)."""
    return os.environ.get("RANK", "0") == "0"


def setup_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name, "device")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, "device")
    if device.type == "cuda":  # pragma: no cover (GPU: CI runs on a CPU)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world), device


def teardown_distributed(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

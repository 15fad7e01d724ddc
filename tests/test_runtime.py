"""Device and dtype choice, and the /proc readers' fallbacks off Linux."""

import pytest
import torch

from gptkit import runtime
from gptkit.errors import GptkitError


def test_device_choice_and_unavailable_devices_are_user_errors(monkeypatch):
    assert runtime.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.pick_device("auto") == torch.device("cpu")
    for name in ("cuda", "mps"):
        with pytest.raises(GptkitError) as e:
            runtime.pick_device(name)
        assert e.value.where == "--device" and "not available" in e.value.what


def test_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.pick_dtype("bf16", cpu) == torch.bfloat16 and runtime.pick_dtype("fp32", cpu) == torch.float32
    with pytest.raises(GptkitError) as e:
        runtime.pick_dtype("float16", cpu)
    assert e.value.where == "dtype"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.pick_dtype("auto", cpu) == torch.float32
    assert runtime.pick_dtype("auto", torch.device("meta")) == torch.float32


def test_proc_readers_fall_back_without_proc(monkeypatch):
    def no_proc(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(runtime, "open", no_proc, raising=False)  # the module's open(), as off Linux
    assert runtime.cpu_has_fast_bf16() is False
    monkeypatch.setattr(runtime.time, "time", lambda: 1234.5)
    assert runtime.process_start_time() == 1234.5
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.5, 0, 0))
    assert runtime._busy_cores(0.0) == 1.5
    monkeypatch.delattr(runtime.os, "getloadavg")
    assert runtime._busy_cores(0.0) == 0.0
    runtime.synchronize(torch.device("cpu"))  # a no-op on the CPU


# keep_freed_memory: what glibc does with a 64 MiB buffer, read from its own counters (mallinfo2), in
# a fresh interpreter (the setting is process-wide). "mapped" counts mmapped blocks, "arena" the heap.
_MALLOC_PROBE = r"""
import ctypes, json, sys
import torch
from gptkit import runtime

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = runtime.keep_freed_memory() if sys.argv[1] == "on" else False
before = libc.mallinfo2()
x = torch.ones(64 << 20, dtype=torch.uint8)
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mapped": during.hblkhd - before.hblkhd,
                  "arena_kept": after.arena - before.arena}))
"""


def _malloc_probe(mode, env=None):
    import json
    import os
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run_env.update(env or {})
    r = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, env=run_env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(not runtime.sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_keep_freed_memory_serves_large_buffers_from_the_heap_and_keeps_them():
    off = _malloc_probe("off")
    assert off["mapped"] >= 64 << 20  # glibc's default: a fresh mmap, unmapped again on free
    on = _malloc_probe("on")
    assert on["applied"] is True
    assert on["mapped"] == 0  # from the heap ...
    assert on["arena_kept"] >= 64 << 20  # ... and still there after the free, for the next step to reuse


def test_keep_freed_memory_leaves_a_users_own_malloc_settings_alone(monkeypatch):
    # each returns before mallopt is called, so this process's malloc is untouched
    for name, value in (("MALLOC_TRIM_THRESHOLD_", "131072"), ("MALLOC_MMAP_MAX_", "65536"),
                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=1"), ("LD_PRELOAD", "libjemalloc.so.2")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert runtime.keep_freed_memory() is False, name


def test_the_trainer_keeps_freed_memory_on_a_cpu(monkeypatch):
    from gptkit import train as train_mod
    from gptkit.config import TrainConfig

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda device: calls.append(device.type) or True)
    train_mod.Trainer(TrainConfig(device="cpu", threads=1))
    assert calls == ["cpu"]


def test_keep_freed_memory_is_for_a_cpu_run_only():
    assert runtime.keep_freed_memory(torch.device("meta")) is False  # returns before touching malloc


def test_peak_flops_takes_the_best_gemm_of_its_minimum_window(monkeypatch):
    # a shared machine can run three GEMMs slow in a row; bench train measures for a second and keeps the best
    calls = []
    monkeypatch.setattr(runtime, "synchronize", lambda device: calls.append(device))
    monkeypatch.setattr(runtime, "_PEAK_CACHE", {})
    cpu = torch.device("cpu")
    runtime.measure_peak_flops(cpu, torch.float32, n=32, reps=3)
    assert len(calls) == 1 + 3  # the warm-up, then the reps
    calls.clear()
    peak = runtime.measure_peak_flops(cpu, torch.float32, n=48, reps=3, min_s=0.2)
    assert len(calls) > 1 + 20 and peak > 0
    assert runtime.measure_peak_flops(cpu, torch.float32, n=48) == peak  # one reading per process and shape

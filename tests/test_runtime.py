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

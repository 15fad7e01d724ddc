"""Benchmarks, outside the core package: `gptkit bench train|generate`, the attention benchmark
(`python -m gptkit.bench.attention`) and the server load test (`python -m gptkit.bench.loadtest`).

TARGETS maps each `gptkit bench` target to (add_arguments(parser), run(args), help).
"""

from __future__ import annotations

from typing import Callable

from gptkit.bench import generate, train

TARGETS: dict[str, tuple[Callable, Callable, str]] = {
    "train": (train.add_arguments, train.run, train.HELP),
    "generate": (generate.add_arguments, generate.run, generate.HELP),
}

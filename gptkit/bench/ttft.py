"""`gptkit bench generate --ttft`: time to first token of one long prompt (prefill), vs transformers.

A prompt of `prompt_tokens` random tokens (512 in the docs; the gpt2 shape's context is 1024), batch
1 by default, greedy. gptkit's clock covers what a caller of the engine pays: building a
`Generation`, then steps until the first token comes out (the prefill, then the first sample).
transformers' covers `generate(..., max_new_tokens=1)`, as its users time a first token. Both run
the same random weights (`gptkit.bench.hf_twin`), interleaved, `repeats` times; the median counts.

Each line: system, model, dtype, batch, prompt_tokens, new_tokens (1), ttft_s, tok_per_s (prompt
tokens prefilled per second: batch * prompt_tokens / ttft_s) and, with compare="hf",
vs_transformers = transformers' ttft / this ttft (> 1: gptkit's first token comes sooner).
"""

from __future__ import annotations

import statistics
import time

import torch

from gptkit.bench.hf_twin import hf_model_from
from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams
from gptkit.quantize import normalize_dtype, quantize_for_inference


def ttft_gptkit(model, prompts: list[list[int]], prefill_chunk: int = 0) -> float:
    """Seconds from building the engine to the first token of every row."""
    t = time.perf_counter()
    gen = Generation(model, prompts, SamplingParams(max_new_tokens=1, temperature=0, ignore_eot=True))
    gen.prefill_chunk = prefill_chunk
    while not gen.done:
        gen.step()
    return time.perf_counter() - t


def ttft_hf(hf, prompts: list[list[int]]) -> float:
    """Seconds of transformers' `generate(..., max_new_tokens=1)` (greedy)."""
    idx = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=1, do_sample=False,
                    pad_token_id=hf.config.eos_token_id)
    return time.perf_counter() - t


def bench_ttft(model, name: str, batches=(1,), prompt_tokens: int = 512, dtypes=("float32",),
               compare: str | None = None, repeats: int = 3, seed: int = 0, emit=None) -> list[dict]:
    """Time to first token for each (system, dtype, batch); returns (and passes to `emit`) one dict each."""
    if prompt_tokens < 1 or repeats < 1 or any(b < 1 for b in batches):
        raise GptkitError("batch sizes, --prompt-tokens and --repeats must be >= 1", "bench generate --ttft",
                          "give positive values")
    if compare not in (None, "hf"):
        raise GptkitError(f"unknown comparison {compare!r}", "--compare", "use --compare hf")
    if prompt_tokens + 1 > model.config.block_size:
        raise GptkitError(f"{prompt_tokens} prompt tokens leave no room for a new token in the context "
                          f"{model.config.block_size}", "--prompt-tokens",
                          f"use at most {model.config.block_size - 1}")
    variants = {d: quantize_for_inference(model, d) for d in (normalize_dtype(x) for x in dtypes)}
    hf = hf_model_from(model) if compare == "hf" else None
    emit = emit or (lambda r: None)
    results = []
    for B in batches:
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, model.config.vocab_size, (B, prompt_tokens), generator=g).tolist()
        jobs = [(("gptkit", d), lambda q=q: ttft_gptkit(q, prompts)) for d, q in variants.items()]
        if hf is not None:
            jobs.append((("transformers", "float32"), lambda: ttft_hf(hf, prompts)))
        for _, fn in jobs:  # warm-up: first calls pay for allocations and kernel selection
            fn()
        runs: dict[tuple, list[float]] = {}
        for _ in range(repeats):  # interleaved, so load changes hit every system alike
            for key, fn in jobs:
                runs.setdefault(key, []).append(fn())
        ref = statistics.median(runs[("transformers", "float32")]) if hf is not None else None
        for (system, d), ts in runs.items():
            s = statistics.median(ts)
            r = {"system": system, "model": name, "dtype": d, "batch": B, "prompt_tokens": prompt_tokens,
                 "new_tokens": 1, "ttft_s": round(s, 4), "tok_per_s": round(B * prompt_tokens / s, 1),
                 "threads": torch.get_num_threads()}
            if ref is not None:
                r["vs_transformers"] = round(ref / s, 3)
            results.append(r)
            emit(r)
    return results

"""`gptkit bench generate --speculative ngram|draft`: acceptance rate and speed-up of speculative
decoding over plain greedy decoding (batch 1), on repetitive text (code whose prompt repeats) and on
plain prose, in the same run. Both decoders produce the same tokens; each line says so (`same`).

The draft model is `--draft-model`, or by default the target's own first two layers (layer-skip
self-speculation: no second model to load, and better than chance even with random weights).
The clock covers the whole call, prefill included; the median of `repeats` interleaved runs counts.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams
from gptkit.speculative import ModelDrafter, NgramDrafter, speculative_generate

CODE = '''def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    total = 0
    for x in xs:
        total += (x - m) ** 2
    return total / len(xs)


def std(xs):
'''

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of "
         "boiled cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, "
         "had been tacked to the wall.")


def first_layers(model, n: int = 2):
    """A copy of `model` that keeps its first n blocks (embeddings, final norm and head shared in value)."""
    m = copy.deepcopy(model)
    m.transformer.h = m.transformer.h[:n]
    m.config = dataclasses.replace(model.config, n_layer=n)
    return m.eval()


def _plain(model, prompt, n) -> tuple[list[int], float]:
    t = time.perf_counter()
    gen = Generation(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eot=True))
    out = gen.completions()[0].token_ids
    return out, time.perf_counter() - t


def _spec(model, prompt, n, drafter, k):
    t = time.perf_counter()
    out, stats = speculative_generate(model, prompt, drafter, n, k)
    return out, stats, time.perf_counter() - t


def bench_speculative(model, tokenizer, kind: str, draft=None, new_tokens: int = 64, k: int = 4,
                      repeats: int = 3, emit=None) -> list[dict]:
    """One dict per text (repetitive, plain): acceptance, target passes, tok/s of both, speed-up."""
    if kind not in ("ngram", "draft"):
        raise GptkitError(f"unknown drafter {kind!r}", "--speculative", "use ngram or draft")
    if kind == "draft" and draft is None:
        draft = first_layers(model)
    drafter = NgramDrafter() if kind == "ngram" else ModelDrafter(draft)
    results = []
    for name, text in (("repetitive", CODE), ("plain", PROSE)):
        prompt = tokenizer.encode(text)[-(model.config.block_size - new_tokens - 1):]
        _plain(model, prompt, 4), _spec(model, prompt, 4, drafter, k)  # warm-up
        plain_t, spec_t = [], []
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            want, t = _plain(model, prompt, new_tokens)
            plain_t.append(t)
            got, stats, t = _spec(model, prompt, new_tokens, drafter, k)
            spec_t.append(t)
        n = len(want)
        r = {"system": "gptkit", "speculative": kind, "text": name, "batch": 1, "prompt_tokens": len(prompt),
             "new_tokens": n, "draft_k": k, "acceptance": round(stats.acceptance, 3),
             "tokens_per_pass": round(stats.new_tokens / max(1, stats.target_passes), 2),
             "plain_tok_per_s": round(n / statistics.median(plain_t), 2),
             "tok_per_s": round(len(got) / statistics.median(spec_t), 2),
             "speedup": round(statistics.median(plain_t) / statistics.median(spec_t), 3),
             "same": got == want, "threads": torch.get_num_threads()}
        results.append(r)
        if emit:
            emit(r)
    return results

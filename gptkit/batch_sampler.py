"""The sampler of `gptkit.generate`'s engine: the next token of every row of a step, each row with
its own settings (`SamplingParams`: greedy or sampled, temperature, top-k, top-p, penalties, logit
bias, seed). The settings live as tensors, rebuilt only when the batch's rows change; a seeded row
draws its uniform number from its own generator, so its sample does not depend on the batch. The
math itself is `gptkit.sample`'s.

Shapes: B rows, V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gptkit.quantize import screen_size
from gptkit.sample import presence_frequency_penalty, repetition_penalty, sample_from_logits, sample_unfiltered

if TYPE_CHECKING:  # the engine's types, for annotations only (gptkit.generate imports this module)
    from gptkit.generate import SamplingParams, _Row


def reshapes_logits(sp: SamplingParams) -> bool:
    """Does this row need all V logits exact (penalties, bias, or logprobs asked for)?"""
    return (sp.repetition_penalty != 1.0 or bool(sp.presence_penalty or sp.frequency_penalty or sp.logit_bias)
            or sp.logprobs is not None)


class BatchSampler:
    """Chooses the next token of every row of a step from its logits, each row with its own
    settings. The settings are kept as tensors, rebuilt whenever the batch's rows change."""

    def __init__(self, vocab_size: int, device, generator: torch.Generator | None):
        self.V, self.device = vocab_size, device
        self.generator = generator  # for rows without a seed (None: torch's global RNG)
        self.rows: list[_Row] | None = None  # the rows the tensors were built for

    def screen_k(self, rows: list[_Row]) -> int | None:
        """The number of top logits that can matter for these rows, or None for all of them: every
        row greedy or top-k, and no penalty or logit bias."""
        V = self.V
        if any(reshapes_logits(r.params) for r in rows):
            return None
        ks = [screen_size(r.params.temperature, r.params.top_k, V) for r in rows]
        return None if None in ks else max(ks)

    def _build(self, rows: list[_Row]) -> None:
        self.rows = list(rows)
        dev = self.device
        V = self.V
        p = [r.params for r in rows]
        self.greedy = torch.tensor([sp.temperature == 0 for sp in p], device=dev)
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        self.temperature = torch.tensor([sp.temperature or 1.0 for sp in p], device=dev)
        self.top_k = torch.tensor([min(sp.top_k, V) if sp.top_k else V for sp in p], device=dev)
        self.top_p = torch.tensor([sp.top_p if sp.top_p is not None else 1.0 for sp in p], device=dev)
        self.penalty = torch.tensor([sp.repetition_penalty for sp in p], device=dev)
        # sampled rows with neither top-k nor top-p draw over the whole vocabulary in its own order:
        # no sort of V logits, which the fused top-k/top-p sampler needs (100 ms for 32 x 50257 here)
        plain = [sp.temperature > 0 and not (sp.top_k and sp.top_k < V) and (sp.top_p is None or sp.top_p >= 1.0)
                 for sp in p]
        filtered = [sp.temperature > 0 and not pl for sp, pl in zip(p, plain)]
        self.plain_rows = torch.tensor([i for i, x in enumerate(plain) if x], dtype=torch.long, device=dev)
        self.filtered_rows = torch.tensor([i for i, x in enumerate(filtered) if x], dtype=torch.long, device=dev)
        self._build_penalties(rows)
        self.seen = None  # (B, V) bool: the tokens in each row's context, for the repetition penalty
        if any(sp.repetition_penalty != 1.0 for sp in p):
            self.seen = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)
            for i, r in enumerate(rows):
                self.seen[i, torch.tensor(r.prompt + r.tokens, device=dev).clamp(max=V - 1)] = True

    def _build_penalties(self, rows: list[_Row]) -> None:
        """OpenAI's logit_bias (B, V) and generated-token counts (B, V), where a row asks for them."""
        dev, V, p = self.device, self.V, [r.params for r in rows]
        self.bias = self.counts = None
        if any(sp.logit_bias for sp in p):
            self.bias = torch.zeros(len(rows), V, device=dev)
            for i, sp in enumerate(p):
                for t, b in (sp.logit_bias or {}).items():
                    self.bias[i, int(t)] = float(b)
        if any(sp.presence_penalty or sp.frequency_penalty for sp in p):
            self.presence = torch.tensor([sp.presence_penalty for sp in p], device=dev)
            self.frequency = torch.tensor([sp.frequency_penalty for sp in p], device=dev)
            self.counts = torch.zeros(len(rows), V, device=dev)
            for i, r in enumerate(rows):
                if r.tokens:
                    ids = torch.tensor(r.tokens, device=dev).clamp(max=V - 1)
                    self.counts[i].index_add_(0, ids, torch.ones(len(r.tokens), device=dev))

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor:
        """One uniform number per row (B,): a seeded row's from its own generator."""
        u = torch.empty(len(rows))
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            g = self.generator
            u[unseeded] = torch.rand(len(unseeded), generator=g, device=g.device if g is not None else "cpu").cpu()
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator).item()
        return u

    def choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (B,) on the CPU for rows with logits (B, V); marks them seen."""
        if rows != self.rows:
            self._build(rows)
        # OpenAI's logit_bias, then the repetition penalty, then presence/frequency (vLLM's order)
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.penalty)
        if self.counts is not None:
            logits = presence_frequency_penalty(logits, self.counts, self.presence, self.frequency)
        if self.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            u = self._uniforms(rows).to(logits.device)
            tokens = logits.argmax(dim=-1) if self.any_greedy else torch.zeros(len(rows), dtype=torch.long,
                                                                                    device=logits.device)
            f = self.filtered_rows
            if len(f):
                tokens[f] = sample_from_logits(logits[f], self.temperature[f], self.top_k[f], self.top_p[f], u[f])
            f = self.plain_rows
            if len(f):
                tokens[f] = sample_unfiltered(logits[f], self.temperature[f], u[f])
        if self.seen is not None:
            self.seen[torch.arange(len(rows), device=self.device), tokens.to(self.device)] = True
        if self.counts is not None:
            self.counts[torch.arange(len(rows), device=self.device), tokens.to(self.device)] += 1
        return tokens.cpu()

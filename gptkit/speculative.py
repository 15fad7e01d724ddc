"""Speculative decoding for one sequence (batch 1): a cheap drafter proposes k tokens, the target
model checks them all in one forward pass through its KV cache, and the output is exactly what
plain decoding would give.

- Greedy (temperature 0): the longest drafted prefix that matches the target's argmax is kept,
  plus the target's own next token; the cache is rolled back past the rejected drafts. The tokens
  are those of plain greedy decoding.
- Sampled: the accept/reject rule of Leviathan et al. (2023) and Chen et al. (2023): draft x drawn
  from q is kept with probability min(1, p(x)/q(x)); on a rejection the token is drawn from
  norm(max(0, p - q)), and after k acceptances one more from p. Every kept token is distributed
  as p, the target's distribution after temperature, top-k and top-p (applied the same way to q).
- Drafters: `NgramDrafter` (prompt lookup: the tokens that followed the latest earlier occurrence
  of the sequence's last n tokens; q is a point mass, so a draft is kept with probability p(x)) and
  `ModelDrafter` (a smaller model with the same tokenizer, with its own KV cache).

Batch 1 only; penalties and logit bias are not supported here (they change p with every token).
Shapes: T time, k drafts, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache
from gptkit.quantize import only_top_k_logits, screen_size
from gptkit.sample import top_k_filter, top_p_filter


def target_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution a token is sampled from: logits (n, V) -> probs (n, V) after temperature,
    top-k and top-p (the same filters as `gptkit.sample.sample_next`). Greedy: one-hot argmax."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.softmax(logits, dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs (V,), which need not be normalised."""
    return int(torch.multinomial(probs, 1, generator=generator))


def verify(p: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None, greedy: bool,
           generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """The tokens kept from one round: p (k+1, V) the target's distributions at each draft's position
    and one past the last; drafts (k,); q (k, V) the drafter's distributions, or None for point masses
    at the drafts. Returns (new tokens, number of drafts accepted): the accepted drafts plus one token
    from the target (a correction or the bonus)."""
    out: list[int] = []
    for i, x in enumerate(drafts):
        if greedy:
            t = int(p[i].argmax())
            if t != x:
                return out + [t], i
            out.append(x)
            continue
        qx = 1.0 if q is None else float(q[i, x])
        px = float(p[i, x])
        u = float(torch.rand(1, generator=generator))
        if qx > 0 and u < min(1.0, px / qx):
            out.append(x)
            continue
        if q is None:  # max(0, p - delta_x): p without x
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return out + [_draw(residual, generator)], i
    last = p[len(drafts)]
    return out + [int(last.argmax()) if greedy else _draw(last, generator)], len(drafts)


class NgramDrafter:
    """Prompt lookup: find the first earlier occurrence of the last n tokens (n from max_n down to
    min_n) and propose the k tokens that followed it (the first one has the longest continuation:
    in a run of one token, the latest would be followed by a single token). No model; q is a point
    mass (None)."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def reset(self, tokens: Sequence[int]) -> None:
        pass

    def rollback(self, n: int) -> None:
        pass

    def propose(self, tokens: list[int], k: int, sampling) -> tuple[list[int], torch.Tensor | None]:
        T = len(tokens)
        for n in range(min(self.max_n, T - 1), self.min_n - 1, -1):
            tail = tokens[T - n:]
            for s in range(T - n):  # the match must be followed by at least one token
                if tokens[s:s + n] == tail:
                    return tokens[s + n:s + n + k], None
        return [], None


class ModelDrafter:
    """A small model with the target's tokenizer drafts k tokens autoregressively (greedy or sampled
    from its own filtered distribution q), with its own KV cache that holds every token but the last."""

    def __init__(self, model: GPT, generator: torch.Generator | None = None):
        self.model = model
        self.generator = generator
        self.device = model.transformer.wte.weight.device
        self.cache: KVCache | None = None

    def reset(self, tokens: Sequence[int]) -> None:
        cfg = self.model.config
        self.cache = KVCache(cfg, 1, cfg.block_size, self.device, self.model.transformer.wte.weight.dtype)

    def rollback(self, n: int) -> None:
        """Keep the keys and values of the first n tokens only."""
        self.cache.pos = min(self.cache.pos, n)

    def propose(self, tokens: list[int], k: int, sampling) -> tuple[list[int], torch.Tensor | None]:
        k = min(k, self.model.config.block_size - len(tokens))
        drafts, qs = [], []
        seq = list(tokens)
        temperature, top_k = sampling[0], sampling[1]
        screen = screen_size(temperature, top_k, self.model.config.vocab_size)
        for _ in range(k):
            idx = torch.tensor([seq[self.cache.pos:]], device=self.device)
            with only_top_k_logits(self.model, screen):  # q needs only the logits that survive top-k
                logits = self.model(idx, cache=self.cache, last_only=True)[0, -1:]  # (1, V)
            q = target_probs(logits, *sampling)[0]
            x = int(q.argmax()) if sampling[0] == 0 else _draw(q, self.generator)
            drafts.append(x)
            qs.append(q)
            seq.append(x)
        return drafts, (torch.stack(qs) if qs else None)


@dataclass
class SpecStats:
    """One run's counts: drafted and accepted tokens, target forward passes, tokens generated."""

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    new_tokens: int = 0
    per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(model: GPT, prompt: Sequence[int], drafter, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         stop_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                         ) -> tuple[list[int], SpecStats]:
    """Continue `prompt` (token ids) by up to max_new_tokens tokens with speculative decoding: the
    same tokens as plain greedy decoding at temperature 0, the same distribution when sampled.
    Stops at a token in stop_ids (not returned). Returns (new token ids, SpecStats)."""
    cfg = model.config
    V = cfg.vocab_size
    if getattr(drafter, "model", None) is not None and drafter.model.config.vocab_size != V:
        raise GptkitError(f"draft vocabulary {drafter.model.config.vocab_size} != target's {V}", "--draft-model",
                          "the draft model must share the target's tokenizer")
    if not prompt or len(prompt) >= cfg.block_size:
        raise GptkitError(f"prompt has {len(prompt)} tokens, the context is {cfg.block_size}", "prompt",
                          "give between 1 and block_size - 1 tokens")
    sampling = (temperature, top_k, top_p)
    greedy = temperature == 0
    device = model.transformer.wte.weight.device
    cache = KVCache(cfg, 1, cfg.block_size, device, model.transformer.wte.weight.dtype)
    seq = list(prompt)
    stops = set(int(t) for t in stop_ids)
    stats = SpecStats()
    drafter.reset(seq)
    # the target's cache holds every token but the last; each round feeds the last one and the drafts.
    # The prompt goes in first on its own, so that no round computes logits for the prompt's positions.
    cache_pos_ok = 0
    if len(seq) > 1:
        model(torch.tensor([seq[:-1]], device=device), cache=cache, last_only=True)
        cache_pos_ok = len(seq) - 1
    # only the top logits matter for greedy (1) or top-k sampling (k): a screened head reads half the bytes
    screen = screen_size(temperature, top_k, V)
    out: list[int] = []
    while len(out) < max_new_tokens:
        if len(seq) >= cfg.block_size:  # past the context: plain decoding's sliding window, one token
            with only_top_k_logits(model, screen):
                logits = model(torch.tensor([seq[-cfg.block_size:]], device=device), last_only=True)[0]
            new, _ = verify(target_probs(logits, *sampling), [], None, greedy, generator)
            stats.target_passes += 1
        else:
            room = cfg.block_size - len(seq)  # drafts must fit in the context with the bonus token
            budget = min(k, room, max_new_tokens - len(out) - 1)
            drafts, q = drafter.propose(seq, budget, sampling) if budget > 0 else ([], None)
            drafts = drafts[:budget]
            q = q[:len(drafts)] if q is not None else None
            cache.pos = cache_pos_ok
            idx = torch.tensor([seq[cache_pos_ok:] + drafts], device=device)
            with only_top_k_logits(model, screen):
                logits = model(idx, cache=cache)[0, -(len(drafts) + 1):]  # (k+1, V)
            new, a = verify(target_probs(logits, *sampling), drafts, q, greedy, generator)
            stats.target_passes += 1
            stats.drafted += len(drafts)
            stats.accepted += a
            stats.per_round.append(a)
            cache_pos_ok = len(seq) + a  # the keys of seq and the accepted drafts are right
            drafter.rollback(cache_pos_ok)
        for t in new:
            if t in stops:
                stats.new_tokens = len(out)
                return out, stats
            out.append(t)
            seq.append(t)
            if len(out) >= max_new_tokens:
                break
    stats.new_tokens = len(out)
    return out, stats

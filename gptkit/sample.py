"""Sampling strategies as pure functions of logits.

Shapes: B rows, V vocab, K candidates. Temperature 0 means greedy. Filters take logits (B, V) and
return logits with the removed entries set to -inf; they compose in the order transformers applies
them (repetition penalty, then temperature, top-k, top-p).

`sample_from_logits` is the fused version the engine uses: it keeps only the top-k candidates (or
sorts the row when there is no top-k), applies temperature/top-p on that small set, and draws by
inverse CDF from one uniform number per row. Drawing from a caller-given uniform makes a seeded row
reproducible no matter which other rows share its batch.

Nothing here knows about models, caches or text: the engine (`gptkit.generate`) calls these
functions on the logits of each step.
"""

from __future__ import annotations


import torch


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability sums to >= p
    (always at least the most likely token). A token whose more likely tokens already sum to p
    exactly is removed, as transformers' TopPLogitsWarper removes it."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = cum - probs >= p  # tokens whose preceding mass already reaches p
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty (as transformers applies it): for tokens already in the context,
    positive logits are divided by `penalty` and negative ones multiplied by it.
    logits (B, V); seen (B, V) bool; penalty a number or (B,) -> logits (B, V)."""
    if not torch.is_tensor(penalty):
        if penalty == 1.0:
            return logits
        penalty = torch.tensor(float(penalty), device=logits.device)
    pen = penalty.to(logits.dtype).reshape(-1, 1) if penalty.dim() else penalty.to(logits.dtype)
    scaled = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, scaled, logits)


def presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                               frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logit[j] -= frequency * c[j] + presence * (c[j] > 0),
    where c[j] counts token j among the tokens generated so far (not the prompt, as vLLM does).
    logits (B, V); counts (B, V); presence, frequency (B,) -> logits (B, V)."""
    counts = counts.to(logits.dtype)
    return logits - frequency.to(logits.dtype)[:, None] * counts - presence.to(logits.dtype)[:, None] * (counts > 0)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), by the reference filters and torch.multinomial."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def candidate_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution top-k/top-p sampling draws from, on a small candidate set.

    logits (B, V) float; temperature (B,) > 0; top_k (B,) int in [1, V] (V = no top-k); top_p (B,)
    in (0, 1] (1 = no top-p). Returns probs (B, K), unnormalised with removed entries 0, in
    descending order, and their token ids (B, K)."""
    V = logits.size(-1)
    kmax = int(top_k.max())
    if kmax < V:
        vals, ids = torch.topk(logits, kmax, dim=-1)  # (B, K), sorted
    else:
        vals, ids = torch.sort(logits, dim=-1, descending=True)
    vals = vals.float() / temperature.float()[:, None]
    col = torch.arange(vals.size(1), device=vals.device)
    vals = vals.masked_fill(col[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    cum = probs.cumsum(dim=-1)
    # the preceding mass already reaches p (top_p 1 removes nothing, even where rounding sums to 1)
    remove = ((cum - probs) >= top_p.float()[:, None]) & (top_p < 1.0)[:, None]
    remove[:, 0] = False
    return probs.masked_fill(remove, 0.0), ids


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       u: torch.Tensor) -> torch.Tensor:
    """Fused temperature + top-k + top-p sampling: token ids (B,) drawn by inverse CDF with the
    uniform numbers u (B,) in [0, 1). Arguments as in `candidate_probs`."""
    probs, ids = candidate_probs(logits, temperature, top_k, top_p)
    cdf = probs.cumsum(dim=-1)  # (B, K)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.size(1) - 1)  # first cdf > target
    return ids.gather(1, j).squeeze(1)


def sample_unfiltered(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Temperature sampling with no top-k or top-p: token ids (B,) drawn from softmax(logits (B, V) /
    temperature (B,)) by inverse CDF over the vocabulary in id order, with the uniform numbers u (B,).
    The same distribution as `sample_from_logits` with the filters off, without sorting V logits."""
    cdf = torch.softmax(logits.float() / temperature.float()[:, None], dim=-1).cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.size(1) - 1).squeeze(1)  # first cdf > target


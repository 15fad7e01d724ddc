"""Log-probabilities for OpenAI's `logprobs` (gptkit.generate's engine and the server's echo):
each new token's logprob and the top-N alternatives, and the logprobs of a prompt's own tokens.

They are the model's own distribution (log_softmax of the raw logits, before logit bias,
penalties and temperature), as vLLM reports them. Shapes: T time, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import torch


def top_logprobs(logp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) of one position's log-probabilities (V,)."""
    if n <= 0:
        return []
    v, i = logp.topk(min(n, logp.size(-1)))
    return list(zip(i.tolist(), v.tolist()))


def attach_logprobs(rows, logits: torch.Tensor, tokens: torch.Tensor, events) -> None:
    """Give the events (gptkit.generate's `Event`s, one per row) of rows that asked for logprobs
    their token's logprob and the top-N, from the logits (B, V) of the step."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return
    logp = torch.log_softmax(logits[want].float(), dim=-1).cpu()  # (b, V)
    for k, i in enumerate(want):
        t = int(tokens[i])
        events[i].logprob = float(logp[k, t])
        events[i].top_logprobs = top_logprobs(logp[k], rows[i].params.logprobs)


@torch.inference_mode()
def prompt_logprobs(model, ids: Sequence[int], n: int) -> tuple[list[float | None], list[list | None]]:
    """The logprob of each prompt token given the ones before it, from one forward pass over the
    prompt, and the top-n (id, logprob) at each position; the first token has neither (None)."""
    device = model.transformer.wte.weight.device
    logits = model(torch.tensor([list(ids)], device=device))[0, :-1].float()  # (T-1, V)
    logp = torch.log_softmax(logits, dim=-1).cpu()
    nxt = torch.tensor(list(ids[1:]), dtype=torch.long)
    chosen = logp.gather(1, nxt[:, None])[:, 0].tolist() if len(ids) > 1 else []
    return [None, *chosen], [None, *(top_logprobs(logp[t], n) for t in range(len(ids) - 1))]

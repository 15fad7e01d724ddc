"""Beam search, as transformers does it: the same candidates per step, the same bookkeeping of
finished hypotheses, length penalty and early-stopping rules, so both return the same beams.

All beams of one prompt run as one batch through the KV cache, which is reordered after each step
to follow the surviving beams. Beam search does not slide past the context.

Shapes: n beams, V vocab, keep candidates per step.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache


@torch.inference_mode()
def beam_search(model: GPT, prompt: Sequence[int], num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_ids: Iterable[int] = (),
                num_return_sequences: int = 1) -> list[tuple[list[int], float]]:
    """Beam search as transformers does it: returns the best `num_return_sequences` hypotheses as
    (generated token ids including a final EOS, score), best first. The score is the sum of token
    log-probabilities divided by (number of generated tokens) ** length_penalty.
    early_stopping: True stops once num_beams hypotheses are finished; False stops when no running
    beam can beat the worst finished one at its current length; "never" assumes the longest length."""
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise GptkitError(f"need 1 <= num_return_sequences ({num_return_sequences}) <= num_beams ({num_beams})",
                          "num_beams", "raise num_beams or lower num_return_sequences")
    cfg = model.config
    dev = model.transformer.wte.weight.device
    prompt = list(prompt)
    if len(prompt) + max_new_tokens > cfg.block_size:
        raise GptkitError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the context "
                          f"({cfg.block_size})", "max_new_tokens", "beam search does not slide past the context")
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=dev)
    n = num_beams
    keep = max(2, 1 + len(eos)) * n  # candidates per step: enough to refill n running beams
    NEG = -1.0e9
    cache = KVCache(cfg, n, len(prompt) + max_new_tokens, dev, model.transformer.wte.weight.dtype)
    idx = torch.tensor([prompt] * n, dtype=torch.long, device=dev)
    logits = model(idx, cache=cache, last_only=True)[:, -1, :].float()  # (n, V)
    V = logits.size(-1)
    run_seq = torch.zeros(n, max_new_tokens, dtype=torch.long, device=dev)  # running hypotheses
    run_score = torch.full((n,), NEG, device=dev)
    run_score[0] = 0.0  # all beams start equal: only the first may expand at step 0
    fin_seq = torch.zeros(n, max_new_tokens, dtype=torch.long, device=dev)
    fin_len = torch.zeros(n, dtype=torch.long, device=dev)
    fin_score = torch.full((n,), NEG, device=dev)
    fin_done = torch.zeros(n, dtype=torch.bool, device=dev)
    improvable = True
    first_n = torch.arange(keep, device=dev) < n
    for g in range(max_new_tokens):  # g tokens generated so far
        total = (torch.log_softmax(logits, dim=-1) + run_score[:, None]).reshape(-1)  # (n*V,)
        cand_score, cand = torch.topk(total, keep)  # (keep,), sorted
        beam, tok = cand // V, cand % V
        seq = run_seq[beam].clone()
        seq[:, g] = tok
        hit = torch.isin(tok, eos) if len(eos) else torch.zeros(keep, dtype=torch.bool, device=dev)
        if g + 1 >= max_new_tokens:
            hit = torch.ones_like(hit)
        # the best n candidates that did not end continue running
        nxt = torch.topk(cand_score + hit.float() * NEG, n).indices
        new_run_seq, new_run_score, reorder = seq[nxt], (cand_score + hit.float() * NEG)[nxt], beam[nxt]
        # among the first n candidates, those that ended become finished hypotheses
        just = hit & first_n
        fscore = cand_score / float(g + 1) ** length_penalty
        if bool(fin_done.all()) and early_stopping is True:
            fscore = fscore + NEG
        if not improvable:
            fscore = fscore + NEG
        fscore = fscore + (~just).float() * NEG
        m_score = torch.cat([fin_score, fscore])
        m_seq = torch.cat([fin_seq, seq])
        m_len = torch.cat([fin_len, torch.full((keep,), g + 1, device=dev)])
        m_done = torch.cat([fin_done, just])
        top = torch.topk(m_score, n).indices
        fin_score, fin_seq, fin_len, fin_done = m_score[top], m_seq[top], m_len[top], m_done[top]
        run_seq, run_score = new_run_seq, new_run_score
        # can a running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_new_tokens
        else:
            best_len = g + 1
        best_possible = float(run_score[0]) / best_len ** length_penalty
        worst = float(fin_score.min()) if bool(fin_done.all()) else NEG
        improvable = improvable and best_possible > worst
        if not improvable or (bool(fin_done.all()) and early_stopping is True) or bool(hit.all()):
            break
        cache.reorder(reorder)
        logits = model(new_run_seq[:, g:g + 1], cache=cache)[:, -1, :].float()
    out = []
    for i in range(num_return_sequences):
        out.append((fin_seq[i, : int(fin_len[i])].tolist(), float(fin_score[i])))
    return out

"""The default attention backend: torch's scaled_dot_product_attention.

It picks flash or memory-efficient kernels where PyTorch has them. Shapes: q (B, nh, Tq, hs),
k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs); query i sits at absolute position q_offset + i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkit.attention.math import causal_mask


def sdpa_attention(q, k, v, q_offset: int = 0, key_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    Tq, Tk = q.shape[-2], k.shape[-2]
    if key_mask is None and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if key_mask is None and Tq == 1 and q_offset == Tk - 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # one new token sees everything
    mask = causal_mask(Tq, Tk, q_offset, q.device, key_mask)
    # rows with no visible key (all padding) would give NaN; let them see key 0 and discard later
    mask = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

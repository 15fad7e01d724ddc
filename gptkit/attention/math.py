"""The reference attention backend: the textbook version that materialises the (Tq, Tk) scores.

Also the causal mask every masked backend shares. Shapes: q (B, nh, Tq, hs), k and v
(B, nh, Tk, hs) -> (B, nh, Tq, hs); query i sits at absolute position q_offset + i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(Tq: int, Tk: int, q_offset: int, device, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True = may attend: (1, 1, Tq, Tk), or (B, 1, Tq, Tk) with key_mask."""
    qpos = torch.arange(q_offset, q_offset + Tq, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = (kpos <= qpos)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :Tk].bool()
    return mask


def causal_bias(Tq: int, Tk: int, q_offset: int, device, dtype) -> torch.Tensor:
    """The causal mask as an additive bias (1, Tq, Tk): 0 where a query may attend, -inf elsewhere."""
    return torch.zeros(Tq, Tk, device=device, dtype=dtype).masked_fill_(
        ~causal_mask(Tq, Tk, q_offset, device)[0, 0], float("-inf"))[None]


def math_attention(q, k, v, q_offset: int = 0, key_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    B, nh, Tq, hs = q.shape
    Tk = k.shape[-2]
    scale = 1.0 / math.sqrt(hs)
    if key_mask is None:
        # scale and causal mask inside one batched GEMM (scores = scale * q k^T + bias): no separate
        # passes over the (Tq, Tk) scores for them, forward or backward
        bias = causal_bias(Tq, Tk, q_offset, q.device, q.dtype)
        att = torch.baddbmm(bias, q.reshape(B * nh, Tq, hs), k.reshape(B * nh, Tk, hs).transpose(1, 2),
                            alpha=scale).view(B, nh, Tq, Tk)
    else:
        att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
        att = att.masked_fill(~causal_mask(Tq, Tk, q_offset, q.device, key_mask), float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    # a query whose every key is masked (left padding) gets zeros instead of NaN; without a key
    # mask every query sees key 0, and skipping this saves ~7% of a training step at T=64
    if key_mask is not None:
        att = torch.nan_to_num(att, nan=0.0)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v

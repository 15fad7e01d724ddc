"""Causal attention backends behind one function, `attend`.

- `sdpa` (attention/sdpa.py): torch.nn.functional.scaled_dot_product_attention (the default;
  picks flash/mem-efficient kernels where PyTorch has them).
- `math` (attention/math.py): the textbook version that materialises the (T, T) score matrix;
  the reference.
- `flash` (attention/flash.py): gptkit's own tiled FlashAttention-2 in plain PyTorch.
- `triton` (attention/triton.py): FlashAttention-2-style Triton kernels (CUDA; the optional
  triton package).

Queries may be a suffix of the keys (KV-cache decoding): query i sits at absolute position
q_offset + i and sees keys 0..q_offset+i. `key_mask` (B, Tk) marks padding keys (False) that no
query may see.

Shapes: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs).
"""

from __future__ import annotations

import torch

from gptkit.attention.flash import flash_attention
from gptkit.attention.math import causal_mask, math_attention
from gptkit.attention.sdpa import sdpa_attention

__all__ = ["attend", "causal_mask", "flash_attention", "math_attention", "sdpa_attention"]

BACKENDS = ("sdpa", "math", "flash", "triton")


def attend(q, k, v, *, backend: str = "sdpa", q_offset: int = 0, key_mask=None, dropout_p: float = 0.0,
           block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Causal attention with the chosen backend. See the module docstring for shapes."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, q_offset, key_mask, dropout_p)
    if backend == "math":
        return math_attention(q, k, v, q_offset, key_mask, dropout_p)
    if backend == "flash":
        return flash_attention(q, k, v, q_offset=q_offset, key_mask=key_mask, dropout_p=dropout_p,
                               block_q=block_q, block_k=block_k)
    if backend == "triton":
        # imported here: the module imports the optional triton package, which must not load (and
        # read TRITON_INTERPRET) unless this backend is used
        from gptkit.attention.triton import triton_attention

        return triton_attention(q, k, v, q_offset=q_offset, key_mask=key_mask, dropout_p=dropout_p)
    raise ValueError(f"unknown attention backend {backend!r}")

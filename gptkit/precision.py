"""Low-precision weights with fp32 master weights (`param_dtype=bfloat16`).

The model the trainer owns stays fp32: it is what the optimizer updates, what checkpoints hold and
what evals and samples use. A bf16 copy of it (the "shadow") runs the forward and backward passes,
so no op casts weights on the fly as autocast does; after the backward its gradients are copied
into the fp32 parameters' .grad, and after the optimizer step the updated fp32 weights are
copied back into the shadow. On a CPU with AVX512-BF16 this saves autocast's per-call weight casts.
"""

from __future__ import annotations

import copy

import torch


class ShadowWeights:
    """A copy of `master` in `dtype` for forward/backward, kept in step with the fp32 master."""

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, sparse_tied: bool = True):
        self.master = master
        self.module = copy.deepcopy(master).to(dtype)  # deepcopy keeps tied weights tied
        # A tied embedding (GPT-2's wte = lm_head) gets a sparse gradient from its lookup, added
        # into lm_head's dense one: no zero-filled (Vp, C) buffer per step (13% of a GPT-2 124M
        # step at B=4, T=64 on one core), and the same sum. Not under torch.compile, whose
        # Inductor backend cannot compile a backward that makes a sparse gradient.
        linear_weights = {id(m.weight) for m in self.module.modules() if isinstance(m, torch.nn.Linear)}
        for m in self.module.modules():
            if sparse_tied and isinstance(m, torch.nn.Embedding) and id(m.weight) in linear_weights:
                m.sparse = True
        self.master_params = list(master.parameters())
        self.shadow_params = list(self.module.parameters())
        assert len(self.master_params) == len(self.shadow_params)

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """master.grad <- shadow.grad in fp32; the shadow's gradients are released."""
        for m, s in zip(self.master_params, self.shadow_params):
            if s.grad is None:
                m.grad = None
                continue
            if s.grad.is_sparse:
                s.grad = s.grad.to_dense()
            if m.grad is None:
                m.grad = s.grad.to(m.dtype)
            else:
                m.grad.copy_(s.grad)
            s.grad = None

    @torch.no_grad()
    def pull(self) -> None:
        """shadow <- master (after each optimizer step, and after loading weights)."""
        torch._foreach_copy_(self.shadow_params, self.master_params)

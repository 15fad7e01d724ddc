"""Low-precision weights with fp32 master weights (`param_dtype=bfloat16`).

The model the trainer owns stays fp32: it is what the optimizer updates, what checkpoints hold and
what evals and samples use. A bf16 copy of it (the "shadow") runs the forward and backward passes,
so no op casts weights on the fly as autocast does; after the backward its gradients are copied
into the fp32 parameters' .grad, and after the optimizer step the updated fp32 weights are
copied back into the shadow. On a CPU with AVX512-BF16 this saves autocast's per-call weight casts.

Under `compile=true` with plain AdamW, those three passes over the parameters (gradients to fp32,
AdamW, weights back to bf16) become one compiled pass (`ShadowWeights.fuse_adamw`): it reads the
bf16 gradient, updates the fp32 weight and moments, and writes the bf16 copy, so the fp32
gradients are never stored. The optimizer stays a torch.optim.AdamW, whose state it updates, so
its checkpoints are the same either way.
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
        self.adamw: torch.optim.AdamW | None = None  # set by fuse_adamw
        self.clip_coef = torch.ones(())

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """master.grad <- shadow.grad in fp32; the shadow's gradients are released. With a fused
        AdamW they stay where they are, for `step` to read."""
        if self.adamw is not None:
            return
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

    # ------------------------------------------------------------------------------------------
    # the fused update (compile=true, plain AdamW): grads_to_master + clipping + AdamW + pull in one pass
    def fuse_adamw(self, optimizer) -> bool:
        """If `optimizer` is a plain torch.optim.AdamW over the master parameters: from now on,
        `grad_norm_` and `adamw_step` replace grads_to_master, clip_grad_norm_, optimizer.step()
        and pull. Returns whether it did (any other optimizer keeps the three passes)."""
        if type(optimizer) is not torch.optim.AdamW or any(g["amsgrad"] or g["maximize"] for g in optimizer.param_groups):
            return False
        self.adamw = optimizer
        self._shadow_of = {id(m): s for m, s in zip(self.master_params, self.shadow_params)}
        self._update = torch.compile(_adamw_master_update, dynamic=False)
        self._norm = torch.compile(_grad_norm, dynamic=False)  # 5x torch._foreach_norm's speed on bf16 (a CPU)
        return True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradients' total 2-norm, clipped to `max_norm` (torch.nn.utils.clip_grad_norm_ over
        the masters' gradients; with a fused AdamW, `grad_norm_`)."""
        if self.adamw is None:
            return torch.nn.utils.clip_grad_norm_(self.master_params, max_norm)
        return self.grad_norm_(max_norm)

    def step(self, optimizer) -> None:
        """The optimizer's step: the fused one after `fuse_adamw(optimizer)`."""
        if self.adamw is None:
            optimizer.step()
        elif optimizer is not self.adamw:
            raise ValueError("this ShadowWeights fuses another optimizer")
        else:
            self.adamw_step()

    def after_step(self) -> None:
        """After a step (or a skipped one): the bf16 copies follow the masters (the fused step has
        written them already; its gradients are released)."""
        if self.adamw is None:
            self.pull()
        else:
            self.zero_grad()

    @torch.no_grad()
    def grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total 2-norm of the shadow's gradients in fp32 (the masters' would be the same
        numbers), and the clipping factor `adamw_step` applies, as clip_grad_norm_ computes them."""
        grads = [s.grad.to_dense() if s.grad.is_sparse else s.grad for s in self.shadow_params if s.grad is not None]
        if not grads:
            return torch.zeros(())
        total = self._norm(grads)
        self.clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    @torch.no_grad()
    def adamw_step(self) -> None:
        """One AdamW step over the masters from the shadow's gradients (times the clipping factor),
        the bf16 copies written in the same pass; the shadow's gradients are released."""
        for group in self.adamw.param_groups:
            ps = [p for p in group["params"] if self._shadow_of[id(p)].grad is not None]
            if not ps:
                continue
            shadows = [self._shadow_of[id(p)] for p in ps]
            grads = [s.grad.to_dense() if s.grad.is_sparse else s.grad for s in shadows]
            states = [self.adamw.state[p] for p in ps]
            for p, st in zip(ps, states):
                if not st:  # as torch.optim.AdamW(fused=True) starts its state
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b1, b2 = group["betas"]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            by_step: dict[float, list[int]] = {}  # the bias corrections, per step count (one, normally)
            for i, t in enumerate(steps):
                by_step.setdefault(float(t), []).append(i)
            dev = ps[0].device
            for t, idx in by_step.items():
                self._update([ps[i].data for i in idx], [grads[i] for i in idx], [shadows[i].data for i in idx],
                             [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                             torch.tensor(float(group["lr"]), device=dev), self.clip_coef.to(dev),
                             torch.tensor(1 - b1**t, device=dev), torch.tensor((1 - b2**t) ** 0.5, device=dev),
                             float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]))
        self.zero_grad()

    def zero_grad(self) -> None:
        for s in self.shadow_params:
            s.grad = None


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the gradients together, summed in fp32."""
    return torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()


def _adamw_master_update(params, grads, shadows, exp_avgs, exp_avg_sqs, lr, clip_coef, bias_correction1,
                         bias_correction2_sqrt, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW as torch.optim.AdamW computes it, on fp32 params from bf16 grads times clip_coef,
    writing each updated param to its bf16 shadow too; compiled into one pass per tensor. The
    scalars that change per step are 0-d tensors, so one compiled graph serves every step."""
    for p, g, sh, m, v in zip(params, grads, shadows, exp_avgs, exp_avg_sqs):
        g = g.float() * clip_coef
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        p.sub_(lr / bias_correction1 * m / denom)
        sh.copy_(p)

"""AdamW with GPT-2's parameter groups, and the learning-rate schedule as a pure function.

Weight decay applies to parameters with >= 2 dimensions (matmul weights and embeddings) and not to
biases or LayerNorm gains, as in nanoGPT and llm.c.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # the tied wte/lm_head weight appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_names(model: torch.nn.Module, groups: list[dict]) -> dict[int, str]:
    """The optimizer's parameter index -> the parameter's name (for checkpoints)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out, i = {}, 0
    for g in groups:
        for p in g["params"]:
            out[i] = by_id[id(p)]
            i += 1
    return out


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
               device_type: str = "cpu", fused: bool | None = None):
    """AdamW over GPT-2's groups: fused where PyTorch has it for the device, else foreach.
    Returns (optimizer, index -> parameter name)."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = device_type in ("cuda", "cpu", "mps")
    kw = dict(lr=lr, betas=betas, eps=eps)
    try:
        opt = torch.optim.AdamW(groups, fused=fused, **kw) if fused else torch.optim.AdamW(groups, foreach=True, **kw)
    except (RuntimeError, TypeError):  # fused not built for this device/dtype
        opt = torch.optim.AdamW(param_groups(model, weight_decay), foreach=True, **kw)
    return opt, param_names(model, opt.param_groups)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine to `min_lr` at
    `decay_steps`, then flat at min_lr. `step` counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

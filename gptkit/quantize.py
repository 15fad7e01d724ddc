"""Weight-only lower precision for inference: bf16 or int8 weights, fp32 everywhere else.

Generating one token at a time reads every weight once per step, so at small batch sizes the
speed is set by how many bytes the weights take. Storing the Linear weights (and the tied lm_head)
in bf16 halves that; int8 with one fp32 scale per output channel (symmetric, absmax / 127)
quarters it. Activations, LayerNorms, the residual stream, the embeddings and the KV cache stay
fp32: only the matmuls change, and they accumulate in fp32.

`quantize_for_inference(model, "int8")` returns a copy whose Linear modules are replaced; the
model code itself is untouched.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.errors import GptkitError

INFERENCE_DTYPES = ("float32", "bfloat16", "int8")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float": "float32"}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (N, K) -> (q int8 (N, K), scale fp32 (N,)), w ≈ q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class BF16Linear(nn.Module):
    """y = x W^T + b with W stored in bf16; x is cast to bf16 for the matmul, y comes back fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = (x (q * scale)^T) + b with q int8 per-channel quantized."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_int8(weight.detach())
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = q.shape
        self._fast = None  # whether torch's int8 weight-only kernel works here, decided on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._fast is not False:
            try:
                # torch's weight-only int8 kernel (CPU and CUDA): bf16 activations, bf16 scales
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight,
                                              self.scale.to(torch.bfloat16)).float()
                self._fast = True
            except (RuntimeError, AttributeError, NotImplementedError):
                self._fast = False
        if self._fast is False:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def normalize_dtype(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in INFERENCE_DTYPES:
        raise GptkitError(f"unknown inference dtype {name!r}", "--dtype", f"use one of {', '.join(INFERENCE_DTYPES)}")
    return name


@torch.no_grad()
def quantize_for_inference(model: nn.Module, dtype: str = "float32", inplace: bool = False) -> nn.Module:
    """The model with every nn.Linear (lm_head included) stored in `dtype` (float32 | bfloat16 | int8).
    float32 returns the model itself. Otherwise a copy (unless inplace), in eval mode, for inference only."""
    dtype = normalize_dtype(dtype)
    if dtype == "float32":
        return model
    if not inplace:
        model = copy.deepcopy(model)
    cls = BF16Linear if dtype == "bfloat16" else Int8Linear
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, cls(child.weight, child.bias))
    model.inference_dtype = dtype
    return model.eval().requires_grad_(False)

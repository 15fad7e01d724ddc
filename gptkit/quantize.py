"""Weight-only lower precision for inference: bf16 or int8 weights, fp32 everywhere else.

Generating one token at a time reads every weight once per step, so at small batch sizes the
speed is set by how many bytes the weights take. Storing the Linear weights (and the tied lm_head)
in bf16 halves that; int8 with one fp32 scale per output channel (symmetric, absmax / 127)
quarters it. Activations, LayerNorms, the residual stream, the embeddings and the KV cache stay
fp32: only the matmuls change, and they accumulate in fp32.

An int8 Linear fed many rows (a prefill: from 64 rows on, or any rows inside `prefill_kernels`,
which the engine's prefills use) dequantizes its weight to bf16 and runs one bf16 GEMM instead:
the weight-only kernel's cost grows with the rows, a GEMM's far less (512 rows: 2.3x faster here).

`quantize_for_inference(model, "int8")` returns a copy whose Linear modules are replaced; the
model code itself is untouched. "float32" keeps the values and only stores the weights transposed,
which the CPU's GEMM streams faster for the thin activations of decoding; its lm_head is a
`ScreenedHead`, which can compute the exact top-k logits only (half the bytes read). A caller that
needs only those says so with `with only_top_k_logits(model, k):`, the one way in; outside such a
block every head computes all logits.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.errors import GptkitError
from gptkit.model import MLP

INFERENCE_DTYPES = ("float32", "bfloat16", "int8")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float": "float32"}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (N, K) -> (q int8 (N, K), scale fp32 (N,)), w ≈ q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _onednn_packed(w: torch.Tensor) -> torch.Tensor | None:
    """w (N, K) bf16 reordered once into oneDNN's blocked layout, or None where that is not
    available. Plain F.linear in bf16 re-packs the weight at every call on the CPU, which makes
    small batches slower than fp32."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        x = torch.zeros(2, w.shape[1], dtype=torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if tuple(y.shape) != (2, w.shape[0]):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


class FP32Linear(nn.Module):
    """y = x W^T + b in fp32, with W stored transposed (K, N): for the thin activations of decoding
    the CPU's GEMM streams a (K, N) weight faster than nn.Linear's (N, K) one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_t", weight.detach().float().t().contiguous())  # (K, N)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = self.weight_t.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.reshape(*shape[:-1], self.out_features)


class BF16Linear(nn.Module):
    """y = x W^T + b with W stored in bf16; x is cast to bf16 for the matmul (which accumulates
    in fp32), y comes back fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = self.weight.shape
        self.packed = _onednn_packed(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.packed is not None and xb.device.type == "cpu":
            return self.onednn(xb).float().reshape(*shape[:-1], self.out_features)
        y = F.linear(xb, self.weight).float().reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def onednn(self, xb: torch.Tensor, activation: str = "none", algorithm: str = "") -> torch.Tensor:
        """xb (R, K) bf16 -> (R, N) bf16 through the packed weight (CPU only): oneDNN adds the fp32
        bias to its fp32 accumulator and applies `activation` (a oneDNN post-op, e.g. "gelu" with
        algorithm "tanh") before the one rounding to bf16."""
        return torch.ops.mkldnn._linear_pointwise(xb, self.packed, self.bias, activation, [], algorithm)


class BF16MLP(nn.Module):
    """GPT-2's MLP over two BF16Linears with packed weights (a CPU), in two oneDNN calls: c_fc with
    its bias and the tanh GELU fused, its bf16 output fed straight to c_proj, which would cast its
    input to bf16 anyway. One rounding of gelu(xW + b) to bf16 in place of two, and four fewer small
    ops per layer and step (decoding GPT-2 124M at batch 1, with BF16Linear's bias in the GEMM: 1.04-1.05x)."""

    def __init__(self, c_fc: BF16Linear, c_proj: BF16Linear):
        super().__init__()
        self.c_fc, self.c_proj = c_fc, c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self.c_fc.onednn(x.reshape(-1, shape[-1]).to(torch.bfloat16), "gelu", "tanh")  # (R, I) bf16
        return self.c_proj.onednn(h).float().reshape(*shape[:-1], self.c_proj.out_features)


INT8_DEQUANT_ROWS = 64  # Int8Linear: from this many rows on, dequantize the weight and run a bf16 GEMM


class Int8Linear(nn.Module):
    """y = (x (q * scale)^T) + b with q int8 per-channel quantized."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_int8(weight.detach())
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)  # the kernels' precision
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = q.shape
        self._fast = None  # whether torch's int8 weight-only kernel works here, decided on first use
        self.prefill = False  # set by `prefill_kernels`: the dequantized path, whatever the rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if (self.prefill or x2.shape[0] >= INT8_DEQUANT_ROWS) and x2.device.type == "cpu":
            # a prefill or many rows: the weight dequantized once per call to bf16 (the kernel's own
            # scale precision), then one bf16 GEMM; the weight-only kernel's cost grows with the
            # rows (on this CPU: equal at ~48 rows, 2.3x slower at 512)
            w = self.qweight.to(torch.bfloat16) * self.scale_bf16[:, None]  # (N, K)
            y = F.linear(x2.to(torch.bfloat16), w).float().reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self._fast is not False:
            try:
                # torch's weight-only int8 kernel (CPU and CUDA): bf16 activations, bf16 scales
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale_bf16).float()
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
    """A copy of the model (or the model itself, inplace=True), in eval mode and for inference only,
    with every nn.Linear (lm_head included) replaced by one whose weight is stored in `dtype`:
    float32 (transposed for fast decoding, same values), bfloat16 or int8."""
    dtype = normalize_dtype(dtype)
    if not inplace:
        model = copy.deepcopy(model)
    cls = {"float32": FP32Linear, "bfloat16": BF16Linear, "int8": Int8Linear}[dtype]
    head = getattr(model, "lm_head", None)
    if dtype == "float32" and isinstance(head, nn.Linear) and head.weight is model.transformer.wte.weight:
        model.lm_head = ScreenedHead(head.weight, model.config.vocab_size)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, cls(child.weight, child.bias))
    for mod in list(model.modules()):  # GPT-2's MLPs in bf16 on a CPU: c_fc's GELU fused into its GEMM
        mlp = getattr(mod, "mlp", None)
        if (isinstance(mlp, MLP) and isinstance(mlp.c_fc, BF16Linear) and isinstance(mlp.c_proj, BF16Linear)
                and mlp.c_fc.packed is not None and mlp.c_proj.packed is not None):
            mod.mlp = BF16MLP(mlp.c_fc, mlp.c_proj)
    model.inference_dtype = dtype
    return model.eval().requires_grad_(False)


class ScreenedHead(nn.Module):
    """The fp32 lm_head, which can return only the top logits, exactly, while reading half the bytes.

    When `top_k` is set (by `only_top_k_logits`: the caller samples from the k largest logits only,
    or takes the argmax), a bf16 copy of the weight scores every token, the best M = max(4k, k + 128)
    are recomputed in fp32, and everything else is -inf. The answer is exact whenever the k-th best fp32 logit beats
    every other token's bf16 score plus a bound on its rounding error: bf16 rounding of h, W and
    the product is at most 2^-7 * sum_i |h_i W_ji| <= 2^-7 * ||h|| * ||W_j|| (Cauchy-Schwarz).
    Otherwise (or with top_k None) it computes all logits in fp32.
    """

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = weight.detach()  # (Vp, C) fp32, shared with the token embedding
        self.vocab_size = vocab_size
        self.exact = FP32Linear(self.weight, None)
        self.screen = BF16Linear(self.weight[:vocab_size], None)
        self.register_buffer("row_norm", self.weight[:vocab_size].float().norm(dim=1))  # (V,)
        self.top_k: int | None = None  # None: all logits; set only through `only_top_k_logits`
        self.calls = self.fallbacks = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.top_k
        shape = x.shape
        h = x.reshape(-1, shape[-1]).float()  # (R, C)
        V, Vp = self.vocab_size, self.weight.shape[0]
        if not k or h.shape[0] > 64 or k * 8 > V:
            return self.exact(x)
        self.calls += 1
        M = min(V - 1, max(4 * k, k + 128))
        bound = 2.0 ** -7 * h.norm(dim=1, keepdim=True) * self.row_norm[None, :]  # (R, V)
        upper = self.screen(h) + bound  # (R, V): no fp32 logit exceeds this
        top_upper, cand = torch.topk(upper, M + 1, dim=-1)  # (R, M+1)
        cand = cand[:, :M]
        exact = torch.bmm(self.weight[cand], h[:, :, None]).squeeze(-1)  # (R, M)
        kth = torch.topk(exact, k, dim=-1).values[:, -1]
        if not bool((kth > top_upper[:, M]).all()):
            self.fallbacks += 1
            return self.exact(x)
        out = torch.full((h.shape[0], Vp), float("-inf"), device=h.device)
        out.scatter_(1, cand, exact)
        return out.reshape(*shape[:-1], Vp)


@contextmanager
def prefill_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's int8 Linears take their prefill path (dequantized weight, bf16
    GEMM) for any number of rows, so a prompt prefilled in chunks of any length gets the numbers of
    the whole prompt prefilled at once (each path computes every row on its own)."""
    head = getattr(model, "lm_head", None)  # it sees the last position only: the per-row kernel suits it
    mods = [m for m in model.modules() if isinstance(m, Int8Linear) and m is not head]
    for m in mods:
        m.prefill = True
    try:
        yield
    finally:
        for m in mods:
            m.prefill = False


def screen_size(temperature: float, top_k: int | None, vocab_size: int) -> int | None:
    """How many of the largest logits a draw can use, for `only_top_k_logits`: 1 when greedy, k
    under top-k sampling, None (all) otherwise."""
    if temperature == 0:
        return 1
    return top_k if top_k and top_k < vocab_size else None


@contextmanager
def only_top_k_logits(model: nn.Module, k: int | None) -> Iterator[None]:
    """Within the block, the model's forward needs only its k largest logits exactly (the rest may
    be -inf): a `ScreenedHead` lm_head then reads half the weight bytes. k None, or a model with
    another head: no change. The head computes all logits again when the block ends."""
    head = getattr(model, "lm_head", None)
    if k is None or not isinstance(head, ScreenedHead):
        yield
        return
    head.top_k = k
    try:
        yield
    finally:
        head.top_k = None

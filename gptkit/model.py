"""One configurable decoder for the two families gptkit implements (litgpt/nanochat style).

- family "gpt2", exactly as OpenAI and llm.c define it: learned positions, pre-LayerNorm blocks
  (eps 1e-5), tanh-approximated GELU, a final LayerNorm, and an lm_head tied to the token embedding.
- family "llama", exactly as transformers' LlamaForCausalLM defines it: rotary position embeddings
  (rotate-half convention, with the linear, dynamic-NTK and llama3 scalings of transformers' rope init
  functions), RMSNorm, a SwiGLU MLP, grouped-query attention (n_kv_head key/value heads, each serving
  n_head // n_kv_head query heads), optional q/k/v/o and MLP biases, tied or untied lm_head.

The config names each choice (gptkit.config.GPTConfig); the blocks below pick by it and stay short.
Module names are shared (wte, h.i.ln_1, attn.c_attn, mlp.c_fc, ...): c_attn holds q, k and v
stacked, and a SwiGLU's c_fc holds gate and up stacked, so formats/hf.py splits them on export.
The embedding has `padded_vocab_size` rows (llm.c's Vp); the padding rows are zero and logits are
cropped to the real vocab, so nothing outside this file ever sees Vp.

The module is pure: no files, no printing, no device detection. Loading from disk lives in
`gptkit.loading`; `GPT.from_pretrained` only forwards there.

Shapes: B batch, T time, C channels (n_embd), nh query heads, nkv key/value heads, hs head size,
V vocab, Vp padded vocab, L layers, I the MLP's hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.attention import attend
from gptkit.config import GPTConfig


# ------------------------------------------------------------------------------------------------
# Each family's reference rules, in one place.
#   gpt2:  OpenAI's GPT-2 / llm.c: LayerNorm eps 1e-5 (config.norm_eps), weights N(0, 0.02) with
#          residual projections N(0, 0.02/sqrt(2L)), zero biases.
#   llama: transformers' LlamaPreTrainedModel (_init_weights): every Linear and the embedding
#          N(0, initializer_range = 0.02), zero biases, unit norms; RMSNorm eps from rms_norm_eps;
#          RoPE frequencies as transformers' rope init functions compute them (below).
INIT_STD = 0.02


def rope_inv_freq(config: GPTConfig, seq_len: int | None = None) -> torch.Tensor:
    """RoPE inverse frequencies (hs/2,) in fp32, with the same float32 operations as transformers'
    modeling_rope_utils (default, linear, dynamic NTK, llama3). `seq_len` matters only for dynamic:
    the length of the call (max position + 1), past which the base grows."""
    hs, base, r = config.head_size, config.rope_theta, config.rope
    kind = r.get("rope_type", "default")
    exponents = torch.arange(0, hs, 2, dtype=torch.int64).float() / hs  # (hs/2,)
    if kind == "dynamic":
        factor, n0 = r["factor"], r["original_max_position_embeddings"]
        # transformers grows the base with the call's length, in float32 tensor arithmetic
        n = torch.maximum(torch.tensor(seq_len or n0), torch.tensor(n0))
        base = base * ((factor * n / n0) - (factor - 1)) ** (hs / (hs - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / r["factor"]
    elif kind == "llama3":  # Meta's Llama 3.1 scaling: long wavelengths slowed by `factor`, a smooth ramp between
        factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        n0 = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        slow = torch.where(wavelen > n0 / lo, inv_freq / factor, inv_freq)
        ramp = (n0 / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
        blended = (1 - ramp) * slow / factor + ramp * slow
        medium = ~(wavelen < n0 / hi) * ~(wavelen > n0 / lo)
        inv_freq = torch.where(medium, blended, slow)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., hs) of positions (...) for the rotate-half layout (the frequencies repeated)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (..., hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hs) by cos/sin (B or 1, 1, T, hs): pairs (i, i + hs/2) turn together."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values for incremental decoding.

    k, v: (L, B, nkv, max_T, hs), at the key/value heads only (GQA's memory saving). `pos` is the
    number of positions already written; every row of the batch shares it (left padding plus
    `key_mask` handles prompts of unequal length).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at `pos` and return all keys/values so far (B, nkv, pos+T, hs)."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): index (B',)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class CausalSelfAttention(nn.Module):
    """Multi-head (gpt2) or grouped-query (llama) causal self-attention. The cache keeps nkv heads;
    k and v are expanded to nh heads only for the attention call, so every backend serves GQA."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        bias = config.bias if config.family == "gpt2" else config.attention_bias
        q_dim, kv_dim = self.n_head * self.head_size, self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=bias)  # q, k, v together
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q_offset = 0
        if cache is not None:
            q_offset = cache.pos
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, pos+T, hs)
        if nkv != nh:  # each key/value head serves nh // nkv consecutive query heads
            k = k[:, :, None].expand(-1, -1, nh // nkv, -1, -1).reshape(B, nh, -1, hs)  # (B, nh, Tk, hs)
            v = v[:, :, None].expand(-1, -1, nh // nkv, -1, -1).reshape(B, nh, -1, hs)
        dropout_p = self.config.dropout if self.training else 0.0
        y = attend(q, k, v, backend=self.config.attention, q_offset=q_offset, key_mask=key_mask,
                   dropout_p=dropout_p, block_q=self.config.block_q, block_k=self.config.block_k)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh*hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: C -> I (= 4C) -> C through the tanh approximation of GELU (llm.c's gelu_forward)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)); c_fc holds gate and up stacked, (2I, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_size, bias=config.mlp_bias)
        self.c_proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.dropout(self.c_proj(F.silu(gate) * up))


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.family == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.n_embd, config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config) if config.family == "gpt2" else SwiGLU(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, key_mask, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A decoder-only language model of either family (config.family).

    forward(idx (B, T) int64) -> logits (B, T, V)
    forward(idx, targets (B, T), -1 = ignore) -> (logits (B, T, V), loss scalar)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))  # (Vp, C)
        if config.family == "gpt2":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # (maxT, C)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if config.family == "llama":  # RoPE tables for every position (not saved: derived from the config)
            self.register_buffer("rope_cos", torch.empty(config.block_size, config.head_size), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.block_size, config.head_size), persistent=False)
            # dynamic NTK past its trained length: calls that reach beyond it get their own frequencies
            r = config.rope
            n0 = r.get("original_max_position_embeddings", 0)
            self.rope_dynamic_from = n0 if r.get("rope_type") == "dynamic" and config.block_size > n0 else 0
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables (block_size, hs) in fp32; needed after `to_empty`."""
        if self.config.family != "llama":
            return
        dev = self.rope_cos.device
        if dev.type == "meta":
            return
        pos = torch.arange(self.config.block_size, device=dev)
        cos, sin = rope_cos_sin(pos, rope_inv_freq(self.config).to(dev))
        self.rope_cos = cos.to(self.rope_cos.dtype)
        self.rope_sin = sin.to(self.rope_sin.dtype)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The family's reference initialisation (see the top of this file); zero padding rows."""
        c = self.config
        if c.family == "gpt2":
            std_resid = INIT_STD / math.sqrt(2 * c.n_layer)
            for name, p in self.named_parameters():
                if name.endswith(".bias") or "ln_" in name:
                    continue
                std = std_resid if name.endswith("c_proj.weight") else INIT_STD
                torch.nn.init.normal_(p, mean=0.0, std=std, generator=generator)
        else:
            for name, p in self.named_parameters():
                if not name.endswith(".bias") and "ln_" not in name:
                    torch.nn.init.normal_(p, mean=0.0, std=INIT_STD, generator=generator)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.transformer.wte.weight[c.vocab_size:].zero_()
            self.lm_head.weight[c.vocab_size:].zero_()
        self.reset_rope()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters with the vocab unpadded (gpt2: 124,439,808; smollm2-135m: 134,515,008)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        n -= (c.padded_vocab_size - c.vocab_size) * c.n_embd * (1 if c.tie_embeddings else 2)
        if exclude_embeddings:
            n -= c.vocab_size * c.n_embd
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·(nh·hs)·T (PaLM appendix B;
        nh·hs = C for GPT-2)."""
        c = self.config
        T = T or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * T

    # ----------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to (B, nh, T, hs) for positions (T,) or (B, T)."""
        seq_len = int(positions.max()) + 1 if self.rope_dynamic_from else 0
        if seq_len > self.rope_dynamic_from:
            # dynamic NTK as transformers applies it: the frequencies follow the call's longest position
            cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config, seq_len))
            cos, sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hs) or (B, T, hs)
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]  # (1, 1, T, hs)
        return cos[:, None], sin[:, None]  # (B, 1, T, hs)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False):
        """idx (B, T). With `cache`, idx holds only the new positions and T may be 1.
        positions (T,) or (B, T) overrides the default positions (pos..pos+T-1), e.g. for left padding;
        key_mask (B, T_total) bool, False = a padding key that no query may attend to.
        last_only: return logits (B, 1, V) for the last position only (generation's prefill)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        if positions is None:
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.family == "gpt2":
            x = x + self.transformer.wpe(positions)
        else:
            rope = self._rope(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, key_mask, rope)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:, :]
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): crop the padding
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_name: str, **kwargs) -> "GPT":
        """Load any input INTERFACES.md lists, either family: a run or checkpoint directory, a
        Hugging Face directory (GPT-2 or Llama), an llm.c .bin, an OpenAI TF checkpoint directory or
        a pretrained name."""
        from gptkit.loading import load_model  # lazy: the model itself never touches files

        return load_model(path_or_name, **kwargs).model

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """nanoGPT's `model.generate`: idx (B, T) token ids -> (B, T + max_new_tokens), sampled with
        `temperature` (0 = greedy), top-k and top-p, through gptkit's KV-cache engine (the model is
        put in eval mode). Past the context it slides its window, as nanoGPT does."""
        from gptkit.generate import generate  # lazy: the engine is built on this module

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator)


"""GPT-2, exactly as OpenAI and llm.c define it.

Learned positions, pre-LayerNorm blocks (eps 1e-5), tanh-approximated GELU, a final LayerNorm,
and an lm_head tied to the token embedding. The embedding has `padded_vocab_size` rows (llm.c's Vp);
the padding rows are zero and logits are cropped to the real vocab, so nothing outside this file
ever sees Vp.

The module is pure: no files, no printing, no device detection. Loading from disk lives in
`gptkit.loading`; `GPT.from_pretrained` only forwards there.

Shapes: B batch, T time, C channels (n_embd), nh heads, hs head size, V vocab, Vp padded vocab,
L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.attention import attend
from gptkit.config import GPTConfig

LN_EPS = 1e-5  # GPT-2 / llm.c


class KVCache:
    """Preallocated keys and values for incremental decoding.

    k, v: (L, B, nh, max_T, hs). `pos` is the number of positions already written; every row of
    the batch shares it (left padding plus `key_mask` handles prompts of unequal length).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at `pos` and return all keys/values so far (B, nh, pos+T, hs)."""
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
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        q_offset = 0
        if cache is not None:
            q_offset = cache.pos
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, pos+T, hs)
        dropout_p = self.config.dropout if self.training else 0.0
        y = attend(q, k, v, backend=self.config.attention, q_offset=q_offset, key_mask=key_mask,
                   dropout_p=dropout_p, block_q=self.config.block_q, block_k=self.config.block_k)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU (llm.c's gelu_forward)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, key_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 language model.

    forward(idx (B, T) int64) -> logits (B, T, V)
    forward(idx, targets (B, T), -1 = ignore) -> (logits (B, T, V), loss scalar)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # (Vp, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # (maxT, C)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), zero biases,
        zero padding rows of the embedding."""
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                continue
            std = std_resid if name.endswith("c_proj.weight") else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std, generator=generator)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.transformer.wte.weight[self.config.vocab_size:].zero_()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters with the vocab unpadded (gpt2: 124,439,808)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.config.vocab_size * self.config.n_embd
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·C·T (PaLM appendix B)."""
        c = self.config
        T = T or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    # ----------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False):
        """idx (B, T). With `cache`, idx holds only the new positions and T may be 1.
        positions (B, T) overrides the default positions (pos..pos+T-1), e.g. for left padding;
        key_mask (B, T_total) bool, False = a padding key that no query may attend to.
        last_only: return logits (B, 1, V) for the last position only (generation's prefill)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        if positions is None:
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, key_mask)
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
        """Load any input INTERFACES.md lists: a run or checkpoint directory, a Hugging Face
        directory, an llm.c .bin, an OpenAI TF checkpoint directory or a pretrained name."""
        from gptkit.loading import load_model  # lazy: the model itself never touches files

        return load_model(path_or_name, **kwargs).model

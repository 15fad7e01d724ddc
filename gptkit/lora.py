"""LoRA (Hu et al. 2021): low-rank adapters wrapped around a model's Linear layers from outside.

The model stays pure: `apply_lora` swaps each targeted nn.Linear for a `LoRALinear` that keeps
the base layer's own `weight` and `bias` Parameters under the same names (so base state dicts,
exports and loading are untouched) and adds `lora_A` (r, in) and `lora_B` (out, r):

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)

The numbers follow PEFT's LoraConfig defaults (its `LoraLayer`): A is Kaiming-uniform with
a=sqrt(5), B starts at zero, scaling alpha/r, dropout on the adapter's input only. `merge` folds
B A * scaling into W (inference, `--to hf`); `unmerge` takes it out again.

Targets are PEFT's module names for the family (`target_parts`): GPT-2's `c_attn`, `c_proj`,
`c_fc`; Llama's `q_proj` ... `down_proj`, which adapt rows of gptkit's stacked q/k/v and gate/up
layers. Each family's default is what PEFT picks for it: GPT-2's fused q/k/v `c_attn`, Llama's
`q_proj` and `v_proj`.

Shapes: r rank, in/out the wrapped layer's features, rows the adapted part of the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.checkpoint import find_checkpoint, read_state
from gptkit.errors import GptkitError

ADAPTER_KEYS = ("lora_A", "lora_B")
# PEFT's default targets per family (peft.utils.constants' TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}


def target_parts(config) -> dict[str, list[tuple[str, slice | None]]]:
    """Each LoRA target name of the model's family (PEFT's names for it) -> the gptkit Linear layers it
    adapts, as (module path suffix, rows of that layer's output; None = all). GPT-2's names are its
    own layers (`c_proj` is both the attention's and the MLP's, as PEFT matches it). The Llama family
    keeps q/k/v stacked in `attn.c_attn` and gate/up in `mlp.c_fc` (gptkit/formats/hf.py), so
    PEFT's `q_proj` is an adapter on the q rows of c_attn's output, and so on."""
    if getattr(config, "family", "gpt2") == "gpt2":
        return {"c_attn": [("attn.c_attn", None)], "c_proj": [("attn.c_proj", None), ("mlp.c_proj", None)],
                "c_fc": [("mlp.c_fc", None)]}
    q, kv, i = config.n_head * config.head_size, config.kv_heads * config.head_size, config.mlp_size
    return {"q_proj": [("attn.c_attn", slice(0, q))], "k_proj": [("attn.c_attn", slice(q, q + kv))],
            "v_proj": [("attn.c_attn", slice(q + kv, q + 2 * kv))], "o_proj": [("attn.c_proj", None)],
            "gate_proj": [("mlp.c_fc", slice(0, i))], "up_proj": [("mlp.c_fc", slice(i, 2 * i))],
            "down_proj": [("mlp.c_proj", None)]}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA setup: rank, alpha, dropout and the targeted module names."""

    rank: int
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]), tuple(d["targets"]))


def family_of(model: nn.Module) -> str:
    """The model family ("gpt2" or "llama"), from its config."""
    return getattr(getattr(model, "config", None), "family", "gpt2")


def parse_targets(text: str, model: nn.Module) -> tuple[str, ...]:
    """`lora_targets` ("" = PEFT's default for the family, else comma-separated names) checked
    against the family's target table: an unknown name is a user error listing the valid ones."""
    family = family_of(model)
    names = tuple(t.strip() for t in text.split(",") if t.strip()) if text else DEFAULT_TARGETS.get(family, ())
    valid = list(target_parts(model.config))
    bad = [t for t in names if t not in valid]
    if bad or not names:
        raise GptkitError(f"unknown LoRA target module {bad[0] if bad else text!r} for a {family} model",
                          "lora_targets", f"use comma-separated names among: {', '.join(sorted(valid))}")
    return tuple(dict.fromkeys(names))


class LoRALinear(nn.Module):
    """A Linear layer plus one rank-r update per target, each adding into its rows of the output.
    `weight` and `bias` are the base layer's own Parameters; `lora_A[t]` (r, in), `lora_B[t]` (rows, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, parts: dict[str, slice | None]):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in)
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.slices = dict(parts)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t, sl in parts.items():
            rows = self.out_features if sl is None else sl.stop - sl.start
            a = torch.empty(rank, self.in_features, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init of A; B starts at 0
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(rows, rank, device=dev, dtype=dt))
        self.lora_dropout = nn.Dropout(dropout)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        for t, sl in self.slices.items():  # each adapter draws its own dropout mask, as PEFT's do
            a = F.linear(self.lora_dropout(x), self.lora_A[t].to(x.dtype))  # (..., r)
            d = F.linear(a, self.lora_B[t].to(x.dtype)) * self.scaling  # (..., rows)
            if sl is None:
                y = y + d
            else:  # F.linear's backward does not need y: adding in place into its rows is safe
                y[..., sl] += d
        return y

    def delta_weight(self, t: str) -> torch.Tensor:
        return self.lora_B[t].float() @ self.lora_A[t].float() * self.scaling  # (rows, in)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        for t, sl in self.slices.items():
            rows = self.weight if sl is None else self.weight[sl]
            rows.add_(sign * self.delta_weight(t).to(self.weight.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (this layer's Parameters, shared)."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}, " \
               f"targets={list(self.slices)}"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap every Linear layer that `spec.targets` name (through the family's target table) in a
    LoRALinear; return the wrapped module paths."""
    if spec.rank <= 0:
        raise GptkitError(f"lora_rank must be > 0 to apply LoRA, got {spec.rank}", "lora_rank", "set lora_rank=8")
    table = target_parts(model.config)
    plan: dict[str, dict[str, slice | None]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        for t in spec.targets:
            for suffix, sl in table.get(t, []):
                if name.endswith("." + suffix):
                    plan.setdefault(name, {})[t] = sl
    if not plan:
        raise GptkitError(f"no Linear layer for {', '.join(spec.targets)}", "lora_targets",
                          f"name targets among: {', '.join(table)}")
    for name, parts in plan.items():
        _swap(model, name, LoRALinear(model.get_submodule(name), spec.rank, spec.alpha, spec.dropout, parts))
    return list(plan)


def is_adapter(param_name: str) -> bool:
    """Whether a parameter name (`...c_attn.lora_A.q_proj`) is an adapter's."""
    parts = param_name.split(".")
    return len(parts) >= 2 and parts[-2] in ADAPTER_KEYS


def freeze_base(model: nn.Module) -> int:
    """Only the adapters train; returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter(name)
        n += p.numel() if p.requires_grad else 0
    return n


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.lora_A.<target>": (r, in), "<module path>.lora_B.<target>": (rows, r)} on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if is_adapter(k)}


@torch.no_grad()
def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors into a model that `apply_lora` wrapped with the same spec."""
    params = {k: p for k, p in model.named_parameters() if is_adapter(k)}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise GptkitError(f"adapters do not match the LoRA setup: missing {missing[:2]}, unexpected {extra[:2]}",
                          where, "the checkpoint is damaged or belongs to another base model")
    for key, t in tensors.items():
        if tuple(params[key].shape) != tuple(t.shape):
            raise GptkitError(f"adapter {key} has shape {tuple(t.shape)}, expected {tuple(params[key].shape)}",
                              where, "the checkpoint belongs to another base model or rank")
        params[key].copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back: a pure model."""
    for name, m in lora_layers(model).items():
        _swap(model, name, m.to_linear())
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    for m in lora_layers(model).values():
        m.merge() if merged else m.unmerge()


# ---------------------------------------------------------------------------------------------
# a LoRA training run: the base reference its checkpoints carry instead of the base weights
def base_reference(init: str) -> str:
    """Where a LoRA run's base weights come from, as its checkpoints record it: a path made absolute
    (a run directory pinned to its latest checkpoint at the start), or a pretrained name as given."""
    p = Path(init)
    if not p.exists():
        return init
    ckpt = find_checkpoint(p) if p.is_dir() else None
    return str((ckpt or p).resolve())


def setup_training(model: nn.Module, cfg, resume_ckpt: Path | None, log=print) -> dict | None:
    """Make `model` a LoRA run's model when cfg.lora_rank > 0 (or it was resumed from a LoRA
    checkpoint, whose adapters it already holds): base frozen. Returns the `lora` entry of the run's
    checkpoints (spec + base reference), or None for full fine-tuning."""
    saved = read_state(resume_ckpt).get("lora") if resume_ckpt is not None else None
    if saved is not None:  # resumed: the adapters came from the checkpoint, the base from its reference
        info = dict(saved)
        if cfg.lora_rank and cfg.lora_rank != info["rank"]:
            raise GptkitError(f"lora_rank={cfg.lora_rank}, but the run being resumed has rank {info['rank']}",
                              "lora_rank", "resume with the run's own LoRA settings")
    elif not cfg.lora_rank:
        return None
    else:
        spec = LoraSpec(cfg.lora_rank, float(cfg.lora_alpha), float(cfg.lora_dropout),
                        parse_targets(cfg.lora_targets, model))
        apply_lora(model, spec)
        info = {**spec.to_dict(), "base": base_reference(cfg.init)}
    n = freeze_base(model)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA: rank {info['rank']}, alpha {info['alpha']:g} on {', '.join(info['targets'])}; "
        f"{n:,} trainable parameters of {total:,} ({n / total:.2%}); base {info['base']}")
    return info

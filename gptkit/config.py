"""Configuration: the dataclasses, their presets, and the whole config flow of a training run.

GPTConfig describes the architecture of either family gptkit implements, GPT-2 and Llama;
TrainConfig the training run. Both are plain dataclasses that validate themselves in __post_init__
and round-trip through dicts (checkpoints carry them). `resolve_config` turns defaults < a TOML file
< `key=value` overrides into a TrainConfig plus model overrides; `write_toml` writes the resolved
config back; `config_help` is `train --help`. The GPT-2 sizes are OpenAI's (and llm.c's); the
Llama-family shapes are their published config.json files'. The vocab padding to a multiple of 128
follows llm.c (50257 -> 50304) and happens here, in exactly one place.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
VOCAB_PAD_MULTIPLE = 128  # llm.c pads V to Vp, a multiple of 128, for fast matmuls
ATTENTION_BACKENDS = ("sdpa", "math", "flash", "triton")


def pad_vocab(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return ((vocab_size + multiple - 1) // multiple) * multiple


FAMILIES = ("gpt2", "llama")
# RoPE scaling types and the keys each reads, as transformers' rope init functions
# (modeling_rope_utils: linear, dynamic NTK, llama3) define them
ROPE_TYPES = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def canonical_rope_scaling(value: Any, block_size: int, where: str = "rope_scaling") -> str:
    """The stored form of `rope_scaling`: "" (plain RoPE) or canonical JSON with `rope_type` and
    exactly the keys that type reads. Accepts a dict (HF's spelling: `type` for `rope_type` too),
    a JSON string, "" or None. A JSON string keeps the frozen config hashable and TOML/key=value safe."""
    if value in (None, "", {}):
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise GptkitError(f"rope_scaling is not JSON: {value!r}", where,
                              'write it as JSON, e.g. {"rope_type": "linear", "factor": 2.0}') from None
    if not isinstance(value, dict):
        raise GptkitError(f"rope_scaling must be a mapping, got {value!r}", where,
                          'write it as JSON, e.g. {"rope_type": "linear", "factor": 2.0}')
    d = dict(value)
    rope_type = d.pop("rope_type", d.pop("type", "default"))
    if rope_type == "default":
        return ""
    if rope_type not in ROPE_TYPES:
        raise GptkitError(f"unknown rope_type {rope_type!r}", where,
                          f"gptkit implements default, {', '.join(ROPE_TYPES)}")
    d.setdefault("original_max_position_embeddings", block_size)  # transformers' fallback
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in ROPE_TYPES[rope_type]:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise GptkitError(f"rope_scaling {rope_type} needs a positive number {key!r}, got {v!r}", where,
                              f"give {', '.join(ROPE_TYPES[rope_type])}")
        out[key] = int(v) if key == "original_max_position_embeddings" else float(v)
    if rope_type == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise GptkitError("rope_scaling llama3 needs high_freq_factor > low_freq_factor", where,
                          "Llama 3.1's values are low_freq_factor 1, high_freq_factor 4")
    return json.dumps(out, sort_keys=True)


@dataclass(frozen=True)
class GPTConfig:
    """The architecture of either family. `padded_vocab_size` is derived, never set by hand.

    family "gpt2" (OpenAI's GPT-2): learned positions, LayerNorm (with biases when `bias`), tanh-GELU
    MLP of 4*n_embd, tied embeddings. The Llama-only fields must keep their defaults.
    family "llama" (transformers' LlamaForCausalLM): RoPE, RMSNorm, SwiGLU MLP, grouped-query
    attention; `bias` is unused there (attention_bias and mlp_bias say where biases are).
    The 0 / "" defaults of the Llama fields mean "derived", so old checkpoints' configs load as before.
    """

    block_size: int = 1024  # maximum context length (maxT); HF's max_position_embeddings
    vocab_size: int = GPT2_VOCAB_SIZE  # real vocab (V); logits are cropped to it
    n_layer: int = 12  # L
    n_head: int = 12  # nh, query heads
    n_embd: int = 768  # C
    dropout: float = 0.0
    bias: bool = True  # gpt2: biases in every Linear and LayerNorm
    attention: str = "sdpa"  # sdpa | math | flash | triton
    block_q: int = 64  # tile sizes of the `flash` backend
    block_k: int = 64
    family: str = "gpt2"  # gpt2 | llama
    n_kv_head: int = 0  # key/value heads (GQA; 1 = MQA); 0 = n_head
    head_dim: int = 0  # hs; 0 = n_embd // n_head
    intermediate_size: int = 0  # MLP hidden width; 0 = the family's rule (see mlp_size)
    rope_theta: float = 10000.0  # llama: RoPE base
    rope_scaling: str = ""  # llama: "" = plain RoPE, else JSON {"rope_type": linear|dynamic|llama3, ...}
    norm_eps: float = 1e-5  # LayerNorm eps (GPT-2's 1e-5) / RMSNorm eps (HF's rms_norm_eps)
    tie_embeddings: bool = True  # lm_head shares wte's weight
    attention_bias: bool = False  # llama: biases on q, k, v and o projections
    mlp_bias: bool = False  # llama: biases on the gate, up and down projections
    padded_vocab_size: int = field(init=False)  # Vp

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise GptkitError(f"model.{name} must be a positive integer, got {v!r}", name,
                                  f"set {name} to a value > 0")
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if v is None:  # Python callers may spell "derived" as None
                object.__setattr__(self, name, 0)
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise GptkitError(f"model.{name} must be an integer >= 0 (0 = derived), got {v!r}", name,
                                  f"set {name} to 0 or a positive integer")
        if self.family not in FAMILIES:
            raise GptkitError(f"unknown model family {self.family!r}", "family", f"use one of {', '.join(FAMILIES)}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise GptkitError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                              "n_embd", "choose n_embd as a multiple of n_head, or give head_dim")
        if self.n_head % self.kv_heads:
            raise GptkitError(f"n_head={self.n_head} is not divisible by n_kv_head={self.kv_heads}", "n_kv_head",
                              "each key/value head serves a whole group of query heads: choose a divisor of n_head")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise GptkitError(f"dropout must be in [0, 1), got {self.dropout!r}", "dropout",
                              "set dropout to a value in [0, 1)")
        if self.attention not in ATTENTION_BACKENDS:
            raise GptkitError(f"unknown attention backend {self.attention!r}", "attention",
                              f"use one of {', '.join(ATTENTION_BACKENDS)}")
        if not float(self.norm_eps) > 0:
            raise GptkitError(f"norm_eps must be > 0, got {self.norm_eps!r}", "norm_eps", "GPT-2 and Llama use 1e-5")
        if self.family == "gpt2":
            derived = dict(n_kv_head=self.n_head, head_dim=self.n_embd // self.n_head,
                           intermediate_size=4 * self.n_embd, tie_embeddings=True, attention_bias=False,
                           mlp_bias=False)
            for name, ok in derived.items():
                v = getattr(self, name)
                if v != ok and not (v == 0 and name in ("n_kv_head", "head_dim", "intermediate_size")):
                    raise GptkitError(f"{name}={v!r} is not GPT-2's architecture", name,
                                      f"leave {name} at its default, or set family=llama")
        else:
            if self.head_size % 2:
                raise GptkitError(f"RoPE needs an even head_dim, got {self.head_size}", "head_dim",
                                  "choose an even head_dim")
            if not float(self.rope_theta) > 0:
                raise GptkitError(f"rope_theta must be > 0, got {self.rope_theta!r}", "rope_theta",
                                  "Llama 2 uses 10000, Llama 3 500000")
        object.__setattr__(self, "rope_scaling", canonical_rope_scaling(self.rope_scaling, self.block_size))
        object.__setattr__(self, "padded_vocab_size", pad_vocab(self.vocab_size))

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head resolved)."""
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """hs (head_dim resolved)."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        """The MLP's hidden width (intermediate_size resolved). GPT-2: 4*C. Llama: Meta's rule in
        llama/model.py, 2/3 of 4*C rounded up to a multiple of 256."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.family == "gpt2":
            return 4 * self.n_embd
        return 256 * ((int(2 * 4 * self.n_embd / 3) + 255) // 256)

    @property
    def rope(self) -> dict[str, Any]:
        """rope_scaling as a dict ({} = plain RoPE)."""
        return json.loads(self.rope_scaling) if self.rope_scaling else {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - names - {"padded_vocab_size"}
        if unknown:
            raise GptkitError(f"unknown model config key(s): {', '.join(sorted(unknown))}", "config",
                              f"valid keys: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "GPTConfig":
        return dataclasses.replace(self, **kw)


# Architecture presets. The GPT-2 sizes are OpenAI's; the small ones are for CPU work and tests.
# The Llama-family shapes are the published config.json files' (HF hub repos in formats/hub.py).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # small models for the CPU
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # the default run's model: on 2 CPU cores 2 layers beat nanoGPT's 4 (and 3) at a 40 s and a 110 s budget
    # under AdamW; under Muon 3 layers tie a 128-token context at 110 s (README), which is kept instead
    "shakespeare-char": dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=65),
    # the Llama family
    "llama-tiny": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176,
                       block_size=128, vocab_size=32000, bias=False),
    # the main job's model as a Llama: shakespeare-char's width, depth and context, GQA (2 kv heads), a
    # SwiGLU of 3C whose extra columns make up for GQA's smaller k/v: 402,176 parameters against 421,504
    "llama-char": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=384,
                       block_size=128, vocab_size=65, bias=False),
    "tinyllama-1.1b": dict(family="llama", n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, intermediate_size=5632,
                           block_size=2048, vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0,
                           tie_embeddings=False, bias=False),  # 1,100,048,384
    "smollm2-135m": dict(family="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, bias=False),
    "smollm2-360m": dict(family="llama", n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
                         block_size=8192, vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, bias=False),
    "llama-3.2-1b": dict(family="llama", n_layer=16, n_head=32, n_kv_head=8, head_dim=64, n_embd=2048,
                         intermediate_size=8192, block_size=131072, vocab_size=128256, norm_eps=1e-5,
                         rope_theta=500000.0, bias=False,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}
# chat/instruct variants share their base model's shape
for _base, _variants in {"tinyllama-1.1b": ("tinyllama-1.1b-chat",),
                         "smollm2-135m": ("smollm2-135m-instruct",), "smollm2-360m": ("smollm2-360m-instruct",),
                         "llama-3.2-1b": ("llama-3.2-1b-instruct",)}.items():
    for _v in _variants:
        MODEL_PRESETS[_v] = MODEL_PRESETS[_base]


def model_preset(name: str, **overrides) -> GPTConfig:
    if name not in MODEL_PRESETS:
        raise GptkitError(f"unknown model preset {name!r}", "--model",
                          f"use one of {', '.join(MODEL_PRESETS)} or a path to a model")
    return GPTConfig(**{**MODEL_PRESETS[name], **overrides})


# the values a TrainConfig key may take, where it takes one of a few names
TRAIN_CHOICES = {"optimizer": ("auto", "adamw", "muon"), "loader": ("random", "sequential"),
                 "dtype": ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                 "optim_dtype": ("float32", "bfloat16", "fp32", "bf16"),
                 "param_dtype": ("auto", "float32", "bfloat16", "fp32", "bf16")}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the architecture. Every field is a `key=value`."""

    # where
    data: str = ""  # directory with train*.bin / val*.bin / meta.json ("" = the default dataset)
    dataset: str = "shakespeare-char"  # preset prepared when `data` is empty
    out: str = ""  # run directory ("" = runs/<timestamp>)
    model: str = "shakespeare-char"  # architecture preset, or a path whose config is used
    init: str = "scratch"  # scratch | gpt2 | gpt2-medium | ... | PATH
    # batch
    batch_size: int = 48  # B, micro-batch per process
    block_size: int = 128  # T, sequence length (<= the model's block_size); a model from scratch gets T as its context
    grad_accum: int = 1
    # optimisation
    max_steps: int = 20000  # with max_time, a cap; the time budget usually ends the run first
    # wall-clock budget in s from the process start, final eval included (0 = off); the default
    # run's 110 s; a config or command line that sets max_steps without max_time turns it off
    max_time: float = 110.0
    # the default run's tuned values: lr 6e-3 decaying to lr/10 (nanoGPT's min_lr = lr/10)
    lr: float = 6e-3
    min_lr: float = -1.0  # < 0: lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_steps: int = 0  # 0 = decay until max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    # auto | adamw | muon (torch.optim.Muon for the blocks' 2-D matrices, AdamW with `lr` for the
    # rest); auto = muon from scratch, adamw for fine-tuning (init, LoRA) and under FSDP
    optimizer: str = "auto"
    muon_lr: float = 0.04  # Muon's peak LR; the schedule scales it as it scales lr
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (torch.optim.Muon's ns_steps)
    loader: str = "random"  # random | sequential (file order, as llm.c's loader with shuffling off)
    # eval, samples, checkpoints, logs
    eval_interval: int = 1000  # 0 = only at the end
    eval_batches: int = 10  # batches per periodic val estimate; the final eval covers the whole split
    final_eval: bool = True  # loss over the whole val split at the end
    # multiple-choice tasks scored at every eval, comma-separated: hellaswag, mc (logs <task>_acc_norm)
    eval_tasks: str = ""
    eval_task_limit: int = 0  # items per task (0 = all)
    eval_task_file: str = ""  # the task's jsonl (one task; default for hellaswag: found or downloaded)
    sample_interval: int = 0  # 0 = only at the end
    sample_tokens: int = 200  # 0 = no samples
    sample_temperature: float = 0.8
    sample_top_k: int = 200  # 0 = off
    sample_top_p: float = 1.0
    ckpt_interval: int = 0  # 0 = only at the end (and at eval steps once ckpt_every_s have passed)
    # a long run also saves at its eval steps (log steps if eval_interval=0) once this many seconds
    # have passed since the last save, as nanoGPT and llm.c save at eval steps (0 = off)
    ckpt_every_s: float = 300.0
    keep_last: int = 3  # checkpoints kept (0 = all)
    log_interval: int = 10
    # runtime
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    optim_dtype: str = "float32"  # AdamW moments: float32 | bfloat16 (half the optimizer memory)
    # bfloat16 = bf16 weights for forward/backward with fp32 master weights; auto = bfloat16 when the
    # compute dtype is bf16 on a CPU in a single process (1.5x faster than autocast there), else float32
    param_dtype: str = "auto"
    threads: int = 0  # 0 = PyTorch's default
    seed: int = 1337
    dropout: float = 0.0
    attention: str = "auto"  # auto = math on a CPU for block_size <= 128 (faster there than sdpa), else sdpa
    progress: bool = True
    # robustness, scale-out and run logs
    max_bad_steps: int = 10  # non-finite loss/gradient steps skipped before the run stops (0 = stop at the first)
    fsdp: bool = False  # shard parameters, gradients and optimizer state across torchrun processes (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    loggers: str = ""  # extra loggers beside metrics.jsonl, comma-separated: tensorboard, wandb
    wandb_project: str = "gptkit"
    # LoRA (gptkit/lora.py): rank 0 = off (full fine-tuning); with --init, trains adapters only
    lora_rank: int = 0
    lora_alpha: float = 8.0  # scaling = lora_alpha / lora_rank (PEFT's default alpha)
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated module names ("" = PEFT's default: c_attn for GPT-2)

    def __post_init__(self):
        positive = ("batch_size", "block_size", "grad_accum", "max_steps", "log_interval", "eval_batches",
                    "muon_ns_steps")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise GptkitError(f"{name} must be a positive integer, got {v!r}", name, f"set {name}=N with N > 0")
        nonneg = ("warmup_steps", "decay_steps", "eval_interval", "sample_interval", "sample_tokens", "ckpt_interval",
                  "keep_last", "threads", "max_bad_steps", "eval_task_limit")
        for name in nonneg:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise GptkitError(f"{name} must be a non-negative integer, got {v!r}", name, "set it to 0 or more")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise GptkitError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}", "min_lr_ratio",
                              "min_lr = lr * min_lr_ratio; nanoGPT's is 0.1")
        if self.min_lr < 0 and self.lr > 0:
            self.min_lr = self.lr * self.min_lr_ratio
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GptkitError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}", "lr",
                              "set lr > 0 and min_lr between 0 and lr")
        if self.sample_temperature < 0 or self.sample_top_k < 0 or not 0 < self.sample_top_p <= 1:
            raise GptkitError("need sample_temperature >= 0, sample_top_k >= 0 and 0 < sample_top_p <= 1",
                              "sample_temperature", "fix the sample_* values")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise GptkitError("weight_decay and grad_clip must be >= 0", "weight_decay", "set them to 0 or more")
        for name, allowed in TRAIN_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise GptkitError(f"unknown {name} {getattr(self, name)!r}", name, f"use one of {', '.join(allowed)}")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1:
            raise GptkitError(f"need muon_lr > 0 and 0 <= muon_momentum < 1, got {self.muon_lr}, {self.muon_momentum}",
                              "muon_lr", "set muon_lr > 0 and muon_momentum in [0, 1)")
        if not self.max_time >= 0 or not self.ckpt_every_s >= 0:
            if not self.ckpt_every_s >= 0:
                raise GptkitError(f"ckpt_every_s must be >= 0 seconds, got {self.ckpt_every_s!r}", "ckpt_every_s",
                                  "set ckpt_every_s=0 for no time-based checkpoints")
            raise GptkitError(f"max_time must be >= 0 seconds, got {self.max_time!r}", "max_time",
                              "set max_time=0 for no time limit")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            raise GptkitError(f"unknown device {self.device!r}", "device", "use auto, cpu, cuda[:N] or mps")
        if self.attention not in ATTENTION_BACKENDS + ("auto",):
            raise GptkitError(f"unknown attention backend {self.attention!r}", "attention",
                              f"use auto or one of {', '.join(ATTENTION_BACKENDS)}")
        self._check_lora()
        unknown = [x for x in self.loggers.split(",") if x.strip() and x.strip() not in ("tensorboard", "wandb")]
        if unknown:
            raise GptkitError(f"unknown logger {unknown[0]!r}", "loggers",
                              "use tensorboard, wandb or both (comma-separated)")

    def _check_lora(self) -> None:
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise GptkitError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}", "lora_rank",
                              "set lora_rank=0 (off) or e.g. lora_rank=8")
        if not self.lora_alpha > 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise GptkitError(f"need lora_alpha > 0 and 0 <= lora_dropout < 1, got {self.lora_alpha}, "
                              f"{self.lora_dropout}", "lora_alpha", "fix the lora_* values")
        if self.lora_rank and self.init == "scratch":
            raise GptkitError("LoRA fine-tunes existing weights, and no --init was given", "lora_rank",
                              "add --init BASE (gpt2, a run directory, an HF directory...) or drop the lora_* keys")
        if self.lora_rank and self.fsdp:
            raise GptkitError("LoRA runs do not shard with FSDP", "fsdp",
                              "use fsdp=false: the frozen base and small adapters train with DDP under torchrun")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_KEYS = {f.name: f for f in fields(TrainConfig)}
MODEL_KEYS = {f.name: f for f in fields(GPTConfig) if f.init}


def coerce_value(key: str, raw: Any, typ: Any) -> Any:
    """Turn a `key=value` string (or a TOML value) into the field's type, or fail naming the key."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    if not isinstance(raw, str):
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if typ is not bool and isinstance(raw, bool) or not isinstance(raw, typ):
            raise GptkitError(f"{key} must be {typ.__name__}, got {raw!r}", key,
                              "write it as key=value with a value of that type")
        return raw
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(float(raw)) if "e" in raw.lower() and float(raw).is_integer() else int(raw)
        return typ(raw)
    except ValueError:
        raise GptkitError(f"bad value {raw!r} for {key}", key, f"expected {typ.__name__}") from None


# ---------------------------------------------------------------------------------------------
# the config flow of a training run: TOML + key=value
BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # `--config NAME.toml` finds these by name

# model keys that a `key=value` may set; block_size/dropout/attention are TrainConfig fields
MODEL_ONLY_KEYS = {k: f for k, f in MODEL_KEYS.items() if k not in TRAIN_KEYS}


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():  # a bare name: one of the configs shipped with gptkit
        bundled = BUNDLED_CONFIGS / p.name
        bundled = bundled if bundled.suffix == ".toml" else bundled.with_name(bundled.name + ".toml")
        if p.parent != Path(".") or not bundled.is_file():
            shipped = ", ".join(sorted(q.name for q in BUNDLED_CONFIGS.glob("*.toml")))
            raise GptkitError("config file not found", p, f"give an existing .toml file or a shipped one: {shipped}")
        p = bundled
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"invalid TOML: {e}", p, "fix the TOML syntax") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if v is None:
        return '""'
    return json.dumps(str(v))


ARCH_TABLE = "architecture"  # config.toml's table of model keys (a top-level `model` key names the preset)


def write_toml(path: Path, train: dict[str, Any], model: dict[str, Any], note: str = "") -> None:
    """The resolved config as TOML that `--config` reads back: the training keys at the top level
    (`out` commented out, so the file starts a new run), the architecture in an [architecture] table."""
    lines = ["# resolved configuration of this run: `gptkit train --config this-file` reproduces it in a new run dir"]
    lines += [f"# {line}" for line in note.splitlines()]
    for k, v in train.items():
        lines.append(f"{'# ' if k == 'out' else ''}{k} = {_toml_value(v)}")
    # block_size, dropout and attention are training keys, already above
    lines += ["", f"[{ARCH_TABLE}]"] + [f"{k} = {_toml_value(v)}" for k, v in model.items()
                                        if k in MODEL_ONLY_KEYS or k == "vocab_size"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise GptkitError(f"expected key=value, got {it!r}", it, "write options as key=value, e.g. max_steps=500")
        k, v = it.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if k not in TRAIN_KEYS and k not in MODEL_ONLY_KEYS:
            raise GptkitError(f"unknown config key {k!r}", it, "see `gptkit train --help` for the keys")
        out[k] = v
    return out


def resolve_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
                   ) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, model overrides) from defaults < TOML file < overrides."""
    train_vals: dict[str, Any] = {}
    model_vals: dict[str, Any] = {}

    def put(k, v, where):
        if k in TRAIN_KEYS:
            train_vals[k] = coerce_value(k, v, TRAIN_KEYS[k].type)
        elif k in MODEL_ONLY_KEYS:
            model_vals[k] = coerce_value(k, v, MODEL_ONLY_KEYS[k].type)
        else:
            raise GptkitError(f"unknown config key {k!r}", where, "see `gptkit train --help` for the keys")

    if config_file:
        raw = load_toml(config_file)
        for k, v in raw.items():
            if k in ("model", ARCH_TABLE) and isinstance(v, dict):
                for mk, mv in v.items():
                    if mk in ("block_size", "dropout", "attention"):
                        put(mk, mv, str(config_file))
                    elif mk in MODEL_ONLY_KEYS:
                        model_vals[mk] = coerce_value(mk, mv, MODEL_ONLY_KEYS[mk].type)
                    elif mk not in ("vocab_size", "padded_vocab_size"):
                        raise GptkitError(f"unknown model key {mk!r}", str(config_file),
                                          "see `gptkit train --help` for the keys")
                    elif mk == "vocab_size":
                        model_vals[mk] = coerce_value(mk, mv, int)
            else:
                put(k, v, str(config_file))
    for k, v in (overrides or {}).items():
        if k == "vocab_size":
            model_vals[k] = coerce_value(k, v, int)
        else:
            put(k, v, f"{k}={v}")
    if "max_steps" in train_vals and "max_time" not in train_vals:
        # the 110 s budget belongs to the default run; a run that names its length trains exactly that long
        train_vals["max_time"] = 0.0
    return TrainConfig(**train_vals), model_vals


# keys a resumed run may change: its length, its logging and where and how fast it runs. The others
# (the data order, the batch, the optimizer, the schedule, the architecture) define the run itself.
def config_help() -> str:
    """Every train key with its default, for `gptkit train --help`."""
    d = TrainConfig()
    lines = ["training keys (key=value, or in --config TOML):"]
    for f in fields(TrainConfig):
        shown = "lr * min_lr_ratio" if f.name == "min_lr" else repr(getattr(d, f.name))
        lines.append(f"  {f.name} = {shown}")
    lines.append("model keys (from scratch; also a [model] table in TOML):")
    for k in MODEL_ONLY_KEYS:
        lines.append(f"  {k}")
    return "\n".join(lines)

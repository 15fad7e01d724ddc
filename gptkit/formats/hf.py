"""Hugging Face `transformers` formats, GPT-2 and the Llama family: read and write.

GPT-2. HF's GPT2LMHeadModel stores the same tensors as gptkit under the same names, except that its
Conv1D layers keep weights as (in, out) where nn.Linear keeps (out, in): those four are transposed
(TRANSPOSED). Files saved from the bare GPT2Model (the hub's openai-community/* checkpoints) lack
the `transformer.` prefix; both spellings load. Weights are read with safetensors, or from
pytorch_model.bin with `torch.load(weights_only=True)`, which never runs code from the file.

Llama family. transformers' LlamaForCausalLM (and MistralForCausalLM without a sliding window)
keeps q/k/v and gate/up as separate Linear layers, (out, in) like gptkit's; gptkit stacks them
(c_attn = [q; k; v], c_fc = [gate; up]), so import concatenates and export splits (LLAMA_KEYS).
Both the classic `rope_theta`/`rope_scaling` keys and transformers 5's `rope_parameters` are read;
export writes the classic keys, which transformers 4 and 5 both read.

Weights may be one file or shards listed by `model.safetensors.index.json` (transformers'
layout); export shards above `max_shard_size` the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptkit.config import GPTConfig, canonical_rope_scaling
from gptkit.errors import GptkitError, make_dir

# weights stored (in, out) by HF's Conv1D, (out, in) by nn.Linear
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LLAMA_TYPES = ("llama", "mistral")  # model_type values read as the Llama family
MAX_SHARD_SIZE = 5 * 10**9  # transformers 4's default for save_pretrained (5GB); transformers 5 uses 50GB


def is_hf_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """Map an HF config dict (GPT-2 or Llama family) to GPTConfig, refusing variants gptkit does not implement."""
    if hf.get("model_type", "gpt2") in LLAMA_TYPES:
        return llama_config_from_hf(hf, where)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GptkitError(f"model_type {hf.get('model_type')!r} is neither GPT-2 nor Llama-family", where,
                          f"gptkit loads model_type gpt2, {', '.join(LLAMA_TYPES)}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptkitError(f"activation {act!r} is not GPT-2's tanh GELU", where,
                          "gptkit loads GPT-2-architecture models only")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise GptkitError(f"layer_norm_epsilon {eps} differs from GPT-2's 1e-5", where,
                          "gptkit loads GPT-2-architecture models only")
    n_embd = hf.get("n_embd", hf.get("hidden_size", 768))
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise GptkitError(f"n_inner {hf['n_inner']} is not 4*n_embd", where,
                          "gptkit loads GPT-2-architecture models only")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GptkitError(f"{flag}=true is not GPT-2's attention", where,
                              "gptkit loads GPT-2-architecture models only")
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A config.json that transformers' GPT2LMHeadModel / LlamaForCausalLM from_pretrained accepts."""
    if config.family == "llama":
        return llama_config_to_hf(config)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "vocab_size": config.vocab_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        # GPT-2's <|endoftext|>; other vocabularies have no such token
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------------------------
# Llama family: config
def _hf_int(hf: dict, key: str, where: str, default=None) -> int:
    v = hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise GptkitError(f"{key} must be a positive integer, got {v!r}", where, "the config.json is damaged")
    return v


def llama_config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """Map an HF LlamaConfig (or MistralConfig without a sliding window) dict to GPTConfig, with
    transformers' defaults for missing keys."""
    mt = hf.get("model_type")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise GptkitError(f"hidden_act {act!r} is not Llama's SiLU", where, "gptkit's Llama MLP is SwiGLU (silu)")
    n_embd = _hf_int(hf, "hidden_size", where, 4096)
    block_size = _hf_int(hf, "max_position_embeddings", where, 2048)
    if mt == "mistral" and hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < block_size:
        raise GptkitError(f"sliding_window {hf['sliding_window']} is shorter than the context {block_size}", where,
                          "gptkit implements full causal attention; models whose window covers the context load")
    n_head = _hf_int(hf, "num_attention_heads", where, 32)
    n_kv = hf.get("num_key_value_heads") or n_head
    if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv <= 0 or n_head % n_kv:
        raise GptkitError(f"num_attention_heads {n_head} is not divisible by num_key_value_heads {n_kv}", where,
                          "each key/value head must serve a whole group of query heads")
    head_dim = hf.get("head_dim") or n_embd // n_head
    if not hf.get("head_dim") and n_embd % n_head:
        raise GptkitError(f"hidden_size {n_embd} is not divisible by num_attention_heads {n_head}", where,
                          "give head_dim")
    # RoPE: transformers 5's rope_parameters, or the classic rope_theta + rope_scaling
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:
        raise GptkitError("per-layer-type rope_parameters are not a Llama model's", where,
                          "gptkit reads one rope_parameters mapping")
    scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling:  # the oldest spelling of rope_type
        scaling.setdefault("rope_type", scaling.pop("type"))
    rope_theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope = {**params, **scaling}  # transformers 5 lets a classic rope_scaling take precedence
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise GptkitError(f"partial_rotary_factor {partial} is not Llama's full RoPE", where,
                          "gptkit rotates the whole head")
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        # transformers' dynamic NTK grows past max_position_embeddings, whatever else the dict says
        rope["original_max_position_embeddings"] = block_size
    elif "original_max_position_embeddings" in hf and rope.get("rope_type", rope.get("type")) == "llama3":
        rope.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    rope_scaling = canonical_rope_scaling(rope, block_size, where)
    try:
        return GPTConfig(
            family="llama", block_size=block_size, vocab_size=_hf_int(hf, "vocab_size", where, 32000),
            n_layer=_hf_int(hf, "num_hidden_layers", where, 32), n_head=n_head, n_embd=n_embd,
            n_kv_head=n_kv, head_dim=head_dim if head_dim != n_embd // n_head or n_embd % n_head else 0,
            intermediate_size=_hf_int(hf, "intermediate_size", where, 11008), rope_theta=float(rope_theta),
            rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bias=False,
            attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)))
    except GptkitError as e:  # name the file, not gptkit's field
        raise GptkitError(e.what, where, e.hint) from None


def llama_config_to_hf(config: GPTConfig) -> dict:
    """A config.json that transformers.LlamaForCausalLM.from_pretrained accepts (classic rope keys)."""
    rope = config.rope
    max_pos = config.block_size
    if rope.get("rope_type") == "dynamic":  # transformers' dynamic NTK grows past max_position_embeddings
        max_pos = rope["original_max_position_embeddings"]
        rope = {k: v for k, v in rope.items() if k != "original_max_position_embeddings"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": max_pos,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope or None,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": None,  # the tokenizer's files name its special tokens
        "eos_token_id": None,
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------------------------
# weights: read (single file or shards)
def _read_safetensors(st: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise GptkitError(f"cannot read safetensors file: {e}", st, "re-download or re-export it") from None


def _read_torch_bin(pt: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, which would run the file's code: never say that
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            what = "refusing to unpickle: the file holds code or objects other than tensors"
        else:
            what = f"cannot read {pt.name}: {type(e).__name__}"
        raise GptkitError(what, pt, "only plain tensor files load; get a model.safetensors instead") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise GptkitError(f"{pt.name} holds a {type(sd).__name__}, not a name -> tensor dict", pt,
                          "save the weights with model.save_pretrained, or get a model.safetensors")
    return sd


def _read_sharded(index: Path, read) -> dict[str, torch.Tensor]:
    """Every shard an index (transformers' *.index.json) names, each checked present first."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise GptkitError(f"unreadable shard index: {type(e).__name__}: {e}", index,
                          "the index is damaged; download it again") from None
    for name in shards:
        if Path(name).name != name:
            raise GptkitError(f"shard name {name!r} is not a file name", index, "the index is damaged")
        if not (index.parent / name).is_file():
            raise GptkitError(f"missing shard {name} (named by {index.name})", index.parent / name,
                              f"download every shard the index names ({len(shards)} files)")
    out: dict[str, torch.Tensor] = {}
    for name in shards:
        out.update(read(index.parent / name))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise GptkitError(f"tensor {missing[0]} is named by the index but in no shard", index,
                          "the shards and the index do not match; download them again")
    return out


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of an HF directory, without running any code from it."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        return _read_sharded(path / "model.safetensors.index.json", _read_safetensors)
    if (path / "pytorch_model.bin").is_file():
        return _read_torch_bin(path / "pytorch_model.bin")
    return _read_sharded(path / "pytorch_model.bin.index.json", _read_torch_bin)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    padded = t.new_zeros(rows, *t.shape[1:])
    padded[: t.shape[0]] = t
    return padded


# ------------------------------------------------------------------------------------------------
# weights: GPT-2
def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, where: str = "") -> dict[str, torch.Tensor]:
    """HF tensors -> gptkit state dict (wte padded to Vp; GPT-2's Conv1D weights transposed)."""
    if config.family == "llama":
        return llama_state_dict_from_hf(sd, config, where)
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        if k == "lm_head.weight":
            continue  # tied to wte
        name = k if k.startswith("transformer.") else "transformer." + k
        if name.endswith(TRANSPOSED):
            v = v.t()
        out[name] = v.contiguous()
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise GptkitError("no token embedding (wte) in the weights", where, "is this a GPT-2 checkpoint?")
    out["transformer.wte.weight"] = _pad_rows(wte, config.padded_vocab_size)
    head = sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, wte):  # GPT-2 ties them; a separate head can't be dropped
        raise GptkitError("the weights hold an lm_head that differs from wte (tie_word_embeddings=false)", where,
                          "gptkit loads GPT-2 with tied embeddings only")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptkit state dict -> HF tensors (wte unpadded; GPT-2's Conv1D layout)."""
    if config.family == "llama":
        return llama_state_dict_to_hf(sd, config)
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        if k == "transformer.wte.weight":
            v = v[: config.vocab_size]
        if k.endswith(TRANSPOSED):
            v = v.t()
        out[k] = v.detach().to("cpu").contiguous()
    return out


# ------------------------------------------------------------------------------------------------
# weights: Llama family. gptkit name -> HF names stacked along dim 0 (per layer, `{i}` = layer)
LLAMA_KEYS = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj": ("mlp.down_proj",),
    "ln_1": ("input_layernorm",),
    "ln_2": ("post_attention_layernorm",),
}


def _llama_names(config: GPTConfig):
    """(gptkit name, [HF names]) for every tensor of a Llama-family model."""
    yield "transformer.wte.weight", ["model.embed_tokens.weight"]
    for i in range(config.n_layer):
        for ours, theirs in LLAMA_KEYS.items():
            has_bias = (config.attention_bias if ours.startswith("attn.") else
                        config.mlp_bias if ours.startswith("mlp.") else False)
            for suffix in ("weight", "bias") if has_bias else ("weight",):
                yield f"transformer.h.{i}.{ours}.{suffix}", [f"model.layers.{i}.{t}.{suffix}" for t in theirs]
    yield "transformer.ln_f.weight", ["model.norm.weight"]
    if not config.tie_embeddings:
        yield "lm_head.weight", ["lm_head.weight"]


def llama_state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, where: str = "") -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors -> gptkit (q/k/v and gate/up stacked, vocab rows padded to Vp)."""
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:  # saved from the bare LlamaModel
        sd = {("model." + k if not k.startswith("lm_head.") else k): v for k, v in sd.items()}
    left = {k for k in sd if not k.endswith("rotary_emb.inv_freq")}  # old transformers saved the RoPE buffer
    if config.tie_embeddings:
        left.discard("lm_head.weight")  # transformers ties it to the embedding whatever the file holds
    out = {}
    for ours, theirs in _llama_names(config):
        missing = [t for t in theirs if t not in sd]
        if missing:
            raise GptkitError(f"tensor {missing[0]} is missing from the weights", where,
                              "the files are incomplete or do not match config.json")
        left -= set(theirs)
        out[ours] = torch.cat([sd[t] for t in theirs]) if len(theirs) > 1 else sd[theirs[0]].contiguous()
    if left:
        raise GptkitError(f"unexpected tensor(s) {', '.join(sorted(left)[:3])} in the weights", where,
                          "they do not belong to a Llama model with this config.json")
    out["transformer.wte.weight"] = _pad_rows(out["transformer.wte.weight"], config.padded_vocab_size)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["lm_head.weight"] = _pad_rows(out["lm_head.weight"], config.padded_vocab_size)
    return out


def llama_state_dict_to_hf(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptkit -> HF LlamaForCausalLM tensors (stacked weights split, vocab rows unpadded)."""
    out = {}
    for ours, theirs in _llama_names(config):
        t = sd[ours].detach().to("cpu")
        if ours in ("transformer.wte.weight", "lm_head.weight"):
            t = t[: config.vocab_size]
        if len(theirs) == 1:
            out[theirs[0]] = t.contiguous()
            continue
        if ours.split(".")[-2] == "c_attn":
            q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
            parts = t.split([q, kv, kv])
        else:
            parts = t.chunk(2)  # gate, up
        for name, part in zip(theirs, parts):
            out[name] = part.contiguous()
    return out


# ------------------------------------------------------------------------------------------------
def load_hf(path: Path):
    """(GPTConfig, gptkit state dict) from an HF directory."""
    path = Path(path)
    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GptkitError(f"unreadable config.json: {e}", path / "config.json",
                          "the file is damaged; write it again with save_pretrained") from None
    if not isinstance(hf_cfg, dict):
        raise GptkitError("config.json is not a JSON object", path / "config.json",
                          "the file is damaged; write it again with save_pretrained")
    try:
        config = config_from_hf(hf_cfg, str(path / "config.json"))
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. "n_layer": "12"
        raise GptkitError(f"bad config.json: {e}", path / "config.json",
                          "the file is damaged; write it again with save_pretrained") from None
    return config, state_dict_from_hf(read_hf_weights(path), config, str(path))


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most max_shard_size bytes (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_hf(model, path: Path, max_shard_size: int = MAX_SHARD_SIZE) -> list[Path]:
    """Write `model` as a directory transformers loads: config.json + model.safetensors, or, above
    `max_shard_size` bytes, model-0000i-of-0000n.safetensors shards + model.safetensors.index.json.
    Returns the files written."""
    path = Path(path)
    make_dir(path, "output directory")
    tensors = state_dict_to_hf(model.state_dict(), model.config)
    shards = _shards(tensors, max_shard_size)
    for old in list(path.glob("model-*-of-*.safetensors")) + [path / "model.safetensors",
                                                              path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a previous export's files would shadow or contradict these
    files = [path / "config.json"]
    if len(shards) == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        files.append(path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(path / name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append(path / "model.safetensors.index.json")
    mask = os.umask(0)  # safetensors creates its files 0600; follow the umask as the other files do
    os.umask(mask)
    for f in files:
        if f.suffix == ".safetensors":
            os.chmod(f, 0o666 & ~mask)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    return files

"""Hugging Face `transformers` GPT-2 format: read and write.

HF's GPT2LMHeadModel stores the same tensors as gptkit under the same names, except that its
Conv1D layers keep weights as (in, out) where nn.Linear keeps (out, in): those four are transposed
(TRANSPOSED). Files saved from the bare GPT2Model (the hub's openai-community/* checkpoints) lack
the `transformer.` prefix; both spellings load. Weights are read with safetensors, or from
pytorch_model.bin with `torch.load(weights_only=True)`, which never runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError, make_dir

# weights stored (in, out) by HF's Conv1D, (out, in) by nn.Linear
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """Map an HF GPT2Config dict to GPTConfig, refusing variants gptkit does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GptkitError(f"model_type {hf.get('model_type')!r} is not GPT-2", where,
                          "gptkit loads GPT-2 checkpoints only")
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
    """A config.json that transformers.GPT2LMHeadModel.from_pretrained accepts."""
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


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of an HF directory, without running any code from it."""
    path = Path(path)
    st = path / "model.safetensors"
    if st.is_file():
        try:
            return load_file(str(st))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise GptkitError(f"cannot read safetensors file: {e}", st, "re-download or re-export it") from None
    pt = path / "pytorch_model.bin"
    try:
        return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, which would run the file's code: never say that
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            what = "refusing to unpickle: the file holds code or objects other than tensors"
        else:
            what = f"cannot read {pt.name}: {type(e).__name__}"
        raise GptkitError(what, pt, "only plain tensor files load; get a model.safetensors instead") from None


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, where: str = "") -> dict[str, torch.Tensor]:
    """HF tensors -> gptkit state dict (wte padded to Vp, Conv1D weights transposed)."""
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
    if wte.shape[0] != config.padded_vocab_size:
        padded = wte.new_zeros(config.padded_vocab_size, wte.shape[1])
        padded[: wte.shape[0]] = wte
        out["transformer.wte.weight"] = padded
    head = sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, wte):  # GPT-2 ties them; a separate head can't be dropped
        raise GptkitError("the weights hold an lm_head that differs from wte (tie_word_embeddings=false)", where,
                          "gptkit loads GPT-2 with tied embeddings only")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptkit state dict -> HF GPT2LMHeadModel tensors (wte unpadded, Conv1D layout)."""
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


def load_hf(path: Path):
    """(GPTConfig, gptkit state dict) from an HF directory."""
    path = Path(path)
    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GptkitError(f"unreadable config.json: {e}", path / "config.json",
                          "the file is damaged; write it again with save_pretrained") from None
    config = config_from_hf(hf_cfg, str(path / "config.json"))
    return config, state_dict_from_hf(read_hf_weights(path), config, str(path))


def save_hf(model, path: Path) -> None:
    """Write `model` as a directory transformers loads: config.json + model.safetensors."""
    path = Path(path)
    make_dir(path, "output directory")
    tensors = state_dict_to_hf(model.state_dict(), model.config)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")

"""Load a model from anything INTERFACES.md's `--model PATH` accepts, recognised by content.

- a run directory (its latest checkpoint) or a gptkit checkpoint directory;
- a Hugging Face directory, GPT-2 or Llama family (config.json + model.safetensors, shards named
  by model.safetensors.index.json, or pytorch_model.bin);
- an llm.c model .bin (v3 or v5);
- a GGUF file (llama.cpp's format, architectures gpt2 and llama), with its tokenizer and chat template;
- OpenAI's original TF checkpoint directory;
- a pretrained name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, the Llama-family presets such as
  smollm2-135m, or one of their repo ids), through huggingface_hub.

Returns a `Loaded`: the model plus what sampling needs to turn ids into text (a char vocab,
or a directory that may hold BPE files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptkit import checkpoint, lora
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.formats import gguf, hf
from gptkit.formats.hub import download_pretrained, is_pretrained_name
from gptkit.formats.llmc import MODEL_MAGIC, chars_beside, read_model
from gptkit.formats.tf import load_tf
from gptkit.model import GPT

PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # more in gptkit.formats.hub.REPOS


@dataclass
class Loaded:
    model: GPT
    kind: str  # gptkit | hf | llmc | tf | gguf
    source: Path | None = None  # the file or directory the weights came from
    chars: list[str] | None = None  # char-level vocab, if the model has one
    tokenizer_dir: Path | None = None  # where BPE files may live beside the weights
    state: dict[str, Any] = field(default_factory=dict)  # state.json of a gptkit checkpoint
    # a tokenizer the file itself carries (GGUF): {json: tokenizer.json text, config, chat_template}
    tokenizer_spec: dict[str, Any] | None = None


def build_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], where: str) -> GPT:
    """A GPT from a config and a complete state dict; any mismatch is a user error naming `where`."""
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise GptkitError(
            f"weights do not match the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}", where,
            "the weights were written for another architecture than the config describes")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise GptkitError(f"tensor {k} has shape {tuple(state_dict[k].shape)}, the config needs {tuple(v.shape)}",
                              where, "the config does not match the weights")
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in state_dict.items()},
                          strict=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie after to_empty
    model.reset_rope()  # RoPE tables are derived, not loaded: compute them on the real device
    return model.eval()


def load_checkpoint_model(ckpt: Path, merge: bool = True) -> Loaded:
    """A gptkit checkpoint directory's model, with its char vocab and state.json. A LoRA run's
    checkpoint loads its base from the recorded reference and applies the adapters: merged into
    the weights (a plain GPT), or with `merge=False` kept apart (to resume training)."""
    ckpt = Path(ckpt)
    if "lora" in checkpoint.read_state(ckpt):
        return load_lora_checkpoint(ckpt, merge)
    config, sd, state = checkpoint.read_checkpoint(ckpt)
    model = build_model(config, sd, str(ckpt / checkpoint.MODEL_FILE))
    return Loaded(model, "gptkit", ckpt, chars=state.get("chars"), tokenizer_dir=ckpt, state=state)


def load_lora_checkpoint(ckpt: Path, merge: bool = True) -> Loaded:
    state = checkpoint.read_state(ckpt)
    info = state["lora"]
    try:
        base = load_model(info["base"])
    except GptkitError as e:
        raise GptkitError(f"the base model of this LoRA checkpoint does not load: {e.what}", ckpt,
                          f"restore the base at {info['base']} (the run's --init), then load again") from None
    config = GPTConfig.from_dict(state["model_config"])
    model = build_model(config, base.model.state_dict(), str(info["base"]))
    lora.apply_lora(model, lora.LoraSpec.from_dict(info))
    where = str(ckpt / checkpoint.MODEL_FILE)
    adapters = checkpoint.read_tensors(ckpt / checkpoint.MODEL_FILE)
    bad = [k for k, v in adapters.items() if not torch.isfinite(v).all()]
    if bad:
        raise GptkitError(f"adapter {bad[0]} holds NaN or inf", where,
                          "the run diverged before this checkpoint; use an older ckpt_* directory")
    lora.load_adapters(model, adapters, where)
    if merge:
        lora.merge_lora(model)
    return Loaded(model.eval(), "gptkit", ckpt, chars=state.get("chars") or base.chars,
                  tokenizer_dir=base.tokenizer_dir, state=state)


def load_model(path_or_name: str | Path, **kwargs) -> Loaded:
    """Recognise `path_or_name` by content and load it onto the CPU in fp32."""
    s = str(path_or_name)
    path = Path(path_or_name)
    if not path.exists():
        if is_pretrained_name(s):
            return load_model(download_pretrained(s, **kwargs))
        raise GptkitError("no such file or directory", s,
                          f"give a run/checkpoint/HF directory, an llm.c .bin, or one of {', '.join(PRETRAINED_NAMES)}")
    if path.is_dir():
        ckpt = checkpoint.find_checkpoint(path)
        if ckpt is not None:
            return load_checkpoint_model(ckpt)
        if hf.is_hf_dir(path):
            config, sd = hf.load_hf(path)
            return Loaded(build_model(config, sd, str(path)), "hf", path, tokenizer_dir=path)
        if (path / "model.bin").is_file():  # an llm.c export: model.bin (+ tokenizer.bin)
            return load_model(path / "model.bin", **kwargs)
        if (path / "model.ckpt.index").is_file():
            config, sd = load_tf(path)
            return Loaded(build_model(config, sd, str(path)), "tf", path, tokenizer_dir=path)
        if (path / "config.toml").is_file() or (path / "metrics.jsonl").is_file():
            raise GptkitError("the run has no checkpoint: it stopped before its first save", path,
                              f"continue it with `gptkit train --out {path} --resume` (it starts from step 0), "
                              "or give a run that has a ckpt_* directory")
        raise GptkitError("not a model directory", path,
                          "expected a gptkit run or checkpoint (ckpt_*/state.json), an HF directory "
                          "(config.json + model.safetensors or its shards) or an OpenAI TF checkpoint (model.ckpt.index)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == gguf.MAGIC:
        model, g = gguf.load_gguf_model(path)
        try:
            tok = gguf.read_tokenizer(g)
        except GptkitError as e:  # raised when the tokenizer is asked for, so --vocab can stand in
            tok = {"error": e}
        return Loaded(model, "gguf", path, tokenizer_spec=tok)
    if head == MODEL_MAGIC.to_bytes(4, "little"):
        config, sd = read_model(path)
        return Loaded(build_model(config, sd, str(path)), "llmc", path, chars=chars_beside(path, config.vocab_size),
                      tokenizer_dir=path.parent)
    raise GptkitError("not a model file", path,
                      "a single-file model must be an llm.c model .bin (magic 20240326) or a GGUF file (magic GGUF)")

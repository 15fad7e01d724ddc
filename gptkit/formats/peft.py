"""PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained(base, DIR)` reads (peft's `save_pretrained` layout): tensors
named `base_model.model.<HF module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
with the adapter name dropped, and a LoraConfig as JSON. GPT-2's HF layers are Conv1D, whose
weights are stored (in, out): PEFT then needs `fan_in_fan_out: true`; A and B themselves keep the
nn.Linear layout either way, so gptkit's adapters go out unchanged. gptkit's module paths are
HF's for GPT-2 (`transformer.h.N.attn.c_attn`); a Llama adapter on rows of gptkit's stacked q/k/v
or gate/up layer is PEFT's adapter on HF's separate layer (`model.layers.N.self_attn.q_proj`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from gptkit.errors import GptkitError, make_dir
from gptkit.lora import LoraSpec, family_of

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FAN_IN_FAN_OUT = {"gpt2": True, "llama": False}  # HF GPT-2's Conv1D keeps (in, out)


def hf_module_path(path: str, target: str, family: str) -> str:
    """gptkit module path + LoRA target -> the HF module path PEFT names the adapter by."""
    if family == "gpt2":
        return path
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(attn|mlp)\.\w+", path)
    if family != "llama" or m is None:
        raise GptkitError(f"no PEFT name for the adapter on {path} ({family})", "--to peft",
                          "export the merged model with --to hf instead")
    return f"model.layers.{m.group(1)}.{'self_attn' if m.group(2) == 'attn' else 'mlp'}.{target}"


def write_peft(model, adapters: dict, spec: LoraSpec, base: str, dst: Path) -> list[Path]:
    """Write a LoRA run's adapters (`{"<module path>.lora_A|lora_B.<target>": tensor}`) for PEFT."""
    family = family_of(model)
    tensors = {}
    for key, t in adapters.items():
        path, ab, target = key.rsplit(".", 2)
        tensors[f"{PREFIX}{hf_module_path(path, target, family)}.{ab}.weight"] = t.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "fan_in_fan_out": FAN_IN_FAN_OUT.get(family, False),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    make_dir(dst, "DST")
    save_file(tensors, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [dst / CONFIG_FILE, dst / WEIGHTS_FILE]

"""transformers' model of a gptkit config, for the `--compare hf` benchmarks: GPT2LMHeadModel for the
GPT-2 family, LlamaForCausalLM for the Llama family, built from the config.json that
`formats.hf.config_to_hf` writes (so the shape is the one `gptkit convert --to hf` exports)."""

from __future__ import annotations

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.formats.hf import config_to_hf, state_dict_to_hf


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise GptkitError("transformers is not installed", "--compare hf", "pip install transformers") from None
    return transformers


def hf_model_for(config: GPTConfig):
    """A randomly initialised transformers model of `config`'s shape (dropout off)."""
    transformers = transformers_module()
    d = {k: v for k, v in config_to_hf(config).items() if k != "architectures"}
    if config.family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**d))
    d.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**d))


def hf_model_from(model):
    """A transformers model holding the same weights as the gptkit GPT `model`, in eval mode."""
    hf = hf_model_for(model.config)
    sd = state_dict_to_hf(model.state_dict(), model.config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    tied = model.config.family != "llama" or model.config.tie_embeddings
    if unexpected or any(not (tied and k.endswith("lm_head.weight")) for k in missing):
        raise RuntimeError(f"weights that don't fit the transformers model: missing {missing}, unexpected {unexpected}")
    if tied:
        hf.tie_weights()
    return hf.eval()

"""GGUF, llama.cpp's single-file model format: read and write, for the GPT-2 and Llama families.

All format and quantisation code is the `gguf` package's (the llama.cpp project's own Python
writer, reader and quants); nothing here parses bytes. The mapping follows llama.cpp's
convert_hf_to_gguf.py for the same architecture, so what we write llama.cpp loads and what
llama.cpp's converter wrote we read:
- written tensors go through Hugging Face's names (formats/hf.py does the gptkit -> HF step), then
  to llama.cpp's (`token_embd`, `blk.N.attn_qkv`, ...), as convert_hf_to_gguf maps them. GPT-2's four Conv1D weights are
  transposed to (out, in); GPT-2 also carries `output.weight`, a copy of the tied embedding.
  Llama's q and k rows are permuted into llama.cpp's rotary layout (and back when read);
- metadata keys are `gguf.Keys`' spellings; the tokenizer is llama.cpp's `gpt2` byte-level BPE
  (tokens in GPT-2's byte alphabet, merges, token types, bos/eos, the pre-tokenizer's name).
Reading allocates the model once and dequantizes each tensor (`gguf.quants.dequantize`, from the
memory-mapped file, in row chunks) straight into its parameter, so peak memory stays near the float
model's size: llama.cpp's (out, in) layout is nn.Linear's, and Llama's q/k/v and gate/up are copied
into their rows of gptkit's stacked c_attn and c_fc. The tokenizer is rebuilt from the metadata with the
`tokenizers` library, as transformers' GGUF loader builds it (integrations/gguf), so both encode alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.formats import hf
from gptkit.hf_tokenizer import bytes_to_unicode
from gptkit.model import GPT, rope_inv_freq

MAGIC = b"GGUF"
EXPORT_DTYPES = ("f32", "f16", "q8_0")
# the tensor types read (the common quantisations of llama.cpp / Ollama downloads)
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# GPT-2's Conv1D weights, stored (in, out) by HF, (out, in) by llama.cpp (convert_hf_to_gguf transposes them)
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2's pre-tokenisation regex, the one tokenizers' ByteLevel(use_regex=True) applies
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names read: GPT-2's regex (ByteLevel's own), or Llama 3's split. GPT-2's
# is "gpt-2" (llama.cpp's llama-vocab.cpp and convert_hf_to_gguf); "gpt2", which llama.cpp refuses,
# is still read: gptkit wrote it before 2026-12-01
PRE_TOKENIZERS = {"gpt-2": None, "gpt2": None, "smollm": None, "llama-bpe": LLAMA3_SPLIT}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptkitError("the gguf package is not installed", "gguf",
                          "pip install 'gptkit[gguf]' (or pip install gguf)") from None
    return gguf


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# ------------------------------------------------------------------------------------------------
# names: HF <-> GGUF, per architecture

def _gpt2_names(n_layer: int) -> dict[str, str]:
    """HF GPT2LMHeadModel name -> llama.cpp name (convert_hf_to_gguf's GPT2Model)."""
    out = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
           "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(n_layer):
        for ours, theirs in parts.items():
            for s in ("weight", "bias"):
                out[f"transformer.h.{i}.{ours}.{s}"] = f"blk.{i}.{theirs}.{s}"
    return out


def _llama_names(n_layer: int) -> dict[str, str]:
    """HF LlamaForCausalLM name -> llama.cpp name (convert_hf_to_gguf's LlamaModel)."""
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(n_layer):
        for ours, theirs in parts.items():
            for s in ("weight", "bias"):
                out[f"model.layers.{i}.{ours}.{s}"] = f"blk.{i}.{theirs}.{s}"
    return out


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# write

def _quantize(gguf, name: str, t: torch.Tensor, dtype: str):
    """(array, raw type) as convert_hf_to_gguf stores a tensor: 1-D tensors (norms, biases) stay
    F32; a row that Q8_0's 32-wide blocks do not divide falls back to F16, as llama.cpp's does."""
    QT = gguf.GGMLQuantizationType
    a = t.detach().to(torch.float32).cpu().numpy()
    if dtype == "f32" or a.ndim == 1:
        return a, QT.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(a, QT.Q8_0), QT.Q8_0
        except gguf.QuantError:
            pass
    return a.astype(np.float16), QT.F16


def _hf_tensors_to_gguf(config: GPTConfig, tensors: dict[str, torch.Tensor]):
    """(GGUF name, float tensor) in llama.cpp's layout, from HF-named tensors."""
    if config.family == "gpt2":
        names = _gpt2_names(config.n_layer)
        for k, v in tensors.items():
            yield names[k], v.t() if k.endswith(GPT2_TRANSPOSED) else v
            if k == "transformer.wte.weight":  # llama.cpp's GPT-2 graph reads a separate output head
                yield "output.weight", v
        return
    names = _llama_names(config.n_layer)
    for k, v in tensors.items():
        if ".self_attn.q_proj." in k:
            v = _rope_permute(v, config.n_head)
        elif ".self_attn.k_proj." in k:
            v = _rope_permute(v, config.kv_heads)
        yield names[k], v


def _write_params(w, gguf, config: GPTConfig, dtype: str) -> None:
    """The architecture's metadata, as convert_hf_to_gguf's set_gguf_parameters writes it."""
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_block_count(config.n_layer)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_head_count(config.n_head)
    if config.family == "gpt2":
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_feed_forward_length(config.mlp_size)
        w.add_head_count_kv(config.kv_heads)
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_rope_freq_base(config.rope_theta)
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(config.head_size)
        if config.head_size != config.n_embd // config.n_head:
            w.add_key_length(config.head_size)
            w.add_value_length(config.head_size)
        rope = config.rope
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope and rope["rope_type"] != "llama3":  # llama3 travels as the rope_freqs tensor
            raise GptkitError(f"RoPE scaling {rope['rope_type']!r} has no GGUF form", "--to gguf",
                              "llama.cpp reads plain, linear and llama3 RoPE from GGUF")
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_freq_factors(config: GPTConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs tensor (hs/2,): what each plain RoPE frequency is divided by under
    Llama 3.1's scaling (convert_hf_to_gguf's LlamaModel writes it instead of the scaling keys)."""
    return rope_inv_freq(config.replace(rope_scaling="")) / rope_inv_freq(config)


def llama3_rope_from_factors(config: GPTConfig, factors: torch.Tensor, where) -> dict:
    """The llama3 rope_scaling that gives these rope_freqs factors. Only the ratios of
    original_max_position_embeddings to low/high_freq_factor matter, so it is fixed at 8192
    (Llama 3's) and the two factors are fitted on the ramp; the result is checked factor by factor."""
    n0 = 8192
    x = (rope_inv_freq(config.replace(rope_scaling="")) / (2 * math.pi)).double()  # 1 / wavelength
    f = factors.double()
    factor = float(f.max())
    ramp = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if int(ramp.sum()) >= 2:  # smooth = (n0 x - lo) / (hi - lo): a line in x
        smooth = (1 / f[ramp] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(x[ramp].numpy(), smooth.numpy(), 1)
        lo, hi = -b * n0 / a, (1 - b) * n0 / a
    else:  # no ramp: any edges between the last slowed and the first kept frequency
        x_slow, x_fast = float(x[f >= factor * (1 - 1e-6)].max()), float(x[f <= 1 + 1e-6].min())
        lo, hi = n0 * (2 * x_slow + x_fast) / 3, n0 * (x_slow + 2 * x_fast) / 3
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(lo), "high_freq_factor": float(hi),
            "original_max_position_embeddings": n0}
    got = rope_freq_factors(config.replace(rope_scaling=rope)).double()
    if not torch.allclose(got, f, rtol=1e-4, atol=0):
        raise GptkitError("the rope_freqs tensor is not Llama 3.1's RoPE scaling", where,
                          "gptkit reads llama3-style rope_freqs only")
    return rope


def write_gguf(path: Path, model, dtype: str = "f32", tokenizer: dict | None = None, name: str = "") -> Path:
    """Write `model` (either family) as a GGUF file llama.cpp loads, weights in `dtype` (f32, f16,
    q8_0), with `tokenizer` (gguf_tokenizer_metadata's dict) if given."""
    gguf = _gguf()
    if dtype not in EXPORT_DTYPES:
        raise GptkitError(f"unsupported GGUF dtype {dtype!r}", "--dtype", f"use one of {', '.join(EXPORT_DTYPES)}")
    config = model.config
    path = Path(path)
    arch = "gpt2" if config.family == "gpt2" else "llama"
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    if name:
        w.add_name(name)
    _write_params(w, gguf, config, dtype)
    _write_tokenizer(w, gguf, tokenizer or {"model": "no_vocab"})  # llama.cpp needs the key, even for none
    for gname, t in _hf_tensors_to_gguf(config, hf.state_dict_to_hf(model.state_dict(), config)):
        a, qt = _quantize(gguf, gname, t, dtype)
        w.add_tensor(gname, a, raw_dtype=qt)
    if config.rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_freq_factors(config).numpy())
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(path)
    return path


def _write_tokenizer(w, gguf, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])
    if tok["model"] == "no_vocab":
        return
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_types"])
    if tok.get("scores"):
        w.add_token_scores(tok["scores"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
        if tok.get(key) is not None:
            add(tok[key])
    w.add_add_bos_token(bool(tok.get("add_bos")))
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


def tokenizer_metadata(spec: dict, vocab_size: int, bos: int | None, eos: int | None, add_bos: bool = False,
                       chat_template: str | None = None, where: str = "tokenizer") -> dict:
    """The GGUF tokenizer metadata (llama.cpp's `gpt2` model) of a byte-level BPE tokenizer.json
    `spec`: tokens in id order padded with [PADi] to the model's vocab, merges, token types
    (special added tokens CONTROL, other added tokens USER_DEFINED), and the pre-tokenizer's name."""
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_metadata(spec, vocab_size, bos, eos, add_bos, chat_template)
    pre = _pre_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise GptkitError("the tokenizer is not a byte-level BPE with GPT-2's or Llama 3's pre-tokenizer", where,
                          "gptkit writes GGUF tokenizers of llama.cpp's gpt2 kind (pre gpt2 or llama-bpe)")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: 1 for i in tokens}  # NORMAL
    for a in spec.get("added_tokens") or ():
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4  # CONTROL, USER_DEFINED
    n = max(vocab_size, max(tokens) + 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    return {"model": "gpt2", "pre": pre, "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(n)],
            "token_types": [types.get(i, 5) for i in range(n)],  # 5 = UNUSED
            "merges": merges, "bos": bos, "eos": eos, "add_bos": add_bos, "chat_template": chat_template}


def _sentencepiece_metadata(spec: dict, vocab_size: int, bos: int | None, eos: int | None, add_bos: bool,
                            chat_template: str | None) -> dict:
    """llama.cpp's `llama` tokenizer (SentencePiece BPE with byte fallback: Llama 2, TinyLlama) from a
    tokenizer.json: tokens in id order, <0xNN> tokens BYTE, the merges, and scores that rank each
    token by the merge that makes it (llama.cpp's SentencePiece tokenizer merges by score)."""
    model = spec["model"]
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    made_by = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
    types = {i: 6 if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else 1 for i, t in tokens.items()}
    if model.get("unk_token") in model["vocab"]:
        types[model["vocab"][model["unk_token"]]] = 2  # UNKNOWN
    for a in spec.get("added_tokens") or ():
        tokens[a["id"]] = a["content"]
        types[a["id"]] = (2 if a["content"] == model.get("unk_token") else 3) if a.get("special") else 4
    n = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, f"[PAD{i}]") for i in range(n)]
    return {"model": "llama", "tokens": names, "token_types": [types.get(i, 5) for i in range(n)],
            "scores": [-float(made_by[t] + 1) if types.get(i) == 1 and t in made_by else 0.0
                       for i, t in enumerate(names)],
            "merges": merges, "bos": bos, "eos": eos, "add_bos": add_bos, "chat_template": chat_template,
            "unk": next((i for i in range(n) if types.get(i) == 2), None)}


def _pre_name(pre: Any) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: ByteLevel with its own regex is GPT-2's;
    Split(Llama 3's regex) + ByteLevel without regex is `llama-bpe`."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    subs = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if subs and len(subs) == 2 and subs[0].get("type") == "Split" and subs[1].get("type") == "ByteLevel":
        if (subs[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT and not subs[1].get("use_regex", True):
            return "llama-bpe"
    return None


# ------------------------------------------------------------------------------------------------
# read

def _field(reader, key: str, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    return f.contents()


class GGUFFile:
    """An open GGUF file: its metadata, architecture and tensors (memory-mapped, read on demand)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head != MAGIC:
            raise GptkitError(f"not a GGUF file: magic {head!r}, expected {MAGIC!r}", self.path,
                              "give a .gguf file written by llama.cpp, Ollama or gptkit")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged file
            raise GptkitError(f"cannot read the GGUF file ({type(e).__name__}: {e})", self.path,
                              "the file is truncated or damaged; download or export it again") from None
        self.arch = _field(self.reader, "general.architecture")
        if self.arch not in ("gpt2", "llama"):
            raise GptkitError(f"GGUF architecture {self.arch!r} is not one gptkit implements", self.path,
                              "gptkit reads the gpt2 and llama architectures")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        return _field(self.reader, f"{key}".replace("{arch}", self.arch), default)

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise GptkitError(f"metadata key {key.replace('{arch}', self.arch)!r} is missing", self.path,
                              "the file is incomplete")
        return v

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of tensor `name` (numpy's layout, which is torch's: (out, in) for a
        weight), dequantized to float32 by gguf's own dequantizer."""
        gguf = _gguf()
        t = self.tensors[name]
        qt = gguf.GGMLQuantizationType(t.tensor_type)
        if qt.name not in READ_TYPES:
            raise GptkitError(f"tensor {name} has type {qt.name}, which gptkit does not read", self.path,
                              f"gptkit reads {', '.join(READ_TYPES)}; requantize with llama-quantize")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
        data = t.data.reshape(shape[0], -1) if len(shape) > 1 else t.data
        try:
            a = data[start:stop]
            a = np.asarray(a) if qt.name in ("F32", "F16") else gguf.quants.dequantize(a, qt)
        except Exception as e:
            raise GptkitError(f"cannot dequantize tensor {name} ({qt.name}): {e}", self.path,
                              "the file is damaged") from None
        # a copy: the file stays mapped read-only
        return torch.from_numpy(np.array(a, dtype=np.float32).reshape(-1, *shape[1:]))

    def rows(self, name: str) -> int:
        return int(self.tensors[name].shape.tolist()[-1])


def _hf_config(g: GGUFFile, vocab_size: int) -> dict:
    """An HF config.json dict from the GGUF metadata (transformers' GGUF config mapping)."""
    a = "{arch}."
    if g.arch == "gpt2":
        n_embd = g.need(a + "embedding_length")
        ff = g.get(a + "feed_forward_length", 4 * n_embd)
        return {"model_type": "gpt2", "n_layer": g.need(a + "block_count"), "n_head": g.need(a + "attention.head_count"),
                "n_embd": n_embd, "n_positions": g.need(a + "context_length"), "vocab_size": vocab_size,
                "n_inner": ff, "layer_norm_epsilon": g.get(a + "attention.layer_norm_epsilon", 1e-5)}
    n_embd, n_head = g.need(a + "embedding_length"), g.need(a + "attention.head_count")
    head_dim = g.get(a + "attention.key_length") or g.get(a + "rope.dimension_count") or n_embd // n_head
    rope_scaling = None
    if g.get(a + "rope.scaling.type") not in (None, "none"):
        if g.get(a + "rope.scaling.type") != "linear":
            raise GptkitError(f"RoPE scaling {g.get(a + 'rope.scaling.type')!r} is not read from GGUF", g.path,
                              "gptkit reads plain and linear-scaled RoPE from GGUF")
        rope_scaling = {"rope_type": "linear", "factor": float(g.need(a + "rope.scaling.factor"))}
    return {"model_type": "llama", "hidden_size": n_embd, "num_hidden_layers": g.need(a + "block_count"),
            "num_attention_heads": n_head, "num_key_value_heads": g.get(a + "attention.head_count_kv", n_head),
            "head_dim": head_dim, "intermediate_size": g.need(a + "feed_forward_length"),
            "max_position_embeddings": g.need(a + "context_length"), "vocab_size": vocab_size,
            "rms_norm_eps": float(g.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(g.get(a + "rope.freq_base", 10000.0)), "rope_scaling": rope_scaling,
            "tie_word_embeddings": "output.weight" not in g.tensors,
            "attention_bias": "blk.0.attn_q.bias" in g.tensors, "mlp_bias": "blk.0.ffn_up.bias" in g.tensors}


def _gptkit_plan(g: GGUFFile, config: GPTConfig) -> dict[str, list[str]]:
    """gptkit parameter name -> the GGUF tensors stacked along dim 0 into it. llama.cpp keeps
    weights (out, in) like nn.Linear, so GPT-2's map one to one; Llama's q/k/v and gate/up are
    stacked into c_attn and c_fc (formats/hf.py's LLAMA_KEYS gives the order)."""
    if config.family == "gpt2":
        plan = {k: [v] for k, v in _gpt2_names(config.n_layer).items()}
        plan["lm_head.weight"] = []  # tied to wte
        return plan
    names = _llama_names(config.n_layer)
    plan = {"transformer.wte.weight": ["token_embd.weight"], "transformer.ln_f.weight": ["output_norm.weight"],
            "lm_head.weight": [] if config.tie_embeddings else ["output.weight"]}
    for i in range(config.n_layer):
        for ours, theirs in hf.LLAMA_KEYS.items():
            for s in ("weight", "bias"):
                plan[f"transformer.h.{i}.{ours}.{s}"] = [names[f"model.layers.{i}.{t}.{s}"] for t in theirs]
    return plan


CHUNK_ROWS = 4096  # rows dequantized at a time: the transient buffer stays small beside the model


def _copy_into(g: GGUFFile, gname: str, config: GPTConfig, dst: torch.Tensor) -> None:
    """Tensor gname dequantized into dst (same shape): in row chunks, or whole for the q/k
    weights whose rows llama.cpp's rotary order interleaves."""
    n = g.rows(gname)
    if ".attn_q." in gname or ".attn_k." in gname:
        t = _rope_unpermute(g.tensor(gname), config.n_head if ".attn_q." in gname else config.kv_heads)
        dst.copy_(t.reshape(dst.shape))
        return
    for i in range(0, n, CHUNK_ROWS):
        dst[i:i + CHUNK_ROWS].copy_(g.tensor(gname, i, i + CHUNK_ROWS).reshape(dst[i:i + CHUNK_ROWS].shape))


def load_gguf_model(path: Path):
    """(GPT in fp32 on the CPU, the open GGUFFile) of a GGUF model of either family. The model is
    allocated once and each tensor is dequantized straight into its place, one at a time, so
    peak memory stays near the float model's size (plus the largest tensor)."""
    g = GGUFFile(path)
    if "token_embd.weight" not in g.tensors:
        raise GptkitError("no token_embd.weight tensor", g.path, "the file is incomplete")
    vocab_size = int(g.tensors["token_embd.weight"].shape.tolist()[-1])  # ggml lists (C, V)
    try:
        config = hf.config_from_hf(_hf_config(g, vocab_size), str(g.path))
    except GptkitError as e:
        raise GptkitError(e.what, g.path, e.hint) from None
    if config.family == "llama" and "rope_freqs.weight" in g.tensors:
        if config.rope:
            raise GptkitError("the file has both RoPE scaling keys and a rope_freqs tensor", g.path,
                              "the file is inconsistent")
        factors = g.tensor("rope_freqs.weight").reshape(-1)
        config = config.replace(rope_scaling=llama3_rope_from_factors(config, factors, g.path))
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie after to_empty (one buffer, not two)
    params = dict(model.named_parameters())
    plan = _gptkit_plan(g, config)
    used = {"output.weight"} if config.family == "gpt2" else {"rope_freqs.weight"}  # GPT-2's tied head copy
    with torch.no_grad():
        for ours, p in params.items():
            sources = plan.get(ours)
            if sources is None or any(s not in g.tensors for s in sources):
                missing = ours if sources is None else next(s for s in sources if s not in g.tensors)
                raise GptkitError(f"tensor {missing} is missing", g.path,
                                  f"the file does not hold a complete {g.arch} model")
            row = 0
            for s in sources:
                shape = tuple(int(d) for d in reversed(g.tensors[s].shape.tolist()))
                if shape[1:] != tuple(p.shape[1:]) or row + shape[0] > p.shape[0]:
                    raise GptkitError(f"tensor {s} has shape {shape}, the metadata needs {tuple(p.shape)}",
                                      g.path, "the metadata and the tensors disagree")
                _copy_into(g, s, config, p[row:row + shape[0]])
                row += shape[0]
                used.add(s)
            if sources and row != p.shape[0]:
                if ours not in ("transformer.wte.weight", "lm_head.weight"):
                    raise GptkitError(f"tensor(s) {', '.join(sources)} fill {row} rows of {ours}'s {p.shape[0]}",
                                      g.path, "the metadata and the tensors disagree")
                p[row:].zero_()  # the padded vocab rows (llm.c's Vp)
    extra = sorted(set(g.tensors) - used)
    if extra:
        raise GptkitError(f"unexpected tensor(s) {', '.join(extra[:3])} for architecture {g.arch}", g.path,
                          "the file holds tensors gptkit's model does not have")
    model.reset_rope()  # derived tables, not in the file
    return model.eval(), g


# ------------------------------------------------------------------------------------------------
# the tokenizer, from the metadata


def read_tokenizer(g: GGUFFile) -> dict | None:
    """The file's tokenizer as {"json": tokenizer.json text, "config": tokenizer_config-style dict
    (bos/eos token text, add_bos_token), "chat_template": str | None}, or None when the file has none.

    Built with `tokenizers` as transformers' GGUF loader builds it: llama.cpp's `gpt2` model is a
    byte-level BPE (tokens outside GPT-2's byte alphabet respelled as their UTF-8 bytes), CONTROL
    tokens special, USER_DEFINED ones added whole; the `pre` name picks the pre-tokenizer."""
    kind = g.get("tokenizer.ggml.model")
    if kind in (None, "no_vocab", "none"):
        return None
    if kind not in ("gpt2", "llama"):
        raise GptkitError(f"GGUF tokenizer model {kind!r} is not read", g.path,
                          "gptkit reads llama.cpp's gpt2 (byte-level BPE) and llama (SentencePiece BPE) "
                          "tokenizers; give --vocab tokenizer.json")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "llama":
        tk = _sentencepiece_bpe(g, tokens)
        cfg = _special_config(g, tokens, add_bos_default=True)
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3])
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])
        return {"json": tk.to_str(), "config": cfg, "chat_template": g.get("tokenizer.chat_template")}
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GptkitError(f"GGUF pre-tokenizer {pre!r} is not read", g.path,
                          f"gptkit reads {', '.join(PRE_TOKENIZERS)}; give --vocab tokenizer.json")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges") or ()]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and set(t) <= alphabet]  # a CONTROL token outside the alphabet is a mislabel
    tk.add_special_tokens(control)
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                   if ty == 4 and t in vocab])
    return {"json": tk.to_str(), "config": _special_config(g, tokens, add_bos_default=False),
            "chat_template": g.get("tokenizer.chat_template")}


def _special_config(g: GGUFFile, tokens: list[str], add_bos_default: bool) -> dict[str, Any]:
    """tokenizer_config-style specials: bos/eos/unk/pad text and add_bos_token (transformers adds
    bos to a SentencePiece vocabulary whose file does not say, as llama.cpp does)."""
    cfg: dict[str, Any] = {"add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                           "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False))}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = g.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            cfg[name] = tokens[int(i)]
    return cfg


def _sentencepiece_bpe(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    """llama.cpp's `llama` model (Llama 2, TinyLlama): a SentencePiece BPE with byte fallback, as
    transformers' LlamaTokenizer holds it (Metaspace with the space prepended to the first word).
    Files without merges get them from the scores: each token's splits into two known pieces,
    best score first (transformers' generate_merges order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges") or ()]
    if not merges:
        scores = list(g.need("tokenizer.ggml.scores"))
        found = []
        for t, score in zip(tokens, scores):
            pairs = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
            found += [(a, b, score) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
        found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
        merges = [(a, b) for a, b, _ in found]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    return tk

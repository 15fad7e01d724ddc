"""llm.c's binary files: model weights, tokenizer and debug state. Read and write, side by side.

Every file starts with a header of 256 little-endian int32s (1024 bytes); unused slots are zero.
The layouts follow llm.c's train_gpt2.py (`write_model`, `write_tokenizer`, `write_state`), which
its C/CUDA trainers and `test_gpt2` read:

- model (magic 20240326): version 3 = fp32, 5 = bf16. Header slots 2..7 = maxT, V, L, NH, C, Vp.
  Body: the 16 tensors of MODEL_ORDER, each stacked over layers, in nn.Linear (out, in) layout;
  wte has Vp rows, the padding rows zero. Size = 1024 + params * dtype size.
- tokenizer (magic 20240328): version 1 (EOT implied 50256) or 2 (slot 3 = EOT id); slot 2 = the
  number of tokens. Body: for each id, a uint8 length then that many bytes.
- token shard (llm.c dev/data/data_common.py): slot 2 = the number of tokens. GPT-2's layout
  (magic 20240520, version 1): the tokens as uint16, size = 1024 + 2 * ntok; Llama 3's (magic
  20240801, version 7), for vocabularies over 65,536: uint32, size = 1024 + 4 * ntok. Written and
  read by gptkit/data.py.
- debug state (magic 20240327, version 2): slots 2, 3 = B, T. Body: x, y (int32 B*T), logits
  (fp32 B*T*V over the unpadded V), loss (fp32), then the gradients as fp32 in MODEL_ORDER with
  wte's padded to Vp. The file does not carry the model's shape: reading it needs the config.

Tensors are read and written bit for bit, so writing what was read reproduces the file exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptkit.config import GPT2_EOT, GPTConfig
from gptkit.errors import GptkitError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MODEL_MAGIC, TOKENIZER_MAGIC, STATE_MAGIC = 20240326, 20240328, 20240327
MODEL_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
TOKENIZER_VERSIONS = (1, 2)
STATE_VERSION = 2
SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # uint16 token ids (llm.c's "gpt-2" shards)
SHARD32_MAGIC, SHARD32_VERSION = 20240801, 7  # uint32 token ids (llm.c's "llama-3" shards)
SHARD_LAYOUTS = {SHARD_MAGIC: (SHARD_VERSION, "<u2"), SHARD32_MAGIC: (SHARD32_VERSION, "<u4")}
MAX_SHARD_TOKEN = 65535  # the largest id of a uint16 shard; larger vocabularies get uint32 shards

# llm.c's parameter order: (short name, gptkit name with {i} for per-layer tensors)
MODEL_ORDER = (
    ("wte", "transformer.wte.weight"),
    ("wpe", "transformer.wpe.weight"),
    ("ln1w", "transformer.h.{i}.ln_1.weight"),
    ("ln1b", "transformer.h.{i}.ln_1.bias"),
    ("qkvw", "transformer.h.{i}.attn.c_attn.weight"),
    ("qkvb", "transformer.h.{i}.attn.c_attn.bias"),
    ("attprojw", "transformer.h.{i}.attn.c_proj.weight"),
    ("attprojb", "transformer.h.{i}.attn.c_proj.bias"),
    ("ln2w", "transformer.h.{i}.ln_2.weight"),
    ("ln2b", "transformer.h.{i}.ln_2.bias"),
    ("fcw", "transformer.h.{i}.mlp.c_fc.weight"),
    ("fcb", "transformer.h.{i}.mlp.c_fc.bias"),
    ("fcprojw", "transformer.h.{i}.mlp.c_proj.weight"),
    ("fcprojb", "transformer.h.{i}.mlp.c_proj.bias"),
    ("lnfw", "transformer.ln_f.weight"),
    ("lnfb", "transformer.ln_f.bias"),
)


def param_shapes(config: GPTConfig, padded_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of one layer's (or the model's) tensor for each short name of MODEL_ORDER."""
    C, Vp = config.n_embd, padded_vocab or config.padded_vocab_size
    return {
        "wte": (Vp, C), "wpe": (config.block_size, C),
        "ln1w": (C,), "ln1b": (C,), "qkvw": (3 * C, C), "qkvb": (3 * C,),
        "attprojw": (C, C), "attprojb": (C,), "ln2w": (C,), "ln2b": (C,),
        "fcw": (4 * C, C), "fcb": (4 * C,), "fcprojw": (C, 4 * C), "fcprojb": (C,),
        "lnfw": (C,), "lnfb": (C,),
    }


def num_file_params(config: GPTConfig, padded_vocab: int | None = None) -> int:
    """Parameters stored in a model file (wte counted with its padding rows)."""
    n = 0
    for short, name in MODEL_ORDER:
        k = int(np.prod(param_shapes(config, padded_vocab)[short]))
        n += k * config.n_layer if "{i}" in name else k
    return n


# ---------------------------------------------------------------------------------------------
# headers
def _make_header(*values: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[: len(values)] = values
    return h.tobytes()


def read_header_bytes(path: str | Path, what: str) -> tuple[bytes, int]:
    """The first HEADER_BYTES of an llm.c file (fewer if it is shorter) and the file's size.
    Shared by every llm.c format here and by the token shards (gptkit/data.py)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return f.read(HEADER_BYTES), size
    except OSError as e:
        raise GptkitError(f"cannot read {what}: {e.strerror}", path, "check the path and its permissions") from None


def _read_header(path: Path, magic: int, what: str) -> tuple[np.ndarray, int]:
    """The header as int32s and the file's size; checks the magic number."""
    raw, size = read_header_bytes(path, what)
    if len(raw) < HEADER_BYTES:
        raise GptkitError(f"truncated {what}: {len(raw)} bytes, the header alone needs {HEADER_BYTES}", path,
                          "the file is damaged or incomplete; write it again")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != magic:
        raise GptkitError(f"bad magic number {int(header[0])}, expected {magic} for an llm.c {what}", path,
                          "is this the right kind of file?")
    return header, size


def _check_size(path: Path, size: int, expected: int, what: str) -> None:
    if size != expected:
        kind = "truncated" if size < expected else "oversized"
        raise GptkitError(f"{kind} {what}: {size} bytes, its header implies {expected}", path,
                          "the file is damaged, incomplete or was written for another model; write it again")


# ---------------------------------------------------------------------------------------------
# model .bin
def _raw_dtype(dtype: torch.dtype) -> tuple[str, torch.dtype]:
    # bf16 has no numpy dtype: move its bits as int16 and reinterpret them in torch
    return ("<i2", torch.int16) if dtype == torch.bfloat16 else ("<f4", torch.float32)


def _tensor_from_bytes(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    npdt, view = _raw_dtype(dtype)
    arr = np.frombuffer(buf, dtype=npdt).copy()
    t = torch.from_numpy(arr)
    if view == torch.int16:
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


def _tensor_to_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    t = t.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype("<f4").tobytes()


def stack_param(sd: dict[str, torch.Tensor], config: GPTConfig, short: str, name: str) -> torch.Tensor:
    """One entry of MODEL_ORDER as the file stores it: stacked over layers, wte padded to Vp."""
    if "{i}" not in name:
        t = sd[name]
        if short == "wte" and t.shape[0] != config.padded_vocab_size:  # pad the vocab to Vp with zeros
            padded = t.new_zeros(config.padded_vocab_size, t.shape[1])
            n = min(t.shape[0], config.padded_vocab_size)
            padded[:n] = t[:n]
            t = padded
        return t
    return torch.stack([sd[name.format(i=i)] for i in range(config.n_layer)])


def write_params(f, sd: dict[str, torch.Tensor], config: GPTConfig, dtype: torch.dtype) -> None:
    """The 16 tensors of MODEL_ORDER from a gptkit state dict (or gradients keyed the same way)."""
    for short, name in MODEL_ORDER:
        f.write(_tensor_to_bytes(stack_param(sd, config, short, name), dtype))


def read_params(buf: memoryview, config: GPTConfig, dtype: torch.dtype,
                padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """Inverse of write_params: a gptkit state dict (without lm_head) from the file's body."""
    shapes = param_shapes(config, padded_vocab)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    out, pos = {}, 0
    for short, name in MODEL_ORDER:
        layers = config.n_layer if "{i}" in name else 1
        shape = ((layers,) if layers > 1 or "{i}" in name else ()) + shapes[short]
        nbytes = int(np.prod(shape)) * itemsize
        t = _tensor_from_bytes(buf[pos: pos + nbytes], dtype, shape)
        pos += nbytes
        if "{i}" in name:
            for i in range(config.n_layer):
                out[name.format(i=i)] = t[i].clone()
        else:
            out[name] = t
    return out


def write_model(path: str | Path, state_dict: dict[str, torch.Tensor], config: GPTConfig,
                dtype: torch.dtype = torch.float32) -> None:
    """Write a model .bin: version 3 for fp32, 5 for bf16."""
    version = {v: k for k, v in MODEL_VERSIONS.items()}.get(dtype)
    if version is None:
        raise GptkitError(f"llm.c model files hold fp32 or bf16, not {dtype}", "dtype",
                          "use --to llmc (fp32) or --to llmc-bf16")
    path = Path(path)
    with open(path, "wb") as f:
        f.write(_make_header(MODEL_MAGIC, version, config.block_size, config.vocab_size, config.n_layer,
                             config.n_head, config.n_embd, config.padded_vocab_size))
        write_params(f, state_dict, config, dtype)


def read_model_header(path: str | Path) -> tuple[GPTConfig, int, int]:
    """(config, version, Vp as the file stores it), after checking magic, version and size."""
    path = Path(path)
    header, size = _read_header(path, MODEL_MAGIC, "model file")
    version = int(header[1])
    if version not in MODEL_VERSIONS:
        raise GptkitError(f"unsupported model file version {version}", path,
                          "gptkit reads versions 3 (fp32) and 5 (bf16); re-export it with llm.c's train_gpt2.py")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    if min(maxT, V, L, NH, C, Vp) <= 0 or Vp < V:
        raise GptkitError(f"bad model header: maxT={maxT} V={V} L={L} NH={NH} C={C} Vp={Vp}", path,
                          "the file is damaged")
    try:
        config = GPTConfig(block_size=maxT, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
    except GptkitError as e:
        raise GptkitError(f"bad model header: {e.what}", path, "the file is damaged") from None
    itemsize = 4 if version == 3 else 2
    _check_size(path, size, HEADER_BYTES + num_file_params(config, Vp) * itemsize, "model file")
    return config, version, Vp


def read_model(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, gptkit state dict) from a model .bin. The tensors keep the file's dtype
    (fp32 or bf16); lm_head.weight is wte (tied)."""
    path = Path(path)
    config, version, Vp = read_model_header(path)
    buf = memoryview(path.read_bytes())[HEADER_BYTES:]
    sd = read_params(buf, config, MODEL_VERSIONS[version], Vp)
    if Vp != config.padded_vocab_size:  # another padding than gptkit's: keep the real rows
        sd["transformer.wte.weight"] = stack_param({"w": sd["transformer.wte.weight"][: config.vocab_size]},
                                              config, "wte", "w")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return config, sd


# ---------------------------------------------------------------------------------------------
# tokenizer .bin
@dataclass
class LlmcTokenizer:
    """The token byte strings of a tokenizer .bin; `tokens[i]` is id i's bytes."""

    tokens: list[bytes]
    eot: int = GPT2_EOT
    version: int = 2


def write_tokenizer(path: str | Path, tok: LlmcTokenizer) -> None:
    path = Path(path)
    if tok.version not in TOKENIZER_VERSIONS:
        raise GptkitError(f"tokenizer file version {tok.version} does not exist", path, "use 1 or 2")
    if tok.version == 1 and tok.eot != GPT2_EOT:
        raise GptkitError(f"version 1 implies EOT {GPT2_EOT}, not {tok.eot}", path, "write version 2")
    values = [TOKENIZER_MAGIC, tok.version, len(tok.tokens)] + ([tok.eot] if tok.version == 2 else [])
    body = bytearray()
    for i, b in enumerate(tok.tokens):
        if not 0 < len(b) < 256:
            raise GptkitError(f"token {i} has {len(b)} bytes; llm.c needs 1..255", path,
                              "llm.c's tokenizer file cannot hold this vocabulary")
        body.append(len(b))
        body += b
    with open(path, "wb") as f:
        f.write(_make_header(*values))
        f.write(bytes(body))


def read_tokenizer(path: str | Path) -> LlmcTokenizer:
    path = Path(path)
    header, size = _read_header(path, TOKENIZER_MAGIC, "tokenizer file")
    version, n = int(header[1]), int(header[2])
    if version not in TOKENIZER_VERSIONS:
        raise GptkitError(f"unsupported tokenizer file version {version}", path,
                          "gptkit reads versions 1 and 2; re-export it with llm.c's train_gpt2.py")
    eot = int(header[3]) if version == 2 else GPT2_EOT
    if n <= 0 or (version == 2 and not 0 <= eot < n):
        raise GptkitError(f"bad tokenizer header: vocab size {n}, EOT {eot}", path, "the file is damaged")
    data = path.read_bytes()[HEADER_BYTES:]
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(data):
            raise GptkitError(f"truncated tokenizer file: ends at token {i} of {n}", path,
                              "the file is damaged or incomplete; write it again")
        length = data[pos]
        if length == 0 or pos + 1 + length > len(data):
            what = "zero-length token" if length == 0 else "truncated tokenizer file"
            raise GptkitError(f"{what} at id {i} of {n}", path, "the file is damaged or incomplete; write it again")
        tokens.append(bytes(data[pos + 1: pos + 1 + length]))
        pos += 1 + length
    if pos != len(data):
        raise GptkitError(f"oversized tokenizer file: {len(data) - pos} bytes after the last token", path,
                          "the file is damaged; write it again")
    return LlmcTokenizer(tokens, eot, version)


def char_tokenizer(chars: list[str]) -> LlmcTokenizer:
    """A char-level vocab as a tokenizer file. Char vocabs have no EOT token; llm.c starts its
    samples at the EOT id, so we point it at "\\n" (where nanoGPT's char samples start) or id 0."""
    eot = chars.index("\n") if "\n" in chars else 0
    return LlmcTokenizer([c.encode("utf-8") for c in chars], eot, 2)


def chars_beside(model_file: str | Path, vocab_size: int) -> list[str] | None:
    """The char vocab of a tokenizer.bin next to an llm.c model file, if it is a char vocab
    (one character per id, vocab_size ids); None otherwise (e.g. GPT-2's BPE)."""
    f = Path(model_file).parent / "tokenizer.bin"
    if vocab_size == GPT2_EOT + 1 or not f.is_file():
        return None
    tok = read_tokenizer(f)
    try:
        chars = [b.decode("utf-8") for b in tok.tokens]
    except UnicodeDecodeError:
        return None
    if len(chars) != vocab_size or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
        return None
    return chars


# ---------------------------------------------------------------------------------------------
# debug state
@dataclass
class DebugState:
    """llm.c's test_gpt2 reference: a batch and what the model computes on it.

    x, y (B, T) int64; logits (B, T, V) fp32; loss () fp32; grads: gptkit names -> fp32 tensors
    (wte's (Vp, C), lm_head not included)."""

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def write_state(path: str | Path, state: DebugState, config: GPTConfig) -> None:
    B, T = state.x.shape
    path = Path(path)
    with open(path, "wb") as f:
        f.write(_make_header(STATE_MAGIC, STATE_VERSION, B, T))
        f.write(state.x.detach().cpu().numpy().astype("<i4").tobytes())
        f.write(state.y.detach().cpu().numpy().astype("<i4").tobytes())
        f.write(_tensor_to_bytes(state.logits[..., : config.vocab_size], torch.float32))
        f.write(_tensor_to_bytes(state.loss.reshape(()), torch.float32))
        write_params(f, state.grads, config, torch.float32)


def read_state(path: str | Path, config: GPTConfig) -> DebugState:
    """Read a debug state written for a model of `config` (the file itself holds only B and T)."""
    path = Path(path)
    header, size = _read_header(path, STATE_MAGIC, "debug state")
    version, B, T = (int(v) for v in header[1:4])
    if version != STATE_VERSION:
        raise GptkitError(f"unsupported debug state version {version}", path,
                          f"gptkit reads version {STATE_VERSION} (llm.c since the padded vocab); "
                          "write it again with llm.c's train_gpt2.py")
    if B <= 0 or T <= 0:
        raise GptkitError(f"bad debug state header: B={B} T={T}", path, "the file is damaged")
    if T > config.block_size:
        raise GptkitError(f"debug state has T={T} > the model's block_size {config.block_size}", path,
                          "the state was written for another model")
    V, BT = config.vocab_size, B * T
    expected = HEADER_BYTES + 4 * (2 * BT + BT * V + 1 + num_file_params(config))
    _check_size(path, size, expected, f"debug state (for a model with V={V}, L={config.n_layer}, "
                                      f"C={config.n_embd}, maxT={config.block_size})")
    buf = memoryview(path.read_bytes())[HEADER_BYTES:]
    x = torch.from_numpy(np.frombuffer(buf[: 4 * BT], dtype="<i4").astype(np.int64)).view(B, T)
    y = torch.from_numpy(np.frombuffer(buf[4 * BT: 8 * BT], dtype="<i4").astype(np.int64)).view(B, T)
    pos = 8 * BT
    logits = _tensor_from_bytes(buf[pos: pos + 4 * BT * V], torch.float32, (B, T, V))
    pos += 4 * BT * V
    loss = _tensor_from_bytes(buf[pos: pos + 4], torch.float32, ())
    grads = read_params(buf[pos + 4:], config, torch.float32)
    for name, t in (("x", x), ("y", y)):
        if int(t.min()) < 0 or int(t.max()) >= V:
            raise GptkitError(f"debug state's {name} holds token ids outside [0, {V})", path,
                              "the state was written for another model")
    return DebugState(x, y, logits, loss, grads)

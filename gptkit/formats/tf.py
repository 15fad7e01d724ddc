"""OpenAI's original GPT-2 release: TensorFlow checkpoints, read without TensorFlow.

A release directory holds `hparams.json` ({n_vocab, n_ctx, n_embd, n_head, n_layer}),
`model.ckpt.index`, `model.ckpt.data-00000-of-00001` and the BPE files (`encoder.json`,
`vocab.bpe`). The two model.ckpt files are TensorFlow's "tensor bundle":

- the .index file is a LevelDB-style sorted table. Its 48-byte footer points at an index block,
  whose entries point at data blocks; each block is a run of prefix-compressed (key, value)
  entries followed by restart offsets, and a 5-byte trailer (compression type, crc) follows every
  block. The key "" holds a BundleHeaderProto (shard count, endianness); every other key is a
  variable name whose value is a BundleEntryProto (dtype, shape, shard, offset, size).
- the .data-XXXXX-of-YYYYY shards hold the raw tensor bytes at those offsets.

OpenAI's names and shapes: model/wte [V, C], model/wpe [maxT, C], model/h{i}/ln_1/{g,b} [C],
model/h{i}/attn/c_attn/{w [1, C, 3C], b}, attn/c_proj, mlp/c_fc, mlp/c_proj, model/ln_f/{g,b}.
Their 1x1-convolution weights [1, in, out] become nn.Linear's (out, in) by a transpose.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48
BLOCK_TRAILER_BYTES = 5
# TensorFlow DataType enum -> numpy dtype (the float types checkpoints use, plus ints)
TF_DTYPES = {1: "f4", 2: "f8", 3: "i4", 9: "i8", 19: "f2"}
TF_BFLOAT16 = 14

# OpenAI variable (under model/h{i}/ for layers) -> gptkit name, and whether it is a conv weight
LAYER_MAP = {
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}
TOP_MAP = {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
           "ln_f/g": "transformer.ln_f.weight", "ln_f/b": "transformer.ln_f.bias"}


# ---------------------------------------------------------------------------------------------
# protobuf wire format, just enough for BundleHeaderProto / BundleEntryProto
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message: field number -> values (ints, or bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            val, pos = bytes(buf[pos: pos + n]), pos + n
        elif wire == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(num, []).append(val)
    return out


# ---------------------------------------------------------------------------------------------
# the sorted table (.index)
def _block(data: bytes, offset: int, size: int) -> bytes:
    if offset + size + BLOCK_TRAILER_BYTES > len(data):
        raise ValueError("block beyond the end of the file")
    if data[offset + size] != 0:  # trailer byte 0 = kNoCompression, which TF's bundle writer uses
        raise ValueError(f"compressed table block (type {data[offset + size]})")
    return data[offset: offset + size]


def _block_entries(block: bytes):
    """(key, value) pairs of one table block."""
    if len(block) < 4:
        raise ValueError("block too short")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise ValueError("bad restart count")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise ValueError("bad block entry")
        key = key[:shared] + block[pos: pos + unshared]
        pos += unshared
        yield key, block[pos: pos + vlen]
        pos += vlen


def read_table(path: Path) -> dict[bytes, bytes]:
    """All (key, value) pairs of a LevelDB-style table file."""
    data = Path(path).read_bytes()
    if len(data) < FOOTER_BYTES:
        raise ValueError("file shorter than a table footer")
    footer = data[-FOOTER_BYTES:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise ValueError("no table magic number in the footer")
    _, pos = _varint(footer, 0)  # metaindex handle (unused)
    _, pos = _varint(footer, pos)
    index_off, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    out = {}
    for _, handle in _block_entries(_block(data, index_off, index_size)):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        for k, v in _block_entries(_block(data, off, size)):
            out[bytes(k)] = bytes(v)
    return out


# ---------------------------------------------------------------------------------------------
def read_bundle(prefix: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the bundle `prefix` (e.g. DIR/model.ckpt) as numpy arrays."""
    prefix = Path(prefix)
    index = Path(str(prefix) + ".index")
    try:
        table = read_table(index)
    except OSError as e:
        raise GptkitError(f"cannot read checkpoint index: {e.strerror}", index,
                          "check the path and its permissions") from None
    except (ValueError, struct.error) as e:
        raise GptkitError(f"not a TensorFlow checkpoint index: {e}", index,
                          "the file is damaged; download the release again") from None
    try:
        header = _fields(table.get(b"", b""))
        num_shards = header.get(1, [1])[0]
        big_endian = header.get(2, [0])[0] == 1
        entries = {k.decode(): _fields(v) for k, v in table.items() if k}
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise GptkitError(f"damaged checkpoint index entry: {e}", index, "download the release again") from None
    out, shards = {}, {}
    for name, e in entries.items():
        try:
            out[name] = _read_entry(prefix, index, name, e, num_shards, big_endian, shards)
        except (ValueError, TypeError, OverflowError, struct.error) as err:  # a field of the wrong wire type
            raise GptkitError(f"damaged checkpoint index entry {name}: {err}", index,
                              "download the release again") from None
    return out


def _read_entry(prefix: Path, index: Path, name: str, e: dict, num_shards, big_endian: bool,
                shards: dict) -> np.ndarray:
    """One variable of the bundle from its BundleEntryProto fields `e`."""
    if e.get(7):
        raise GptkitError(f"variable {name} is partitioned into slices", index,
                          "gptkit reads whole (unpartitioned) variables, as OpenAI's release has")
    dtype = e.get(1, [0])[0]
    if dtype == TF_BFLOAT16 or dtype not in TF_DTYPES:
        raise GptkitError(f"variable {name} has TensorFlow dtype {dtype}, which gptkit does not read", index,
                          "OpenAI's checkpoints are float32")
    shape = tuple(_fields(d).get(1, [0])[0] for d in _fields(e[2][0]).get(2, [])) if 2 in e else ()
    shard, offset, size = e.get(3, [0])[0], e.get(4, [0])[0], e.get(5, [0])[0]
    dt = np.dtype(TF_DTYPES[dtype]).newbyteorder(">" if big_endian else "<")
    if size != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise GptkitError(f"variable {name}: {size} bytes do not hold shape {list(shape)}", index,
                          "the file is damaged; download the release again")
    data = shards.get(shard)
    if data is None:
        data = Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
        if not data.is_file():
            raise GptkitError("missing checkpoint data shard", data,
                              "a TF checkpoint needs its .data-* files beside the .index")
        shards[shard] = data
    if offset + size > data.stat().st_size:
        raise GptkitError(f"truncated checkpoint data: variable {name} ends past the file", data,
                          "the download is incomplete; fetch it again")
    arr = np.fromfile(data, dtype=dt, count=size // dt.itemsize, offset=offset)
    return arr.astype(dt.newbyteorder("=")).reshape(shape)


def _hparams(path: Path) -> GPTConfig:
    f = path / "hparams.json"
    try:
        hp = json.loads(f.read_text())
        return GPTConfig(block_size=int(hp["n_ctx"]), vocab_size=int(hp["n_vocab"]), n_layer=int(hp["n_layer"]),
                         n_head=int(hp["n_head"]), n_embd=int(hp["n_embd"]))
    except OSError:
        raise GptkitError("missing hparams.json", f, "OpenAI's checkpoints come with hparams.json; "
                          "put it beside model.ckpt.index") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise GptkitError(f"bad hparams.json: {type(e).__name__} {e}", f,
                          "it needs n_vocab, n_ctx, n_embd, n_head and n_layer") from None


def load_tf(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, gptkit state dict) from an OpenAI TF checkpoint directory."""
    path = Path(path)
    config = _hparams(path)
    arrays = read_bundle(path / "model.ckpt")
    sd: dict[str, torch.Tensor] = {}

    def take(tf_name: str, name: str):
        arr = arrays.get(tf_name)
        if arr is None:
            raise GptkitError(f"variable {tf_name} is missing", path / "model.ckpt.index",
                              "is this an OpenAI GPT-2 checkpoint?")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if tf_name.endswith("/w"):  # conv weight [1, in, out] -> Linear (out, in)
            if t.ndim != 3 or t.shape[0] != 1:
                raise GptkitError(f"variable {tf_name} has shape {list(t.shape)}, expected [1, in, out]",
                                  path / "model.ckpt.index", "the checkpoint is not OpenAI's GPT-2 layout")
            t = t[0].t().contiguous()
        sd[name] = t

    for short, name in TOP_MAP.items():
        take(f"model/{short}", name)
    for i in range(config.n_layer):
        for short, name in LAYER_MAP.items():
            take(f"model/h{i}/{short}", f"transformer.h.{i}.{name}")
    wte = sd["transformer.wte.weight"]
    if wte.shape != (config.vocab_size, config.n_embd):
        raise GptkitError(f"model/wte has shape {list(wte.shape)}, hparams.json implies "
                          f"[{config.vocab_size}, {config.n_embd}]", path / "hparams.json",
                          "hparams.json and the checkpoint come from different models")
    padded = wte.new_zeros(config.padded_vocab_size, config.n_embd)
    padded[: config.vocab_size] = wte
    sd["transformer.wte.weight"] = padded
    sd["lm_head.weight"] = padded
    return config, sd

"""llm.c's model, tokenizer and debug-state files: layouts, byte-exact round trips, corrupt files.

The reference layout is rebuilt here with numpy straight from a transformers model and the format
description (header of 256 int32, then the 16 tensors in llm.c's order, Linear (out, in) layout,
wte padded to Vp), independently of gptkit's writer.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from gptkit.config import pad_vocab
from gptkit.errors import GptkitError
from gptkit.formats import llmc

ORDER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
         "mlp.c_proj.weight", "mlp.c_proj.bias"]


def reference_model_bytes(hf_model, bf16=False) -> bytes:
    """llm.c's model .bin for a transformers GPT2LMHeadModel, built from the format description."""
    c = hf_model.config
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    V, C, L, Vp = c.vocab_size, c.n_embd, c.n_layer, pad_vocab(c.vocab_size)
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, 5 if bf16 else 3, c.n_positions, V, L, c.n_head, C, Vp]
    wte = torch.zeros(Vp, C)
    wte[:V] = sd["transformer.wte.weight"]
    tensors = [wte, sd["transformer.wpe.weight"]]
    for name in ORDER:
        # HF's Conv1D stores (in, out); llm.c stores PyTorch Linear's (out, in)
        conv = name.endswith("weight") and ("attn.c_" in name or "mlp.c_" in name)
        tensors.append(torch.stack([sd[f"transformer.h.{i}.{name}"].t() if conv else sd[f"transformer.h.{i}.{name}"]
                                    for i in range(L)]))
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    body = b"".join((t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes() if bf16
                     else t.contiguous().numpy().astype("<f4").tobytes()) for t in tensors)
    return header.tobytes() + body


@pytest.mark.parametrize("bf16", [False, True], ids=["v3-fp32", "v5-bf16"])
def test_model_bin_matches_llmc_layout_and_round_trips_bytes(hf_tiny, tmp_path, bf16):
    from gptkit.loading import load_model

    d, hf_model = hf_tiny
    loaded = load_model(d)
    f = tmp_path / "model.bin"
    llmc.write_model(f, loaded.model.state_dict(), loaded.model.config, torch.bfloat16 if bf16 else torch.float32)
    expected = reference_model_bytes(hf_model, bf16)
    assert f.read_bytes() == expected
    n = loaded.model.num_params() + (pad_vocab(320) - 320) * 32
    assert f.stat().st_size == 1024 + n * (2 if bf16 else 4)
    config, sd = llmc.read_model(f)
    assert config == loaded.model.config
    llmc.write_model(tmp_path / "again.bin", sd, config, torch.bfloat16 if bf16 else torch.float32)
    assert (tmp_path / "again.bin").read_bytes() == expected


def test_model_bin_loads_with_transformers_logits(hf_tiny, tmp_path):
    from gptkit.loading import load_model

    _, hf_model = hf_tiny
    f = tmp_path / "m.bin"
    f.write_bytes(reference_model_bytes(hf_model))
    loaded = load_model(f)
    assert loaded.kind == "llmc"
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), hf_model(idx).logits, atol=1e-5, rtol=0)


def reference_tokenizer_bytes(tokens, version, eot=50256) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240328, version, len(tokens)]
    if version == 2:
        header[3] = eot
    return header.tobytes() + b"".join(bytes([len(t)]) + t for t in tokens)


@pytest.mark.parametrize("version", [1, 2])
def test_tokenizer_bin_round_trips_bytes(tmp_path, version):
    tokens = [bytes([i]) for i in range(256)] + [b" the", b"\xe2\x80", b"x" * 255]
    f = tmp_path / "tok.bin"
    f.write_bytes(reference_tokenizer_bytes(tokens, version, eot=257))
    tok = llmc.read_tokenizer(f)
    assert tok.tokens == tokens and tok.version == version
    assert tok.eot == (257 if version == 2 else 50256)  # version 1 implies GPT-2's EOT
    llmc.write_tokenizer(tmp_path / "again.bin", tok)
    assert (tmp_path / "again.bin").read_bytes() == f.read_bytes()


def test_gpt2_tokenizer_bin_holds_tiktoken_bytes_and_endoftext(tmp_path, gpt2_vocab_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from gptkit.convert import llmc_tokenizer_for
    from gptkit.loading import Loaded
    from gptkit.model import GPT
    from gptkit.config import GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8))
    tok = llmc_tokenizer_for(Loaded(model, "gptkit"), vocab=gpt2_vocab_path)
    f = tmp_path / "tokenizer.bin"
    llmc.write_tokenizer(f, tok)
    ranks = load_tiktoken_bpe(str(gpt2_vocab_path))
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("gpt2-ref", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    expected = [enc.decode_single_token_bytes(i) for i in range(50257)]
    assert f.read_bytes() == reference_tokenizer_bytes(expected, 2, 50256)
    back = llmc.read_tokenizer(f)
    assert back.tokens[50256] == b"<|endoftext|>" and back.eot == 50256
    text = "Hello world, to be or not to be.\n"
    assert b"".join(back.tokens[i] for i in enc.encode_ordinary(text)) == text.encode()


def test_debug_state_round_trips_bytes(hf_tiny, tmp_path):
    from gptkit.loading import load_model
    from gptkit.validate import debug_state

    d, _ = hf_tiny
    model = load_model(d).model
    x, y = torch.randint(0, 320, (2, 8)), torch.randint(0, 320, (2, 8))
    st = debug_state(model, x, y)
    f = tmp_path / "state.bin"
    llmc.write_state(f, st, model.config)
    V, Vp, BT = 320, pad_vocab(320), 16
    nparams = model.num_params() + (Vp - V) * 32
    assert f.stat().st_size == 1024 + 4 * (2 * BT + BT * V + 1 + nparams)
    header = np.frombuffer(f.read_bytes()[:16], dtype="<i4")
    assert header.tolist() == [20240327, 2, 2, 8]
    back = llmc.read_state(f, model.config)
    assert torch.equal(back.x, x) and torch.equal(back.y, y) and torch.equal(back.logits, st.logits)
    assert back.grads["transformer.wte.weight"].shape == (Vp, 32)
    assert torch.equal(back.grads["transformer.h.1.mlp.c_fc.weight"], st.grads["transformer.h.1.mlp.c_fc.weight"])
    llmc.write_state(tmp_path / "again.bin", back, model.config)
    assert (tmp_path / "again.bin").read_bytes() == f.read_bytes()


# ---------------------------------------------------------------------------------------------
# corrupt files
@pytest.fixture
def files(hf_tiny, tmp_path):
    from gptkit.loading import load_model

    d, hf_model = hf_tiny
    model = load_model(d).model
    m = tmp_path / "model.bin"
    m.write_bytes(reference_model_bytes(hf_model))
    t = tmp_path / "tok.bin"
    t.write_bytes(reference_tokenizer_bytes([b"a", b"bc"], 2, 1))
    s = tmp_path / "state.bin"
    llmc.write_state(s, llmc.DebugState(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long),
                                        torch.zeros(1, 4, 320), torch.tensor(1.0),
                                        {k: torch.zeros_like(v) for k, v in model.state_dict().items()}),
                     model.config)
    return model.config, m, t, s


def _read(kind, path, config):
    return {"model": lambda: llmc.read_model(path), "tok": lambda: llmc.read_tokenizer(path),
            "state": lambda: llmc.read_state(path, config)}[kind]()


def _corrupt(path, how):
    b = bytearray(path.read_bytes())
    if how == "magic":
        b[0:4] = (12345).to_bytes(4, "little")
    elif how == "version":
        b[4:8] = (99).to_bytes(4, "little")
    elif how == "truncated":
        b = b[:-3]
    elif how == "header-only":
        b = b[:500]
    elif how == "oversized":
        b += b"\0\0\0\0"
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("kind", ["model", "tok", "state"])
@pytest.mark.parametrize("how,message", [("magic", "bad magic number"), ("version", "unsupported"),
                                         ("truncated", "truncated"), ("header-only", "truncated"),
                                         ("oversized", "oversized")])
def test_corrupt_file_is_a_one_line_error(files, kind, how, message):
    config, m, t, s = files
    path = {"model": m, "tok": t, "state": s}[kind]
    _read(kind, path, config)  # intact: reads
    _corrupt(path, how)
    with pytest.raises(GptkitError, match=message) as e:
        _read(kind, path, config)
    line = e.value.line()
    assert "\n" not in line and str(path) in line and e.value.hint


def test_debug_state_for_another_model_is_rejected(files, tmp_path):
    config, _, _, s = files
    with pytest.raises(GptkitError, match="implies"):
        llmc.read_state(s, config.replace(n_layer=3))


@pytest.mark.parametrize("bad", [-1, "V"])
def test_debug_state_with_token_ids_outside_the_vocab_is_rejected(files, tmp_path, bad):
    config, _, _, s = files
    st = llmc.read_state(s, config)
    st.x[0, 0] = config.vocab_size if bad == "V" else bad  # V itself is already outside [0, V)
    llmc.write_state(tmp_path / "bad.bin", st, config)
    with pytest.raises(GptkitError, match="outside"):
        llmc.read_state(tmp_path / "bad.bin", config)


def test_cli_reports_a_corrupt_model_bin_in_one_line(files):
    _, m, _, _ = files
    _corrupt(m, "truncated")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gptkit", "convert", str(m), str(m.parent / "out"), "--to", "hf"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: truncated model file") and str(m) in r.stderr

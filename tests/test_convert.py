"""`gptkit convert`: every format into every other, checked against transformers."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def gptkit_checkpoint(tmp_path, chars=None, **cfg):
    """A run directory with one gptkit checkpoint of a random model."""
    from gptkit.checkpoint import save_checkpoint
    from gptkit.model import GPT

    config = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100), **cfg})
    torch.manual_seed(1)
    model = GPT(config)
    with torch.no_grad():  # move biases and norms off their init so every tensor matters
        for n, p in model.named_parameters():
            if "ln_" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    state = {"model_config": config.to_dict()}
    if chars:
        state["chars"] = chars
    run = tmp_path / "run"
    save_checkpoint(run, 7, model, state)
    return run, model


def logits(model, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (2, 12), generator=g)
    with torch.no_grad():
        return model(idx), idx


def test_to_hf_loads_in_transformers_with_gptkit_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    run, model = gptkit_checkpoint(tmp_path)
    r = run_cli("convert", run, tmp_path / "hf", "--to", "hf")
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, idx = logits(model, 100)
    with torch.no_grad():
        assert (hf(idx).logits - ours).abs().max().item() <= 1e-5


def test_round_trip_gptkit_hf_llmc_gptkit_gives_equal_logits(tmp_path):
    from gptkit.convert import convert
    from gptkit.loading import load_model

    run, model = gptkit_checkpoint(tmp_path)
    convert(run, tmp_path / "hf", "hf")
    res = convert(tmp_path / "hf", tmp_path / "llmc", "llmc")
    assert any("no tokenizer.bin" in n for n in res.notes)  # vocab 100 has no tokenizer of its own
    convert(tmp_path / "llmc", tmp_path / "back", "gptkit")
    back = load_model(tmp_path / "back")
    assert back.kind == "gptkit" and back.model.config == model.config
    a, _ = logits(model, 100)
    b, _ = logits(back.model, 100)
    assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k


def test_llmc_bf16_writes_version_5_with_rounded_weights(tmp_path):
    from gptkit.convert import convert
    from gptkit.formats.llmc import read_model

    run, model = gptkit_checkpoint(tmp_path)
    res = convert(run, tmp_path / "out", "llmc-bf16")
    f = tmp_path / "out" / "model.bin"
    assert np.frombuffer(f.read_bytes()[:8], dtype="<i4").tolist() == [20240326, 5]
    assert any("version 5" in n for n in res.notes)
    _, sd = read_model(f)
    for k, v in model.state_dict().items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v.to(torch.bfloat16)), k


def test_char_model_keeps_its_vocab_through_llmc(tmp_path):
    from gptkit.convert import convert
    from gptkit.formats.llmc import read_tokenizer
    from gptkit.loading import load_model

    chars = list("\n !abcdefghij") + ["é"]
    run, model = gptkit_checkpoint(tmp_path, chars=chars, vocab_size=len(chars))
    convert(run, tmp_path / "llmc", "llmc")
    tok = read_tokenizer(tmp_path / "llmc" / "tokenizer.bin")
    assert tok.tokens == [c.encode() for c in chars] and tok.eot == 0  # EOT points at "\n"
    convert(tmp_path / "llmc" / "model.bin", tmp_path / "back", "gptkit")
    back = load_model(tmp_path / "back")
    assert back.chars == chars
    assert torch.equal(logits(model, len(chars))[0], logits(back.model, len(chars))[0])


def test_gpt2_vocab_model_gets_gpt2_tokenizer_bin(tmp_path, gpt2_vocab_path):
    from gptkit.convert import convert
    from gptkit.formats.llmc import read_tokenizer

    run, _ = gptkit_checkpoint(tmp_path, vocab_size=50257, n_embd=16, n_layer=1)
    r = run_cli("convert", run, tmp_path / "llmc", "--to", "llmc", "--vocab", gpt2_vocab_path)
    assert r.returncode == 0, r.stderr
    tok = read_tokenizer(tmp_path / "llmc" / "tokenizer.bin")
    assert len(tok.tokens) == 50257 and tok.tokens[50256] == b"<|endoftext|>" and tok.tokens[262] == b" the"


def test_hf_export_keeps_the_sources_tokenizer_files(hf_tiny, tmp_path):
    from gptkit.convert import convert

    d, _ = hf_tiny
    (d / "vocab.json").write_text("{}")
    (d / "merges.txt").write_text("#version: 0.2\n")
    res = convert(d, tmp_path / "out", "hf")
    assert (tmp_path / "out" / "vocab.json").read_text() == "{}"
    assert tmp_path / "out" / "merges.txt" in res.files


def test_bad_source_and_target_are_one_line_errors(tmp_path):
    from gptkit.convert import convert

    r = run_cli("convert", tmp_path / "nothing", tmp_path / "out", "--to", "hf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    r = run_cli("convert", tmp_path, tmp_path / "out", "--to", "onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--to" in r.stderr
    with pytest.raises(GptkitError, match="unknown target"):
        convert(tmp_path, tmp_path / "out", "onnx")


def test_hf_model_with_an_untied_lm_head_is_refused_not_silently_tied(tmp_path):
    """gptkit ties lm_head to wte; an HF GPT-2 trained with tie_word_embeddings=false has its own
    lm_head, and dropping it would change every logit."""
    transformers = pytest.importorskip("transformers")
    from gptkit import GPT

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64,
                                  tie_word_embeddings=False)
    m = transformers.GPT2LMHeadModel(cfg)
    assert not torch.equal(m.lm_head.weight, m.transformer.wte.weight)
    m.save_pretrained(tmp_path / "untied")
    with pytest.raises(GptkitError, match="lm_head"):
        GPT.from_pretrained(str(tmp_path / "untied"))
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16,
                                                                vocab_size=64))
    tied.save_pretrained(tmp_path / "tied")
    x = torch.randint(0, 64, (1, 8))
    got = GPT.from_pretrained(str(tmp_path / "tied")).eval()(x)
    assert torch.allclose(got, tied.eval()(x).logits, atol=1e-5)

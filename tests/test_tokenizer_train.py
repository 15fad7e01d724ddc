"""`gptkit tokenizer train` (tokenizers' BpeTrainer, byte-level) and `prepare --vocab tokenizer.json`.
References: transformers' AutoTokenizer loading the written directory; exact round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hf_tokenizers as H
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.tokenizer import HFTokenizer, load_tokenizer

HELD_OUT = [
    "Ωμέγα and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, never seen: ꙮ 🦀🦀 \U0010fffd",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵 and e\u0301 \u0915\u094d\u0937",
    "\x00\x01\x7f control \u0085 \u2028 \u2029 \ufeff BOM",
    "tabs\tand  double  spaces   \r\n windows\r\n<|endoftext|> as text",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files and a folder of .txt files: the CORPUS lines, numbered so there is a lot to merge."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("\n".join(f"{i}: {line}" for i, line in enumerate(H.CORPUS)), encoding="utf-8")
    (root / "dir").mkdir()
    for k in range(3):
        (root / "dir" / f"p{k}.txt").write_text("\n".join(reversed(H.CORPUS[k::3])) * 8, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "mine"
    assert main(["tokenizer", "train", str(corpus / "a.txt"), str(corpus / "dir"), "--vocab-size", "600",
                 "--out", str(out)]) == 0
    return out


def test_trained_tokenizer_has_the_vocab_size_asked_and_endoftext(trained):
    tok = load_tokenizer(trained / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 600
    assert tok.token_to_id("<|endoftext|>") == 0 == tok.eot


def test_held_out_unicode_round_trips_exactly(trained):
    tok = load_tokenizer(trained)
    for text in HELD_OUT + H.TEXTS:
        assert tok.decode(tok.encode_ordinary(text)) == text
        assert b"".join(tok.token_bytes(i) for i in tok.encode_ordinary(text)) == text.encode("utf-8")


def test_transformers_autotokenizer_loads_it_and_encodes_equally(trained):
    from transformers import AutoTokenizer

    ref, tok = AutoTokenizer.from_pretrained(str(trained)), load_tokenizer(trained)
    for text in HELD_OUT + H.TEXTS:
        assert ref.encode(text) == tok.encode(text, add_special_tokens=True)
        assert ref.decode(ref.encode(text)) == text


def test_prints_bytes_per_token_against_gpt2(corpus, tmp_path, capsys):
    import os

    assert main(["tokenizer", "train", str(corpus / "dir"), "--vocab-size", "300", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bytes per token on the corpus" in out
    if (Path(os.environ.get("GPTKIT_DATA", "/nonexistent")) / "gpt2.tiktoken").is_file():
        assert "GPT-2 BPE" in out and "not measured" not in out


def test_vocab_size_below_bytes_plus_specials_is_an_error_line(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", str(corpus / "a.txt"), "--vocab-size", "256", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vocab size 256 is below") and "--vocab-size" in err and "257" in err
    assert not (tmp_path / "tokenizer.json").exists()
    # an absurd size is refused before the trainer allocates for it (it aborted the process)
    assert main(["tokenizer", "train", str(corpus / "a.txt"), "--vocab-size", "99999999999", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: vocab size 99,999,999,999 is above 1,048,576") and "\n" not in err
    assert not (tmp_path / "tokenizer.json").exists()


def test_training_streams_the_text_in_bounded_pieces(tmp_path):
    from gptkit.tokenizer_train import iter_corpus

    f = tmp_path / "big.txt"
    f.write_text("word " * 600_000, encoding="utf-8")  # 3 MB
    sizes = [len(p) for p in iter_corpus([f])]
    assert sum(sizes) == 3_000_000 and len(sizes) > 2 and max(sizes) < 1_200_000


@pytest.mark.parametrize("family", ["mine", "llama2", "llama2-metaspace"])
def test_prepare_with_a_tokenizer_json_encodes_each_document_and_carries_it(family, trained, corpus, tmp_path):
    from gptkit.data import read_meta
    from gptkit.prepare import prepare
    from gptkit.tokenizer import tokenizer_from_data

    vocab = trained / "tokenizer.json" if family == "mine" else \
        H.build_llama2(tmp_path / "l2", metaspace=family.endswith("metaspace")) / "tokenizer.json"
    tok = load_tokenizer(vocab)
    out = prepare(str(corpus / "dir"), vocab=str(vocab), out=tmp_path / "data", progress=False)
    meta = read_meta(out)
    assert meta["tokenizer"] == "hf" and meta["vocab_size"] == tok.vocab_size
    assert (out / "tokenizer.json").read_text() == vocab.read_text()
    ids = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint16, offset=1024) for s in ("train", "val")])
    start = tok.eot if family == "mine" else tok.bos
    docs = [(corpus / "dir" / f"p{k}.txt").read_bytes().decode("utf-8") for k in range(3)]
    want = [t for d in docs for t in [start] + tok.encode_ordinary(d)]
    assert ids.tolist() == want  # piece by piece equals the whole document at once
    assert tokenizer_from_data(out).encode("hi there") == tok.encode("hi there")


def test_prepare_with_a_gpt2_vocab_is_unchanged(tmp_path):
    import os

    from gptkit.prepare import _hf_vocab
    from gptkit.tokenizer import gpt2_tokenizer, save_tokenizer

    if not (Path(os.environ.get("GPTKIT_DATA", "/nonexistent")) / "gpt2.tiktoken").is_file():
        pytest.skip("needs $GPTKIT_DATA/gpt2.tiktoken")
    save_tokenizer(gpt2_tokenizer(), tmp_path)
    assert _hf_vocab(tmp_path / "tokenizer.json") is None  # GPT-2's own tokenizer.json stays the GPT-2 BPE
    with pytest.raises(GptkitError):
        _hf_vocab(tmp_path / "missing" / "tokenizer.json")


def test_a_model_trained_on_your_tokenizer_samples_without_vocab(trained, corpus, tmp_path, capsys):
    """prepare --vocab DIR/tokenizer.json, train: the run carries tokenizer.json, so sample, eval and
    convert need no --vocab."""
    data = tmp_path / "data"
    assert main(["prepare", str(corpus / "dir"), "--vocab", str(trained / "tokenizer.json"), "--out", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "n_layer=1", "n_head=2", "n_embd=16",
                 "batch_size=2", "block_size=8", "max_steps=2", "warmup_steps=1", "eval_interval=0",
                 "final_eval=false", "sample_tokens=4", "progress=false", "dtype=float32", "device=cpu",
                 "ckpt_interval=2"]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--prompt", "héllo 日本", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("héllo 日本")
    from gptkit.convert import convert

    res = convert(run, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()
    assert not res.notes
    convert(tmp_path / "hf", tmp_path / "again", "gptkit")  # and back into a run, which carries it too
    assert main(["sample", "--model", str(tmp_path / "again"), "--prompt", "héllo 日本", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0

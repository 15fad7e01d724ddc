"""`convert --to hf` writes the tokenizer (issue 18 item 5): transformers' AutoTokenizer encodes as
gptkit does, and pipeline("text-generation") runs end to end, greedy tokens equal to gptkit's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import hf_tokenizers as H
from gptkit.tokenizer import CharTokenizer
from gptkit.config import GPTConfig

pytest.importorskip("transformers")

CHARS = sorted(set("hello world, HELLO WORLD!\nthe quick brown fox é日"))


def make_run(tmp_path, vocab_size, chars=None, tokenizer_dir=None):
    """A run directory with one checkpoint of a tiny random model (+ a tokenizer carried in the run)."""
    from gptkit.checkpoint import save_checkpoint
    from gptkit.model import GPT
    from gptkit.tokenizer import load_tokenizer, save_tokenizer

    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size)
    torch.manual_seed(3)
    model = GPT(config)
    state = {"model_config": config.to_dict(), **({"chars": chars} if chars else {})}
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, state)
    if tokenizer_dir is not None:
        save_tokenizer(load_tokenizer(tokenizer_dir), run)
    return run


def gptkit_greedy(path, prompt: str, n: int) -> str:
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    loaded = load_model(path)
    tok = tokenizer_for(loaded)
    ids = tok.encode(prompt, add_special_tokens=True)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(loaded.model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in tok.stop_ids:
                break
            ids.append(nxt)
    return tok.decode(ids, skip_special_tokens=True)


def check_export(run, out, prompt, texts):
    from transformers import AutoTokenizer, pipeline

    from gptkit.convert import convert
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    res = convert(run, out, "hf")
    assert out / "tokenizer.json" in res.files and not res.notes
    tok, ref = tokenizer_for(load_model(run)), AutoTokenizer.from_pretrained(str(out))
    for t in texts:
        assert ref.encode(t) == tok.encode(t, add_special_tokens=True), t
    pipe = pipeline("text-generation", model=str(out), device="cpu")
    got = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert got == gptkit_greedy(run, prompt, 6)
    assert len(got) > len(prompt)
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_char_model_export_has_a_char_tokenizer_and_runs_in_pipeline(tmp_path):
    run = make_run(tmp_path, len(CHARS), chars=CHARS)
    check_export(run, tmp_path / "hf", "hello", ["hello world", "é日\n", ""])


def test_gpt2_vocab_model_export_has_gpt2_tokenizer_files_and_runs_in_pipeline(tmp_path, gpt2_vocab_path):
    os.environ.setdefault("GPTKIT_DATA", str(Path(gpt2_vocab_path).parent))
    run = make_run(tmp_path, 50257)
    out = tmp_path / "hf"
    check_export(run, out, "Hello world", H.TEXTS)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}


def test_hf_tokenizer_model_export_copies_its_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    src = H.build_bytelevel(tmp_path / "tok", chat_template=H.CHATML)
    run = make_run(tmp_path, 512, tokenizer_dir=src)
    check_export(run, tmp_path / "hf", "Hello world", H.TEXTS)
    from transformers import GenerationConfig

    eos = AutoTokenizer.from_pretrained(str(src)).convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == eos  # stops where gptkit does
    msgs = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False) == \
        AutoTokenizer.from_pretrained(str(src)).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_python_api_load_tokenizer(tmp_path):
    import gptkit

    run = make_run(tmp_path, len(CHARS), chars=CHARS)
    tok = gptkit.load_tokenizer(run)
    assert tok.decode(tok.encode("hello")) == "hello"
    src = H.build_llama3(tmp_path / "l3")
    t3 = gptkit.load_tokenizer(src / "tokenizer.json")
    assert t3.decode(t3.encode("héllo 日本")) == "héllo 日本"


def test_sample_reads_a_tokenizer_json_from_vocab_or_from_the_run(tmp_path, capsys):
    from gptkit.cli import main

    src = H.build_bytelevel(tmp_path / "tok")
    run = make_run(tmp_path, 512)
    args = ["sample", "--model", str(run), "--prompt", "Hello wörld", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(args) == 2  # vocab 512 and no tokenizer: an error line
    assert capsys.readouterr().err.startswith("error: model has vocab_size 512 and no tokenizer of its own")
    assert main(args + ["--vocab", str(src / "tokenizer.json")]) == 0
    with_vocab = capsys.readouterr().out
    assert main(args + ["--vocab", str(src)]) == 0
    assert capsys.readouterr().out == with_vocab
    from gptkit.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(src), run)  # the run carries its tokenizer
    assert main(args) == 0
    assert capsys.readouterr().out == with_vocab
    assert with_vocab.startswith("Hello wörld")


def test_tokenizer_larger_than_the_embedding_is_one_error_line_in_the_cli(tmp_path, capsys):
    from gptkit.cli import main

    src = H.build_bytelevel(tmp_path / "tok")  # 502 ids
    run = make_run(tmp_path, 400)
    assert main(["sample", "--model", str(run), "--vocab", str(src / "tokenizer.json"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "502 tokens, more than the model's embedding of 400" in err


def test_sampling_starts_from_bos_and_stops_at_the_tokenizers_stop_ids(tmp_path):
    """A Llama-2-style tokenizer: the prompt gets <s> as transformers encodes it; </s> ends generation."""
    from gptkit.inference import default_prompt_ids
    from gptkit.tokenizer import load_tokenizer

    l2 = load_tokenizer(H.build_llama2(tmp_path / "l2"))
    assert default_prompt_ids(l2, "Hello") == l2.encode("Hello", add_special_tokens=True) == [1] + l2.encode("Hello")
    assert default_prompt_ids(l2, "") == [1]
    assert l2.stop_ids == [2]
    bl = load_tokenizer(H.build_bytelevel(tmp_path / "bl"))
    assert default_prompt_ids(bl, "Hello") == bl.encode("Hello")
    assert default_prompt_ids(bl, "") == [bl.eot]
    chars = CharTokenizer("ab\n")
    assert default_prompt_ids(chars, "") == [2] and chars.stop_ids == []


def test_llama_dir_with_its_tokenizer_samples_as_transformers_generates(tmp_path, capsys):
    """A Llama-family HF directory with a Llama-3-style tokenizer.json: `gptkit sample` (bos added,
    greedy) prints what transformers' generate + decode gives, and the HF export keeps the tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    from gptkit.cli import main

    d = H.build_llama3(tmp_path / "llama", chat_template=H.LLAMA3_TEMPLATE)
    ref_tok = AutoTokenizer.from_pretrained(str(d))
    cfg = transformers.LlamaConfig(vocab_size=len(ref_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3, bos_token_id=ref_tok.bos_token_id,
                                   eos_token_id=ref_tok.eos_token_id)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(str(d))
    prompt = "Hello wörld, def f(x):"
    ids = ref_tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == ref_tok.bos_token_id
    out = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = ref_tok.decode(out[0, ids.shape[1]:])
    assert main(["sample", "--model", str(d), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + want

"""Hugging Face tokenizer.json + chat templates, against transformers' AutoTokenizer on tokenizers
built here with `tokenizers` and saved with transformers (see hf_tokenizers.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import hf_tokenizers as H
from gptkit.errors import GptkitError
from gptkit.tokenizer import BPETokenizer, CharTokenizer, HFTokenizer, load_tokenizer, save_tokenizer

pytest.importorskip("transformers")

FAMILIES = {
    "llama2": lambda d: H.build_llama2(d),
    "llama2-metaspace": lambda d: H.build_llama2(d, metaspace=True),
    "llama3": lambda d: H.build_llama3(d, chat_template=H.LLAMA3_TEMPLATE),
    "bytelevel": lambda d: H.build_bytelevel(d, chat_template=H.CHATML),
}

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si besoin."},
    {"role": "user", "content": "Write `print(1)` in Python 🐍"},
    {"role": "assistant", "content": "print(1)\n"},
    {"role": "user", "content": "  And in C?  "},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    return {name: build(root / name) for name, build in FAMILIES.items()}


@pytest.fixture(scope="module")
def refs(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(d)) for name, d in tokenizer_dirs.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_decode_equal_transformers_autotokenizer(family, tokenizer_dirs, refs):
    ref, tok = refs[family], load_tokenizer(tokenizer_dirs[family])
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == len(ref)
    for text in H.TEXTS:
        for special in (False, True):
            ids = ref.encode(text, add_special_tokens=special)
            assert tok.encode(text, add_special_tokens=special) == ids, (text, special)
            assert tok.decode(ids) == ref.decode(ids), text
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.bos == ref.bos_token_id and tok.eos == ref.eos_token_id


def test_add_bos_token_follows_tokenizer_config(tokenizer_dirs, refs):
    assert load_tokenizer(tokenizer_dirs["llama2"]).encode("hi", add_special_tokens=True)[0] == 1  # <s>
    assert load_tokenizer(tokenizer_dirs["llama3"]).encode("hi", add_special_tokens=True)[0] == \
        refs["llama3"].convert_tokens_to_ids("<|begin_of_text|>")
    assert load_tokenizer(tokenizer_dirs["bytelevel"]).encode("hi", add_special_tokens=True) == \
        refs["bytelevel"].encode("hi")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_bytes_concatenate_to_the_text(family, tokenizer_dirs):
    """Streaming joins token_bytes: they must give the text (Llama 2 style: after its leading ▁)."""
    tok = load_tokenizer(tokenizer_dirs[family])
    for text in H.TEXTS:
        got = b"".join(tok.token_bytes(i) for i in tok.encode(text)).decode("utf-8")
        # SentencePiece style adds a `▁` in front (Metaspace: unless the text starts with a space)
        assert got == text or (tok.prepends_space and got == " " + text), text


def test_special_token_text_is_special_in_encode_but_plain_in_encode_ordinary(tokenizer_dirs, refs):
    tok = load_tokenizer(tokenizer_dirs["bytelevel"])
    text = "a<|im_end|>b"
    assert tok.encode(text) == refs["bytelevel"].encode(text, add_special_tokens=False)
    assert tok.token_to_id("<|im_end|>") in tok.encode(text)
    assert tok.token_to_id("<|im_end|>") not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text


@pytest.mark.parametrize("family", ["bytelevel", "llama3"])
@pytest.mark.parametrize("turns", [1, 2, 4])
def test_chat_template_renders_as_transformers_apply_chat_template(family, turns, tokenizer_dirs, refs):
    tok, ref = load_tokenizer(tokenizer_dirs[family]), refs[family]
    msgs = CONVERSATION[-turns:] if turns != 2 else CONVERSATION[1:3] + CONVERSATION[3:]
    for gen in (True, False):
        want = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert tok.chat_template.render(msgs, add_generation_prompt=gen) == want
    prompt = tok.chat_template.render(msgs)
    assert tok.encode(prompt) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)


def test_chat_template_source_chat_template_jinja_or_tokenizer_config(tokenizer_dirs, tmp_path):
    import shutil

    d = tmp_path / "cfg"
    shutil.copytree(tokenizer_dirs["bytelevel"], d)
    text = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    assert load_tokenizer(d).chat_template is None
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = text
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).chat_template.source == text


def test_stop_tokens_are_eos_and_the_templates_end_of_turn(tokenizer_dirs, refs):
    from gptkit.chat_template import chat_stops

    l3 = load_tokenizer(tokenizer_dirs["llama3"])
    assert set(l3.stop_ids) == {refs["llama3"].convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")}
    bl = load_tokenizer(tokenizer_dirs["bytelevel"])
    assert chat_stops(bl) == ([refs["bytelevel"].convert_tokens_to_ids("<|im_end|>")], [])


def test_gpt2_has_no_chat_template_unless_a_file_gives_one(tmp_path):
    from gptkit.chat_template import chat_stops, load_chat_template, require_chat_template

    tok = CharTokenizer("abc")
    with pytest.raises(GptkitError, match="no chat template.*--chat-template"):
        require_chat_template(tok)
    f = tmp_path / "chatml.jinja"
    f.write_text(H.CHATML)
    tok.chat_template = load_chat_template(f, tok)
    assert require_chat_template(tok).render([{"role": "user", "content": "abc"}]) == \
        "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"
    assert chat_stops(tok) == ([], ["<|im_end|>"])  # not a token of the vocab: a stop string
    if os.path.isfile(os.path.join(os.environ.get("GPTKIT_DATA", "/nonexistent"), "gpt2.tiktoken")):
        from gptkit.tokenizer import gpt2_tokenizer

        gpt2 = gpt2_tokenizer()
        gpt2.chat_template = load_chat_template(f, gpt2)
        assert chat_stops(gpt2) == ([50256], ["<|im_end|>"])
        assert gpt2.decode(gpt2.encode("a") + [50256], skip_special_tokens=True) == "a"


def test_unknown_role_and_raising_template_are_error_lines(tokenizer_dirs):
    from gptkit.cli import main  # noqa: F401  (the CLI prints GptkitError as one line)

    tok = load_tokenizer(tokenizer_dirs["llama3"])
    with pytest.raises(GptkitError, match="unknown role 'wizard'") as e:
        tok.chat_template.render([{"role": "wizard", "content": "hi"}])
    assert e.value.line().startswith("error: ")
    with pytest.raises(GptkitError, match="raised: Conversation roles must be user or assistant, got tool"):
        tok.chat_template.render([{"role": "tool", "content": "42"}])
    with pytest.raises(GptkitError, match="does not parse"):
        from gptkit.chat_template import ChatTemplate

        ChatTemplate("{% for m in messages %}")


def test_template_sandbox_refuses_python_internals():
    from gptkit.chat_template import ChatTemplate

    with pytest.raises(GptkitError):
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render(
            [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_tokenizer_round_trips(family, tokenizer_dirs, refs, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_dirs[family])
    save_tokenizer(tok, tmp_path / "out")
    again = load_tokenizer(tmp_path / "out")
    ref2 = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in H.TEXTS:
        assert again.encode(text, add_special_tokens=True) == refs[family].encode(text) == ref2.encode(text)
    assert (again.chat_template is None) == (tok.chat_template is None)


def test_char_tokenizer_exports_a_tokenizer_json_transformers_reads(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer(sorted(set("hello world\nÉé日本 🚀")))
    save_tokenizer(tok, tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["hello world", "日本 🚀\nÉé", " ", ""]:
        assert ref.encode(text) == tok.encode(text)
        assert ref.decode(tok.encode(text)) == text
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars


def test_tokenizer_larger_than_the_embedding_is_an_error_line(tokenizer_dirs, tmp_path):
    from gptkit import GPT, GPTConfig
    from gptkit.convert import convert
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    tok = load_tokenizer(tokenizer_dirs["bytelevel"])
    for vs, ok in ((tok.vocab_size, True), (tok.vocab_size - 1, False)):
        model = GPT(GPTConfig(block_size=16, vocab_size=vs, n_layer=1, n_head=2, n_embd=8))
        from gptkit.formats.hf import save_hf

        d = tmp_path / f"m{vs}"
        save_hf(model, d)
        save_tokenizer(tok, d)
        if ok:
            assert tokenizer_for(load_model(d)).encode("hi") == tok.encode("hi")
        else:
            with pytest.raises(GptkitError, match="more than the model's embedding"):
                tokenizer_for(load_model(d))
    del convert


def test_gpt2_vocab_round_trips_through_hf_files(tmp_path):
    import os

    from transformers import AutoTokenizer

    from gptkit.tokenizer import gpt2_tokenizer

    if not (Path(os.environ.get("GPTKIT_DATA", "/nonexistent")) / "gpt2.tiktoken").is_file():
        pytest.skip("needs $GPTKIT_DATA/gpt2.tiktoken")
    tok = gpt2_tokenizer()
    files = {p.name for p in save_tokenizer(tok, tmp_path)}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= files
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in H.TEXTS:
        assert ref.encode(text) == tok.encode(text), text
        assert ref.decode(tok.encode(text)) == text
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), BPETokenizer)


def test_indented_block_tags_render_as_transformers(tokenizer_dirs, refs):
    """trim_blocks + lstrip_blocks: an indented `{% if %}` line leaves no spaces or newline behind."""
    from gptkit.chat_template import ChatTemplate, special_tokens_of

    tok, ref = load_tokenizer(tokenizer_dirs["bytelevel"]), refs["bytelevel"]
    t = ChatTemplate(H.ZEPHYR_LIKE, special_tokens_of(tok))
    for gen in (True, False):
        assert t.render(CONVERSATION, add_generation_prompt=gen) == \
            ref.apply_chat_template(CONVERSATION, chat_template=H.ZEPHYR_LIKE, add_generation_prompt=gen, tokenize=False)


def test_a_dir_with_vocab_json_merges_and_tokenizer_json_reads_the_tokenizer_json(tokenizer_dirs, refs, tmp_path):
    """SmolLM2/Qwen-style directories hold all three; the tokenizer.json is the one that knows the specials."""
    import shutil

    from tokenizers import Tokenizer

    from gptkit.tokenizer import load_vocab

    d = tmp_path / "three"
    shutil.copytree(tokenizer_dirs["bytelevel"], d)
    Tokenizer.from_file(str(d / "tokenizer.json")).model.save(str(d))  # vocab.json + merges.txt
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    tok = load_vocab(d)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("a<|im_end|>b") == refs["bytelevel"].encode("a<|im_end|>b", add_special_tokens=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_byte_lengths_sum_to_the_texts_bytes(family, tokenizer_dirs):
    from gptkit.tokenizer import token_byte_lengths

    tok = load_tokenizer(tokenizer_dirs[family])
    lengths = token_byte_lengths(tok)
    for text in H.TEXTS:
        ids = tok.encode(text, add_special_tokens=True)  # bos counts 0
        extra = 1 if tok.prepends_space and text and not (family.endswith("metaspace") and text[0] == " ") else 0
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")) + extra, text
    chars = CharTokenizer("aé日")
    assert token_byte_lengths(chars, 5) == [1, 2, 3, 0, 0]

"""SFT data: chat jsonl reading, rendering, the assistant mask against transformers, prepared rows,
the loader's targets, and the bad-input errors."""

import json

import numpy as np
import pytest
import torch

from gptkit.errors import GptkitError
from gptkit.sft import (DEFAULT_CHAT_TEMPLATE, ChatLoader, conversation_of, encode_with_mask, read_conversations,
                        render)

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
     {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "And again, in caps?"},
     {"role": "assistant", "content": "HI THERE!"}],
    [{"role": "user", "content": "Add 2 and 3.\n\nShow the sum."}, {"role": "assistant", "content": " 5 "}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A small byte-level BPE trained by `tokenizers`, wrapped for transformers' apply_chat_template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for c in CONVS for m in c] * 20 + ["<|im_start|>user\n<|im_end|>\nassistant system"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok, transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("conv", CONVS)
def test_assistant_mask_equals_transformers_return_assistant_tokens_mask(hf_tokenizer, conv):
    tok, hf = hf_tokenizer
    want = hf.apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    text, spans = render(DEFAULT_CHAT_TEMPLATE, conv, eos_token="<|endoftext|>")
    assert text == hf.apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
    ids, mask = encode_with_mask(text, spans, lambda s: tok.encode(s, add_special_tokens=False).ids,
                                 {"<|endoftext|>": tok.token_to_id("<|endoftext|>")})
    assert ids == list(want["input_ids"])
    assert mask == list(want["assistant_masks"])
    assert sum(mask) > 0


def test_generation_prompt_matches_transformers(hf_tokenizer):
    _, hf = hf_tokenizer
    want = hf.apply_chat_template(CONVS[0][:1], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                  add_generation_prompt=True)
    assert render(DEFAULT_CHAT_TEMPLATE, CONVS[0][:1], add_generation_prompt=True, eos_token="<|endoftext|>")[0] \
        == want
    assert want.endswith("<|im_start|>assistant\n")


def test_alpaca_records_become_a_user_and_an_assistant_turn():
    got = conversation_of({"instruction": "Translate", "input": "chat", "output": "cat"}, "x")
    assert got == [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    assert conversation_of({"instruction": "Hi", "input": "", "output": "Hello"}, "x")[0]["content"] == "Hi"


@pytest.mark.parametrize("line,what", [
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"content": "hi"}]}', "message 0 has no role"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role"),
    ('{"text": "hi"}', "neither a chat record nor an Alpaca record"),
    ("{not json", "invalid JSON"),
])
def test_bad_chat_lines_are_one_error_naming_the_line(tmp_path, line, what):
    from gptkit.cli import main

    f = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVS[0]})
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(GptkitError, match=what) as e:
        read_conversations(f)
    assert e.value.where == f"{f}:2"


def test_bad_chat_file_through_the_cli_prints_one_error_line(tmp_path, capsys):
    from gptkit.cli import main

    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"content": "hi"}]}\n')
    assert main(["prepare", "chat", str(f), "--model", "gpt2", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: message 0 has no role") and ":1)" in err[0]


def _tiny_gpt2_vocab_model(path):
    """A tiny random model with GPT-2's vocabulary, as a gptkit checkpoint (the tokenizer comes from
    GPTKIT_DATA's gpt2.tiktoken)."""
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128)
    save_checkpoint(path, 0, GPT(cfg), {"model_config": cfg.to_dict()})
    return path


def test_prepare_chat_writes_rows_masks_and_template_and_truncates_with_a_count(tmp_path, gpt2_vocab_path,
                                                                               capsys):
    from gptkit.data import read_meta
    from gptkit.sft import prepare_chat
    from gptkit.tokenizer import gpt2_tokenizer

    model = _tiny_gpt2_vocab_model(tmp_path / "m")
    f = tmp_path / "chat.jsonl"
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    f.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS + [long]) + "\n"
                 + json.dumps({"instruction": "Say yes", "input": "", "output": "yes"}) + "\n")
    logs = []
    out = prepare_chat(f, str(model), tmp_path / "d", block_size=95, val_fraction=0.2, log=logs.append)
    meta = read_meta(out)
    assert meta["format"] == "chat" and meta["row_tokens"] == 96
    assert meta["truncated"] == 1 and meta["dropped"] == 1  # the long one lost its assistant turn
    assert any("1 of 5 conversations" in line and "truncated" in line for line in logs)
    assert (out / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert meta["train_rows"] == 3 and meta["val_rows"] == 1
    # the rows decode to the rendered conversations, padded with <|endoftext|>, and the mask marks
    # exactly the assistant's text and its <|endoftext|>
    tok = gpt2_tokenizer()
    loader = ChatLoader(out, "train", 3, 95)
    rows = loader.data
    text, spans = render(DEFAULT_CHAT_TEMPLATE, CONVS[0], eos_token="<|endoftext|>")
    ids = rows.tokens[0].tolist()
    assert tok.decode(ids).startswith(text) and ids[-1] == 50256
    assistant = [t for t, m in zip(ids, rows.mask[0].tolist()) if m]
    assert tok.decode(assistant) == "Paris.<|endoftext|>"
    # the loader's targets are the next tokens where they are the assistant's, else -1
    x, y = rows.batch([0], 95)
    assert x[0].tolist() == ids[:95]
    assert [t for t in y[0].tolist() if t != -1] == assistant
    assert torch.equal(y[0] != -1, torch.from_numpy(np.asarray(rows.mask[0][1:])) == 1)
    # bits per byte counts the bytes of those targets alone (<|endoftext|> counts 0 bytes)
    from gptkit.evaluate import split_target_bytes, token_byte_lengths

    want = sum(len(tok.decode([t for t, m in zip(r[1:], mk[1:]) if m and t != 50256]).encode())
               for r, mk in zip(rows.tokens.tolist(), rows.mask.tolist()))
    assert split_target_bytes(out, "train", token_byte_lengths(tok, tok.vocab_size)) == want > 0


def test_the_models_own_template_is_used_and_must_mark_the_assistant(tmp_path, gpt2_vocab_path):
    from gptkit.checkpoint import find_checkpoint
    from gptkit.data import read_meta
    from gptkit.sft import prepare_chat

    model = _tiny_gpt2_vocab_model(tmp_path / "m")
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS) + "\n")
    own = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
           "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    (find_checkpoint(model) / "chat_template.jinja").write_text(own)
    out = prepare_chat(f, str(model), tmp_path / "d", block_size=95, log=lambda *a: None)
    assert read_meta(out)["template_source"] == "the model's"
    assert (out / "chat_template.jinja").read_text() == own
    (find_checkpoint(model) / "chat_template.jinja").write_text(own.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""))
    with pytest.raises(GptkitError, match="does not mark the assistant's text"):
        prepare_chat(f, str(model), tmp_path / "d2", block_size=95, log=lambda *a: None)


def test_a_run_that_carries_a_template_serves_with_it(tmp_path, gpt2_vocab_path):
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)
    save_checkpoint(tmp_path / "run", 3, GPT(cfg), {"model_config": cfg.to_dict(),
                                                    "chat_template": DEFAULT_CHAT_TEMPLATE})
    tok = tokenizer_for(load_model(tmp_path / "run"))
    assert tok.chat_template.source == DEFAULT_CHAT_TEMPLATE
    want, _ = render(DEFAULT_CHAT_TEMPLATE, CONVS[0][:1], add_generation_prompt=True, eos_token="<|endoftext|>")
    assert tok.chat_template.render(CONVS[0][:1], add_generation_prompt=True) == want


def test_prepare_chat_for_a_vocabulary_over_65536_writes_uint32_shards(tmp_path, gpt2_vocab_path):
    """A model with Llama 3's kind of vocabulary (here 70,000 ids) gets llm.c's uint32 shard layout,
    and the loader reads back the same rows as for a GPT-2-size vocabulary."""
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    from gptkit.sft import prepare_chat

    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS) + "\n")
    rows = {}
    for vocab in (50257, 70000):
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=vocab)
        save_checkpoint(tmp_path / f"m{vocab}", 0, GPT(cfg), {"model_config": cfg.to_dict()})
        out = prepare_chat(f, str(tmp_path / f"m{vocab}"), tmp_path / f"d{vocab}", block_size=63, val_fraction=0.3,
                           vocab=gpt2_vocab_path)
        magic = int.from_bytes((out / "train.bin").read_bytes()[:4], "little")
        assert magic == (20240520 if vocab == 50257 else 20240801)
        data = ChatLoader(out, "train", 2, 63).data
        rows[vocab] = (data.tokens.tolist(), data.mask.tolist())
    assert rows[50257] == rows[70000]

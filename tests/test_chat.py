"""`gptkit chat` on a tiny Llama with a byte-level tokenizer and a ChatML template, all saved by
transformers. The reference for every turn: transformers renders the conversation with
`apply_chat_template(add_generation_prompt=True)` and greedily generates the reply with `generate`,
stopping at the end-of-turn token."""

import os
import subprocess
import sys

import pytest
import torch

import hf_tokenizers as H
from conftest import ROOT
from gptkit.chat import ChatSession, chat_loop, run_chat
from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams
from gptkit.inference import load_for_inference

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

MAX_NEW = 12


def make_chat_dir(d, kind: str):
    """(dir, transformers model, AutoTokenizer, stop ids): a random GQA Llama beside a ChatML
    (byte-level BPE) or Llama-3 (tiktoken-style BPE) tokenizer and template."""
    if kind == "chatml":
        H.build_bytelevel(d, chat_template=H.CHATML)
        eot, others = "<|im_end|>", ["<|endoftext|>"]
    else:
        H.build_llama3(d, chat_template=H.LLAMA3_TEMPLATE)
        eot, others = "<|eot_id|>", ["<|end_of_text|>"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, initializer_range=0.5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    end = hf_tok.convert_tokens_to_ids(eot)
    stops = [end] + [hf_tok.convert_tokens_to_ids(t) for t in others]
    # make the end-of-turn token win after a few tokens of the first reply: its head row becomes
    # the row of the token greedy decoding picks there, slightly larger
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                     return_dict=False)
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):]
        w = model.lm_head.weight
        w[end] = w[free[4]] * 1.05
    model.save_pretrained(d)
    return d, model, hf_tok, stops


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_chat_dir(tmp_path_factory.mktemp("chat") / "model", "chatml")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_chat_dir(tmp_path_factory.mktemp("chat3") / "model", "llama3")


def reference_reply(model, hf_tok, stops, messages) -> str:
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                         pad_token_id=0)[0, len(ids):].tolist()
    return hf_tok.decode(out, skip_special_tokens=True)


def lines(*xs):
    it = iter(xs)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


@pytest.mark.parametrize("which", ["chat_dir", "llama3_dir"], ids=["chatml", "llama3"])
def test_chat_replies_equal_transformers_greedy_on_the_rendered_history(request, which):
    d, model, hf_tok, stops = request.getfixturevalue(which)
    out = []
    history = run_chat(str(d), temperature=0, max_new_tokens=MAX_NEW, device="cpu", system="Be brief.",
                       read=lines("Hello there", "What next?", "/reset", "Again"), write=out.append)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = reference_reply(model, hf_tok, stops, msgs)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "What next?"}]
    second = reference_reply(model, hf_tok, stops, msgs)
    third = reference_reply(model, hf_tok, stops, [msgs[0], {"role": "user", "content": "Again"}])
    assert "".join(out) == first + "\n" + second + "\n" + "(history cleared)\n" + third + "\n" + "\n"
    assert history == [msgs[0], {"role": "user", "content": "Again"}, {"role": "assistant", "content": third}]


def test_a_reply_stops_at_the_end_of_turn_token(chat_dir):
    d, model, hf_tok, stops = chat_dir
    m, tok = load_for_inference(str(d), device="cpu")
    s = ChatSession(m, tok, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in s.params.stop_token_ids
    answer = s.reply("Hello there")
    assert answer == reference_reply(model, hf_tok, stops, [{"role": "user", "content": "Hello there"}])
    assert len(tok.encode(answer)) < MAX_NEW  # it ended at <|im_end|>, not at the token limit


def test_sampling_options_and_seed_reproduce_a_chat(chat_dir):
    d = chat_dir[0]
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=5, repetition_penalty=1.3, max_new_tokens=8, device="cpu")
    a = run_chat(str(d), read=lines("Hi", "Tell me"), write=lambda s: None, **kw)
    b = run_chat(str(d), read=lines("Hi", "Tell me"), write=lambda s: None, **kw)
    assert a == b and len(a) == 4
    with pytest.raises(GptkitError, match="--top-p"):
        run_chat(str(d), top_p=1.5, read=lines(), write=lambda s: None)


def test_exit_ends_the_chat_and_a_template_error_is_one_line(chat_dir, tmp_path):
    d = chat_dir[0]
    out = []
    history = run_chat(str(d), temperature=0, max_new_tokens=3, device="cpu", read=lines("/exit", "never read"),
                       write=out.append)
    assert history == [] and out == []
    bad = tmp_path / "raises.jinja"
    bad.write_text("{{ raise_exception('no chatting today') }}")
    out = []
    run_chat(str(d), chat_template=str(bad), device="cpu", read=lines("Hi"), write=out.append)
    assert out[0].startswith("error: the chat template raised: no chatting today") and out[1] == "\n"


def test_turns_past_the_context_drop_the_oldest_exchanges(chat_dir):
    d, model, hf_tok, stops = chat_dir
    msgs = [f"message {i}: " + "the quick brown fox " * 12 for i in range(5)]
    history = run_chat(str(d), temperature=0, max_new_tokens=MAX_NEW, device="cpu", read=lines(*msgs),
                       write=lambda s: None)
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users[-1] == msgs[-1] and users[0] != msgs[0] and users == msgs[-len(users):]
    assert [m["role"] for m in history] == ["user", "assistant"] * len(users)
    kept = history[:-1]
    assert len(hf_tok.apply_chat_template(kept, add_generation_prompt=True, return_dict=False)) < 256
    assert history[-1]["content"] == reference_reply(model, hf_tok, stops, kept)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_dir, monkeypatch):
    d, model, hf_tok, stops = chat_dir
    real = ChatSession.reply

    def interrupted(self, text, write):
        if text == "stop me":
            write("par")
            raise KeyboardInterrupt
        return real(self, text, write)

    monkeypatch.setattr(ChatSession, "reply", interrupted)
    out = []
    history = run_chat(str(d), temperature=0, max_new_tokens=MAX_NEW, device="cpu",
                       read=lines("stop me", "Hello there"), write=out.append)
    first = reference_reply(model, hf_tok, stops, [{"role": "user", "content": "Hello there"}])
    assert "".join(out) == "par\n(interrupted)\n" + first + "\n\n"
    assert [m["content"] for m in history] == ["Hello there", first]


def test_a_gpt2_model_without_template_is_refused_unless_one_is_given(tmp_path, gpt2_vocab_path, capsys):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.cli import main
    from gptkit.config import GPTConfig
    from gptkit.model import GPT

    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    ckpt = save_checkpoint(tmp_path / "run", 0, GPT(cfg), {"model_config": cfg.to_dict()})
    assert main(["chat", "--model", str(ckpt), "--vocab", str(gpt2_vocab_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model has no chat template") and "--chat-template" in err
    (tmp_path / "chatml.jinja").write_text(H.CHATML)
    history = run_chat(str(ckpt), vocab=str(gpt2_vocab_path), chat_template=str(tmp_path / "chatml.jinja"),
                       max_new_tokens=4, temperature=0, device="cpu", read=lines("Hi"), write=lambda s: None)
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_cli_chat_reads_stdin_and_streams_replies(chat_dir):
    d, model, hf_tok, stops = chat_dir
    r = subprocess.run([sys.executable, "-m", "gptkit", "chat", "--model", str(d), "--temperature", "0",
                        "--max-new-tokens", str(MAX_NEW), "--device", "cpu"], input=b"Hello there\n/exit\n",
                       capture_output=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:].decode()
    first = reference_reply(model, hf_tok, stops, [{"role": "user", "content": "Hello there"}])
    assert r.stdout.decode() == "> " + first + "\n" + "> "  # bytes: the reply may hold a \r

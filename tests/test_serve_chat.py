"""/v1/chat/completions through the official `openai` client (`chat.completions.create`).

The reference is transformers: the same messages rendered and tokenized by the model directory's
tokenizer with `apply_chat_template(..., add_generation_prompt=True)`, then greedy tokens from the
same random GPT2LMHeadModel by full recompute, cut at the template's end of turn (<|im_end|>)."""

import json
import subprocess
import sys
import urllib.request

import pytest
import torch

import hf_tokenizers as H
from conftest import data_file, post_json

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

NAME = "tiny-chat"
# ChatML, plus a rule that raises (transformers' raise_exception) for a conversation opened by the assistant
TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the conversation must not start with "
            "the assistant') }}{% endif %}" + H.CHATML)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(model directory, transformers model, transformers tokenizer): a byte-level BPE with ChatML's
    special tokens and template, beside a random 2-layer GPT-2 of its vocabulary size."""
    d = H.build_bytelevel(tmp_path_factory.mktemp("chat") / "model", chat_template=TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                  initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(d)
    return d, ref, tok


@pytest.fixture(scope="module")
def server(hf):
    from gptkit.serve import Server, ServeConfig, load_for_serving

    model, tok, _ = load_for_serving(str(hf[0]), device="cpu")
    with Server(model, tok, NAME, config=ServeConfig(max_batch=8, batch_wait_s=0.005)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(server, path, body):
    return post_json(server.url + path, body)


def reference_reply(hf, messages, n: int) -> tuple[str, int, bool]:
    """(reply text, prompt tokens, stopped at <|im_end|>) of greedy generation in transformers."""
    _, ref, tok = hf
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            t = int(ref(torch.tensor([out])).logits[0, -1].argmax())
            if t == end:
                return tok.decode(out[len(ids):]), len(ids), True
            out.append(t)
    return tok.decode(out[len(ids):]), len(ids), False


def test_greedy_reply_equals_transformers_on_its_chat_template(client, hf):
    want, prompt_tokens, stopped = reference_reply(hf, MESSAGES, 24)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content == want
    assert c.finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == prompt_tokens


def test_generation_stops_at_the_templates_end_of_turn(client, hf):
    end = hf[2].convert_tokens_to_ids("<|im_end|>")
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                       logit_bias={str(end): 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 0


def test_streamed_deltas_add_up_to_the_reply(client):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_n_seed_and_stop(client, hf):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.prompt_tokens == reference_reply(hf, MESSAGES, 0)[1]  # counted once, whatever n is
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    if len(text) > 3:
        stop = text[2:4]
        r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_models_say_chat_is_available(server):
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as r:
        assert json.loads(r.read())["data"][0]["chat_template"] is True
    with urllib.request.urlopen(server.url + "/tokenizer_info", timeout=30) as r:
        assert json.loads(r.read())["chat_template"] == TEMPLATE


@pytest.mark.parametrize("messages,what", [
    ([{"role": "wizard", "content": "hi"}], "unknown role"),
    ([{"role": "assistant", "content": "hi"}], "must not start with the assistant"),  # the template raises
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_messages_are_400(server, messages, what):
    status, out = post(server, "/v1/chat/completions", {"messages": messages})
    assert status == 400 and what in out["error"]["message"] and out["error"]["param"] == "messages", out


def test_a_model_without_template_is_400_until_chat_template_gives_one(tmp_path):
    data_file("gpt2.tiktoken")
    from gptkit.chat_template import load_chat_template
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.serve import Server, load_for_serving

    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    ckpt = save_checkpoint(tmp_path / "run", 0, GPT(cfg), {"model_config": cfg.to_dict()})
    model, tok, _ = load_for_serving(str(ckpt), device="cpu")
    with Server(model, tok, "gpt2ish") as s:
        status, out = post(s, "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 400 and "no chat template" in out["error"]["message"]
        assert "--chat-template" in out["error"]["message"]
        with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["chat_template"] is False
    (tmp_path / "chatml.jinja").write_text(H.CHATML)
    tok.chat_template = load_chat_template(tmp_path / "chatml.jinja", tok)  # what --chat-template FILE does
    with Server(model, tok, "gpt2ish") as s:
        status, out = post(s, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "temperature": 0})
        assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
        assert out["usage"]["prompt_tokens"] == len(tok.encode(tok.chat_template.render(MESSAGES)))
    # and `gptkit serve --chat-template` with a file that is not there: one error line, exit 2
    p = subprocess.run([sys.executable, "-m", "gptkit", "serve", "--model", str(ckpt), "--chat-template",
                        str(tmp_path / "nope.jinja"), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "nope.jinja" in p.stderr

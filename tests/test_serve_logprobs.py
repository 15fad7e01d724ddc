"""/v1/completions logprobs and echo (what lm-evaluation-harness's local-completions sends) and vLLM's
tokenizer endpoints, through the official `openai` client.

The reference is transformers: a random GPT2LMHeadModel saved with save_pretrained (initializer_range
0.3, so the logprobs spread far from uniform), whose log_softmax over the same ids must equal the
logprobs the server reports."""

import json
import urllib.request

import pytest
import torch

from conftest import data_file, post_json

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

NAME = "tiny-hf"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF directory, transformers model): a random 2-layer GPT-2 with the 50257-token vocab."""
    data_file("gpt2.tiktoken")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.3)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "model"
    ref.save_pretrained(d)
    return d, ref


@pytest.fixture(scope="module")
def server(hf):
    from gptkit.serve import Server, ServeConfig, load_for_serving

    model, tok, _ = load_for_serving(str(hf[0]), device="cpu")
    with Server(model, tok, NAME, config=ServeConfig(max_batch=8, max_rows_per_request=2, batch_wait_s=0.005)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(server, path, body):
    return post_json(server.url + path, body)


def reference_logprobs(ref, ids):
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)  # (T, V)


def test_echoed_prompt_logprobs_equal_transformers_log_softmax(client, hf):
    ids = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    ref = reference_logprobs(hf[1], ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 3  # a spread-out distribution, not near uniform
    for t in range(1, len(ids)):  # the top 3 alternatives (+ the token itself) with their logprobs
        v, i = ref[t - 1].topk(3)
        top = lp.top_logprobs[t]
        assert 3 <= len(top) <= 4
        for tid, val in zip(i.tolist(), v.tolist()):
            assert top[_gpt2().decode([tid])] == pytest.approx(val, abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text and r.choices[0].finish_reason == "length"
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:k]) for k in range(len(ids))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def _gpt2():
    from gptkit.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def test_greedy_top_logprobs_contain_the_chosen_token(client, hf):
    r = client.completions.create(model=NAME, prompt="Hello there, my friend", max_tokens=4, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    ids = _gpt2().encode("Hello there, my friend")
    with torch.no_grad():  # the greedy continuation and its logprobs, by full recompute in transformers
        for k in range(len(lp.tokens)):
            logp = reference_logprobs(hf[1], ids)[-1]
            t = int(logp.argmax())
            assert lp.tokens[k] == _gpt2().decode([t])
            assert lp.token_logprobs[k] == pytest.approx(float(logp[t]), abs=1e-5)
            assert lp.top_logprobs[k][lp.tokens[k]] == pytest.approx(lp.token_logprobs[k])
            ids.append(t)


def test_echo_with_generation_puts_the_prompt_first(client, hf):
    prompt = "The cat sat"
    r = client.completions.create(model=NAME, prompt=[prompt, prompt], max_tokens=2, temperature=0, echo=True,
                                  logprobs=0, n=2)
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.text == prompt + plain.choices[0].text
        n_prompt = len(_gpt2().encode(prompt))
        assert len(c.logprobs.tokens) == n_prompt + 2 and c.logprobs.token_logprobs[0] is None
        assert all(v is not None for v in c.logprobs.token_logprobs[1:])


def test_long_prompt_lists_are_queued_not_refused(client):
    prompts = [[464 + i, 2068] for i in range(11)]  # 11 rows, max_rows_per_request 2, max_batch 8
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in r.choices] == list(range(11))
    assert all(len(c.logprobs.tokens) == 3 for c in r.choices)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "echo": "yes"}, "echo"),
    ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 99999999]}, "prompt"),
    ({"prompt": "hi", "n": 3}, "n"),  # n > max_rows_per_request (2)
])
def test_bad_logprobs_and_echo_are_400(server, body, param):
    status, out = post(server, "/v1/completions", body)
    assert status == 400 and out["error"]["param"] == param, out


def test_logprobs_above_5_through_the_client_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=1, logprobs=6)


def test_streamed_logprobs_match_the_whole_answer(client):
    kw = dict(model=NAME, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    got = []
    for chunk in client.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            got += chunk.choices[0].logprobs.token_logprobs
    assert got == pytest.approx(whole.token_logprobs)


# ----------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints, against transformers' GPT-2 tokenizer built from the same vocabulary

def test_tokenize_and_detokenize_match_the_gpt2_tokenizer(server):
    text = "Hello world, <|endoftext|> and ünïcode"
    status, out = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    want = _gpt2().enc.encode(text, allowed_special="all")
    assert status == 200 and out["tokens"] == want and out["count"] == len(want) and out["max_model_len"] == 64
    assert 50256 in want  # the special token's text is its id, as HF's GPT-2 tokenizer encodes it
    status, out = post(server, "/detokenize", {"tokens": want})
    assert status == 200 and out["prompt"] == text


def test_tokenizer_info_names_eos(server):
    with urllib.request.urlopen(server.url + "/tokenizer_info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64 and info["chat_template"] is None


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_tokenizer_requests_are_400(server, path, body, param):
    status, out = post(server, path, body)
    assert status == 400 and out["error"]["param"] == param, out


def test_lm_eval_remote_tokenizer_reads_the_server(server):
    utils = pytest.importorskip("lm_eval.utils")
    rt = utils.RemoteTokenizer(server.url + "/v1/completions")
    assert rt.eos_token_id == 50256 and rt.encode("Hello world") == _gpt2().encode("Hello world")
    assert rt.decode([15496, 995]) == "Hello world"


def test_echo_alone_and_logprobs_0(client):
    r = client.completions.create(model=NAME, prompt="Just echo me", max_tokens=0, echo=True)
    assert r.choices[0].text == "Just echo me" and r.choices[0].logprobs is None
    r = client.completions.create(model=NAME, prompt="Say", max_tokens=3, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(top == {t: v} for t, v, top in zip(lp.tokens, lp.token_logprobs,
                                                                            lp.top_logprobs))

"""`gptkit serve` through the official `openai` client, on 127.0.0.1 with a tiny random GPT-2-vocab model.

The references are independent of the server: greedy text from a full-recompute loop over the model
(no KV cache, no batching), and the client library's own parsing of the JSON and SSE it receives."""

import json
import socket
import threading
import time
import urllib.request

import pytest
import torch

from conftest import data_file, post_json

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "tiny-gpt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint directory, model, tokenizer): a random 2-layer, 32-wide GPT-2 with the 50257-token vocab."""
    data_file("gpt2.tiktoken")
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.serve import load_for_serving

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("serve") / "run", 0, GPT(cfg), {"model_config": cfg.to_dict()})
    model, tok, _ = load_for_serving(str(ckpt), device="cpu")
    return ckpt, model, tok


@pytest.fixture(scope="module")
def server(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    with Server(model, tok, NAME, api_key=KEY, config=ServeConfig(max_batch=16, batch_wait_s=0.01)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, body=None, key=KEY):
    """(status, parsed JSON) of a raw request, for what the openai client cannot send."""
    return post_json(server.url + path, body, key=key, method=method)


def greedy_reference(model, tok, prompt: str, n: int) -> str:
    """n greedy tokens by recomputing the whole sequence each step."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


def wait_for(cond, timeout=60.0):  # generous: returns as soon as cond holds
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------------------------

def test_health_and_models_list_the_model_name(server, client):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_returns_openai_fields_and_greedy_text(tiny, client):
    _, model, tok = tiny
    r = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id and r.created > 0
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert c.text == greedy_reference(model, tok, "The quick brown fox", 6)
    assert r.usage.prompt_tokens == len(tok.encode("The quick brown fox"))
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streaming_sends_the_same_text_in_pieces_then_done(tiny, server, client):
    _, model, tok = tiny
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert all(ch.object == "text_completion" and ch.model == NAME for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert "".join(ch.choices[0].text for ch in chunks) == greedy_reference(model, tok, prompt, 8)
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    # the raw stream ends with the [DONE] sentinel
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": prompt, "max_tokens": 2, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    # stream_options.include_usage adds a last chunk with the usage and no choices
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(prompt))


def test_zero_max_tokens_and_empty_prompt(tiny, client):
    r = client.completions.create(model=NAME, prompt="Nothing", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0
    _, model, tok = tiny
    r = client.completions.create(model=NAME, prompt="", max_tokens=3, temperature=0)  # starts at <|endoftext|>
    ids, reason = [tok.eot], "length"
    with torch.no_grad():
        for _ in range(3):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t == tok.eot:  # <|endoftext|> ends the text and is not part of it
                reason = "stop"
                break
            ids.append(t)
    assert r.choices[0].text == tok.decode(ids[1:]) and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == 1


def test_n_and_a_list_of_prompts_give_prompt_major_choices(tiny, client):
    _, model, tok = tiny
    prompts = ["Hello", "A long time ago in"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=4, temperature=0, n=3)
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):
        ref = greedy_reference(model, tok, p, 4)
        assert [c.text for c in r.choices[3 * i: 3 * i + 3]] == [ref] * 3
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 24
    # sampled choices of one request differ from each other (near-uniform logits over 50257 tokens)
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=8, n=3, seed=5)
    assert len({c.text for c in r.choices}) == 3


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model=NAME, prompt="In the beginning", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    r = client.completions.create(model=NAME, prompt="In the beginning", max_tokens=12, temperature=0,
                                  stop=[stop, "\x00never"])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="In the beginning", max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=NAME, prompt="Seeds", max_tokens=10, temperature=1.0, top_p=0.9, n=2)
    a = client.completions.create(seed=1234, **kw)
    b = client.completions.create(seed=1234, **kw)
    c = client.completions.create(seed=4321, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    s = list(client.completions.create(seed=1234, stream=True, **kw))
    for i in range(2):
        assert "".join(ch.choices[0].text for ch in s if ch.choices[0].index == i) == a.choices[i].text


@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(prompt=" hello" * 100), "prompt"),
])
def test_invalid_parameters_answer_400_with_openai_error_json(client, kw, param):
    args = dict(model=NAME, prompt="hi", max_tokens=2)
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    err = e.value.body  # the client's parse of {"error": {...}}
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_an_unknown_model_answers_404_as_openai_does(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    assert e.value.body["code"] == "model_not_found"


def test_malformed_json_and_unknown_route_answer_error_json(server):
    status, body = http(server, "POST", "/v1/completions", b'{"prompt": "hi", ')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = http(server, "POST", "/v1/completions", b'["not", "an", "object"]')
    assert status == 400 and body["error"]["message"]
    status, body = http(server, "POST", "/v1/completions", b'{"prompt": "' + b"a" * ((4 << 20) + 65536) + b'"}')
    assert status == 400 and body["error"]["code"] == "body_too_large"
    status, body = http(server, "GET", "/v1/no-such-route")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_missing_or_wrong_key_answers_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=NAME, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = http(server, "POST", "/v1/completions", {"prompt": "hi"}, key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_requests_arriving_together_run_in_one_batch(server, client):
    sched = server.scheduler
    before = dict(sched.batch_sizes)
    results, errors = [], []

    def one(i):
        try:
            results.append(client.completions.create(model=NAME, prompt=f"request {i}", max_tokens=4).choices[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    sched.paused.clear()  # hold admission until all six are queued, so the test does not race
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(sched.waiting) == 6)
    finally:
        sched.paused.set()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    new = {b: n - before.get(b, 0) for b, n in sched.batch_sizes.items() if n > before.get(b, 0)}
    assert max(new) == 6  # all six in one forward pass


def test_a_request_arriving_mid_generation_joins_the_running_batch(tiny):
    """Continuous batching: a second request joins the forward passes of one already generating,
    and both get the text each gets alone."""
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.quantize import quantize_for_inference
    from gptkit.serve import Server, ServeConfig

    _, _, tok = tiny
    torch.manual_seed(1)  # a long context, so that the first request is still in the cache when the second joins
    model = quantize_for_inference(GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)),
                                   "float32")
    with Server(model, tok, NAME, config=ServeConfig(batch_wait_s=0)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        sched = s.scheduler
        first = c.completions.create(model=NAME, prompt="A long story:", max_tokens=1000, temperature=0, stream=True)
        it = iter(first)
        pieces = [next(it).choices[0].text, next(it).choices[0].text]  # it is generating now
        before = dict(sched.batch_sizes)
        assert set(before) == {1}  # so far it ran alone
        second = c.completions.create(model=NAME, prompt="Meanwhile, elsewhere", max_tokens=5, temperature=0)
        joined = {b: n - before.get(b, 0) for b, n in sched.batch_sizes.items() if n > before.get(b, 0)}
        # the first one is still going (the second's row leaves the batch at the scheduler's next step,
        # which may come just after its response)
        assert wait_for(lambda: sched.stats()["running_rows"] == 1)
        assert max(joined) == 2  # the second ran in the first one's batch
        pieces += [ch.choices[0].text for ch in it]
    assert second.choices[0].text == greedy_reference(model, tok, "Meanwhile, elsewhere", 5)
    from gptkit.generate import SamplingParams, generate_batch

    alone = generate_batch(model, [tok.encode("A long story:")], SamplingParams(max_new_tokens=1000, temperature=0),
                           tok)[0]
    assert "".join(pieces) == alone.text


def test_full_queue_answers_503(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    with Server(model, tok, NAME, config=ServeConfig(queue_size=2)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        s.scheduler.paused.clear()
        done = []
        threads = [threading.Thread(target=lambda: done.append(c.completions.create(model=NAME, prompt="x",
                                                                                    max_tokens=1)))
                   for _ in range(2)]
        try:
            for t in threads:
                t.start()
            assert wait_for(lambda: len(s.scheduler.waiting) == 2)
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model=NAME, prompt="x", max_tokens=1)
            assert e.value.status_code == 503 and e.value.body["code"] == "overloaded"
        finally:
            s.scheduler.paused.set()
        for t in threads:
            t.join(60)
        assert len(done) == 2  # the queued ones are still answered


def test_a_stalled_stream_does_not_block_others_and_a_dropped_one_frees_its_row(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    # slow steps (test-only), so that a generation inside the 64-token context lasts while the test acts
    server = Server(model, tok, NAME, api_key=KEY, config=ServeConfig(step_delay_s=0.05)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    sched = server.scheduler
    stream = client.completions.create(model=NAME, prompt="forever", max_tokens=60, stream=True, temperature=1.5)
    it = iter(stream)
    next(it), next(it)
    assert sched.stats()["running_rows"] == 1
    # while this client reads nothing, another request is served alongside it
    r = client.completions.create(model=NAME, prompt="meanwhile", max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert wait_for(lambda: sched.stats()["running_rows"] == 1)  # the stalled stream is still there
    stream.close()  # the client goes away mid-stream
    assert wait_for(lambda: sched.stats()["running_rows"] == 0 and not sched.owners)
    # a non-streaming request whose client hangs up is dropped too
    body = json.dumps({"prompt": "forever", "max_tokens": 60}).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_for(lambda: sched.stats()["running_rows"] == 1)
    assert wait_for(lambda: sched.stats()["running_rows"] == 0 and not sched.owners)
    # and the server still answers
    assert client.completions.create(model=NAME, prompt="still there?", max_tokens=2).choices[0].finish_reason
    server.stop()


def test_char_model_prompt_outside_its_vocabulary_is_a_400():
    from gptkit.serve import ServeConfig
    from gptkit.serve.protocol import APIError, _SafeTokenizer, parse_completion_request
    from gptkit.tokenizer import CharTokenizer

    tok = _SafeTokenizer(CharTokenizer("abc \n"))
    req = parse_completion_request({"prompt": "abc", "n": 2, "seed": 3}, tok, 16, "m", ServeConfig())
    assert req.prompts == [[0, 1, 2]] and [p.seed for p in req.params] == [3, 4]
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": "xyz"}, tok, 16, "m", ServeConfig())
    assert e.value.status == 400 and e.value.param == "prompt" and "'x'" in e.value.message


def test_serve_cli_starts_a_server_named_after_the_model(tiny):
    from gptkit.bench.loadtest import ServerProcess

    with ServerProcess(tiny[0], api_key=KEY, extra_args=["--threads", "1"]) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [tiny[0].name]  # the path's base name
        assert c.completions.create(model=tiny[0].name, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert srv.proc.returncode is not None


def test_serve_cli_reports_bad_options_in_one_line(capsys, tiny):
    from gptkit.cli import main

    assert main(["serve", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/no/such/model" in err[0]
    assert main(["serve", "--model", str(tiny[0]), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--max-batch" in err


@pytest.mark.slow
def test_load_50_clients_x_5_requests_all_answered_and_memory_flat(tiny):
    """The issue's load test: the server in its own process, so its RSS is its own."""
    from gptkit.bench.loadtest import ServerProcess, format_report, run_load

    with ServerProcess(tiny[0], api_key=KEY) as srv:
        r = run_load(srv.url, clients=50, requests=5, max_tokens=16, api_key=KEY)
    print(format_report(r))
    assert r["answered"] == 250 and r["errors"] == 0, r["error_kinds"]
    assert r["max_batch_seen"] > 1
    assert r["rss_after_bytes"] <= 1.10 * r["rss_before_bytes"]


def test_loadtest_counts_every_answer_against_a_running_server(server, capsys):
    """`python -m gptkit.bench.loadtest --url`: a few clients, half streaming; every request is answered and
    counted, and the report carries the figures."""
    import numpy as np

    from gptkit.bench.loadtest import _percentile, main, run_load

    r = run_load(server.url, clients=3, requests=2, max_tokens=2, api_key=KEY)
    assert r["answered"] == 6 and r["errors"] == 0, r["error_kinds"]
    assert main(["--url", server.url + "/", "--api-key", KEY, "--clients", "2", "--requests", "1",
                 "--max-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answered"] == 2
    assert main(["--url", server.url, "--api-key", KEY, "--clients", "1", "--requests", "1", "--max-tokens", "1",
                 "--stream", "all"]) == 0
    assert "1 clients x 1 requests, max_tokens 1, stream all\nanswered 1, errors 0\n" in capsys.readouterr().out
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0]
    for q in (1, 50, 90, 99, 100):  # nearest-rank, as numpy's "inverted_cdf" method
        assert _percentile(xs, q) == np.percentile(xs, q, method="inverted_cdf")


def test_loadtest_prefill_mode_reports_the_decoding_streams_gaps(server, capsys):
    """`loadtest --prefill`: decoding streams run while long prompts (token ids) arrive; every long
    prompt is answered, and the report carries the gaps and the time to first token."""
    from gptkit.bench.loadtest import main, run_prefill

    r = run_prefill(server.url, streams=2, stream_max_tokens=50, long=2, prompt_tokens=40, api_key=KEY)
    assert r["errors"] == 0, r["error_kinds"]
    assert r["long_ttft_p50_s"] > 0 and r["long"] == 2 and r["prompt_tokens"] == 40
    assert r["gaps"] == 0 or r["gap_max_s"] >= r["gap_p99_s"] >= r["gap_p50_s"] > 0
    assert main(["--url", server.url, "--api-key", KEY, "--prefill", "--long", "1", "--long-max-tokens", "20",
                 "--short", "1", "--prompt-tokens", "30"]) == 0
    assert "prompts of 30 tokens" in capsys.readouterr().out

"""`gptkit serve`, round 2: the defects a hostile probe found (issue 15), one regression test each,
plus /metrics and /v1/models/{id}.

Each test names the defect number it guards. References are independent of the server: greedy text
from a full-recompute loop over the model, and raw HTTP bytes where a client library would hide them."""

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from test_serve import tiny  # noqa: F401 (the fixture: checkpoint, model, tokenizer)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "tiny-gpt"


@pytest.fixture(scope="module")
def server(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    cfg = ServeConfig(max_batch=8, max_rows_per_request=4, request_token_budget=100, batch_wait_s=0.005)
    with Server(model, tok, NAME, api_key=KEY, config=cfg) as s:
        yield s


def raw(server, request: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Send raw bytes; (status, headers (lower-case names), body) of the answer."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:]))
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


def post(server, body: bytes | dict, path="/v1/completions", key: bytes | str | None = KEY, host: str | None = None,
         ctype: str = "application/json", extra: bytes = b"") -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    auth = b"" if key is None else b"Authorization: Bearer " + (key if isinstance(key, bytes) else key.encode()) + b"\r\n"
    return raw(server, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + (host or f"127.0.0.1:{server.port}").encode()
               + b"\r\nContent-Type: " + ctype.encode() + b"\r\n" + auth + extra
               + b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)


def get(server, path, key=KEY, host=None) -> tuple[int, dict, bytes]:
    auth = b"" if key is None else b"Authorization: Bearer " + key.encode() + b"\r\n"
    return raw(server, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + (host or f"127.0.0.1:{server.port}").encode()
               + b"\r\n" + auth + b"Connection: close\r\n\r\n")


def assert_openai_error(status, body: bytes, want_status: int, code: str | None = None, param=None):
    assert status == want_status, body[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def greedy_reference(model, tok, prompt: str, n: int) -> str:
    """n greedy tokens by recomputing the whole sequence each step."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


def wait_for(cond, timeout=60.0):  # generous: returns as soon as cond holds
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------------------------
# 1. one request must not lock out everyone

def test_1_prompt_plus_max_tokens_beyond_the_context_is_a_400(server):
    status, _, body = post(server, {"prompt": "Hello", "max_tokens": 63})  # "Hello" is 1 token: 64 fits
    assert status == 200, body
    status, _, body = post(server, {"prompt": "Hello there", "max_tokens": 63})  # 2 + 63 > 64
    err = assert_openai_error(status, body, 400, "context_length_exceeded", "max_tokens")
    assert "62" in err["message"]  # says how far to lower it


def test_1_rows_per_request_and_token_budget_are_capped(server):
    status, _, body = post(server, {"prompt": "Hi", "n": 5, "max_tokens": 1})  # 5 rows > 4
    assert_openai_error(status, body, 400, "invalid_value", "n")
    # 6 rows > 4, but each prompt's n fits: the rows beyond 4 wait for the request's own rows (lm-eval's batches)
    status, _, body = post(server, {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1})
    assert status == 200 and len(json.loads(body)["choices"]) == 6
    status, _, body = post(server, {"prompt": "Hi", "n": 4, "max_tokens": 30})  # 120 tokens > 100
    assert_openai_error(status, body, 400, "invalid_value", "max_tokens")
    status, _, body = post(server, {"prompt": "Hi", "n": 4, "max_tokens": 25})  # exactly the budget
    assert status == 200 and len(json.loads(body)["choices"]) == 4


# ----------------------------------------------------------------------------------------------
# 2. no 500s: one error-mapping place

@pytest.mark.parametrize("body", [
    b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",  # ValueError from int() in json.loads
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError
    b'{"prompt": "hi", "max_tokens": 1, "n": ' + b"[" * 500 + b"]" * 500 + b"}",  # parses; a bad type
])
def test_2_pathological_json_is_a_400_in_openai_shape(server, body):
    status, headers, answer = post(server, body)
    assert_openai_error(status, answer, 400)
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -(2 ** 63) - 1, 10 ** 30])
def test_2_seed_outside_int64_is_a_400_before_any_stream_starts(server, seed, stream):
    status, _, body = post(server, {"prompt": "hi", "max_tokens": 2, "seed": seed, "stream": stream})
    assert_openai_error(status, body, 400, "invalid_value", "seed")
    # the largest seed that fits, with n rows using seed .. seed + n - 1
    status, _, body = post(server, {"prompt": "hi", "max_tokens": 2, "seed": 2 ** 63 - 2, "n": 2, "stream": stream})
    assert status == 200 and b'"error"' not in body


# ----------------------------------------------------------------------------------------------
# 3. temperatures and penalties that overflow the logits

@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-6])
def test_3_tiny_temperatures_are_greedy(tiny, server, temperature):
    _, model, tok = tiny
    status, _, body = post(server, {"prompt": "The answer is", "max_tokens": 8, "temperature": temperature})
    assert status == 200
    assert json.loads(body)["choices"][0]["text"] == greedy_reference(model, tok, "The answer is", 8)


@pytest.mark.parametrize("field, value", [
    ("temperature", b"NaN"), ("temperature", b"Infinity"), ("temperature", b"-Infinity"), ("temperature", b"2.5"),
    ("temperature", b"-0.1"), ("top_p", b"NaN"), ("repetition_penalty", b"1e-300"), ("repetition_penalty", b"NaN"),
    ("repetition_penalty", b"1e300"), ("temperature", b"1" + b"0" * 400),
])
def test_3_non_finite_or_out_of_range_sampling_values_are_refused(server, field, value):
    body = b'{"prompt": "hi", "max_tokens": 2, "' + field.encode() + b'": ' + value + b"}"
    status, _, answer = post(server, body)
    assert_openai_error(status, answer, 400, None, field)


def test_3_temperature_two_is_accepted(server):
    status, _, body = post(server, {"prompt": "hi", "max_tokens": 2, "temperature": 2})
    assert status == 200


# ----------------------------------------------------------------------------------------------
# 4. clients that go away while queued free their place; 503 says when to retry

def test_4_queued_clients_that_disconnect_free_their_slots_and_503_has_retry_after(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    with Server(model, tok, NAME, config=ServeConfig(queue_size=2)) as s:
        sched = s.scheduler
        sched.paused.clear()  # hold admission: requests stay queued
        try:
            body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
            req = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks = [socket.create_connection((s.host, s.port), timeout=30) for _ in range(2)]
            for sock in socks:
                sock.sendall(req)
            assert wait_for(lambda: sched.stats()["waiting"] == 2)
            status, headers, answer = post(s, {"prompt": "x", "max_tokens": 1}, key=None)
            assert_openai_error(status, answer, 503, "overloaded")
            assert int(headers["retry-after"]) >= 1
            for sock in socks:  # both queued clients go away
                sock.close()
            assert wait_for(lambda: sched.stats()["waiting"] == 0)
            done = []
            t = threading.Thread(target=lambda: done.append(post(s, {"prompt": "x", "max_tokens": 1}, key=None)))
            t.start()
            assert wait_for(lambda: sched.stats()["waiting"] == 1)  # admitted to the queue, not refused
        finally:
            sched.paused.set()
        t.join(60)
        assert done[0][0] == 200


# ----------------------------------------------------------------------------------------------
# 5, 7, 8: a real `gptkit serve` process: shutdown on a signal, log lines, the key from the environment

def _sse(resp) -> list:
    out = []
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: "):
            out.append(line[6:].decode())
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_5_7_8_signal_shuts_down_gracefully_with_one_log_line_each(tiny, sig):
    from gptkit.bench.loadtest import ServerProcess

    key = "clé-🔑"  # non-ASCII, from the environment (not on the command line, so not in `ps`)
    srv = ServerProcess(tiny[0], extra_args=["--debug-step-delay-ms", "100", "--shutdown-grace", "2",
                                             "--threads", "1"], env={"GPTKIT_API_KEY": key})
    host, port = "127.0.0.1", srv.port
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n"

    def request(body: dict) -> urllib.request.Request:  # no key
        return urllib.request.Request(srv.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                      headers={"Content-Type": "application/json"})

    def send(body: dict) -> socket.socket:
        data = json.dumps(body).encode()
        sock = socket.create_connection((host, port), timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
                     + b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)
        return sock

    def read_all(sock) -> bytes:
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                return data
            data += part

    try:
        # 8: the key from GPTKIT_API_KEY, non-ASCII, sent as UTF-8 bytes
        quick = send({"prompt": "hi", "max_tokens": 2})
        assert read_all(quick).startswith(b"HTTP/1.1 200")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request({"prompt": "hi", "max_tokens": 1}), timeout=30)
        assert e.value.code == 401
        # 7: an upload dropped half-way is one log line
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
                     + b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        time.sleep(0.3)
        sock.close()
        # 5: a long stream, a long JSON request, and a short one that ends within the grace period
        long_stream = send({"prompt": "once upon", "max_tokens": 60, "stream": True})
        long_json = send({"prompt": "long", "max_tokens": 60})
        short = send({"prompt": "short", "max_tokens": 8})
        first = long_stream.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")

        def running_rows() -> int:
            sock = socket.create_connection((host, port), timeout=30)
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Connection: close\r\n\r\n")
            return json.loads(read_all(sock).partition(b"\r\n\r\n")[2])["running_rows"]

        assert wait_for(lambda: running_rows() == 3)  # all three are generating
        srv.proc.send_signal(sig)
        late = read_all(send({"prompt": "late", "max_tokens": 1}))  # during the grace period: a JSON 503
        assert late.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in late.lower() and b"shutting_down" in late
        short_answer = read_all(short)
        assert short_answer.startswith(b"HTTP/1.1 200") and b'"finish_reason":"length"' in short_answer
        stream_answer = first + read_all(long_stream)
        events = [ln[6:] for ln in stream_answer.split(b"\n") if ln.startswith(b"data: ")]
        assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
        json_answer = read_all(long_json)
        assert json_answer.startswith(b"HTTP/1.1 503")
        assert json.loads(json_answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "shutting_down"
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    log = srv.proc.stdout.read()
    assert "Traceback" not in log and "Task was destroyed" not in log, log
    lines = log.strip().splitlines()
    assert sum("went away while sending" in ln for ln in lines) == 1, log
    assert sum(signal.Signals(sig).name in ln and "not admitting" in ln for ln in lines) == 1, log
    assert sum("ended by the shutdown" in ln for ln in lines) == 2, log  # the long stream and the long JSON
    assert len(lines) <= 6, log  # the banner, the dropped upload, the signal, two ended requests, "stopped"


def test_8_an_api_key_a_client_cannot_send_is_refused_at_start_up(tiny, capsys):
    from gptkit.cli import main

    assert main(["serve", "--model", str(tiny[0]), "--api-key", " padded "]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "API key" in err and len(err.splitlines()) == 1
    assert main(["serve", "--model", str(tiny[0]), "--api-key", "new\nline"]) == 2


# ----------------------------------------------------------------------------------------------
# 6. limits before tokenizing, and tokenizing off the event loop

class _CountingTokenizer:
    def __init__(self, tok, gate: threading.Event | None = None):
        self.tok, self.gate, self.calls = tok, gate, 0
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, add_special_tokens=False):  # the tokenizer interface (gptkit.tokenizer)
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        return self.tok.encode(text, add_special_tokens=add_special_tokens)


def test_6_limits_are_checked_before_tokenizing(tiny):
    from gptkit.serve import ServeConfig
    from gptkit.serve.protocol import APIError, parse_completion_request

    tok = _CountingTokenizer(tiny[2])
    with pytest.raises(APIError) as e:  # 400k prompts: refused on their number
        parse_completion_request({"prompt": ["x"] * 400_000}, tok, 64, "m", ServeConfig())
    assert e.value.status == 400 and e.value.param == "prompt"
    with pytest.raises(APIError) as e:  # a prompt too long for the context whatever its tokens
        parse_completion_request({"prompt": "word " * 100_000}, tok, 64, "m", ServeConfig())
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert tok.calls == 0


def test_6_health_answers_while_a_prompt_is_being_tokenized(tiny):
    from gptkit.serve import Server

    _, model, tok = tiny
    gate = threading.Event()
    slow = _CountingTokenizer(tok, gate)
    with Server(model, slow, NAME) as s:
        done = []
        t = threading.Thread(target=lambda: done.append(post(s, {"prompt": "tokenize me", "max_tokens": 1},
                                                             key=None)))
        t.start()
        try:
            assert slow.entered.wait(60)  # the handler is inside encode() now
            status, _, body = get(s, "/health", key=None)  # would hang if encode() ran on the event loop
            assert status == 200 and json.loads(body) == {"status": "ok"}
        finally:
            gate.set()
        t.join(60)
        assert done[0][0] == 200


# ----------------------------------------------------------------------------------------------
# 8. network hygiene

def test_8_host_header_must_be_the_bound_host_or_localhost(server):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        status, _, body = get(server, "/v1/models", host=host)
        assert_openai_error(status, body, 400, "invalid_host")
    status, _, body = post(server, {"prompt": "hi", "max_tokens": 1}, host="attacker.test:8000")
    assert_openai_error(status, body, 400, "invalid_host")
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", "[::1]:80"):
        assert get(server, "/v1/models", host=host)[0] == 200


def test_8_allowed_hosts_option(tiny):
    from gptkit.serve.app import _host_name, allowed_hosts

    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("127.0.0.1", ["*"]) is None
    assert allowed_hosts("127.0.0.1", ["api.example", "[::1]"]) == {"api.example", "::1"}
    assert [_host_name(h) for h in ("A.b:80", "[::1]:8000", "::1", "x")] == ["a.b", "::1", "::1", "x"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_8_posts_must_be_json(server, ctype):
    status, _, body = post(server, {"prompt": "hi", "max_tokens": 1}, ctype=ctype)
    assert_openai_error(status, body, 400, "invalid_content_type")
    assert post(server, {"prompt": "hi", "max_tokens": 1}, ctype="application/json; charset=utf-8")[0] == 200


def test_8_non_ascii_key_works_as_utf8_bytes(tiny):
    from gptkit.serve import Server

    _, model, tok = tiny
    key = "clé-ünïcode-🔑"
    with Server(model, tok, NAME, api_key=key) as s:
        assert post(s, {"prompt": "hi", "max_tokens": 1}, key=key.encode("utf-8"))[0] == 200
        assert post(s, {"prompt": "hi", "max_tokens": 1}, key=b"cl\xe9-")[0] == 401
        assert post(s, {"prompt": "hi", "max_tokens": 1}, key=None)[0] == 401


def test_8_cors_is_opt_in(tiny, server):
    from gptkit.serve import Server, ServeConfig

    preflight = (b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n"
                 b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
                 b"Connection: close\r\n\r\n")
    _, headers, _ = raw(server, preflight)
    assert "access-control-allow-origin" not in headers
    _, model, tok = tiny
    with Server(model, tok, NAME, config=ServeConfig(cors_origins=("https://app.example",))) as s:
        status, headers, _ = raw(s, preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        _, headers, _ = raw(s, preflight.replace(b"app.example", b"other.example"))
        assert headers.get("access-control-allow-origin") != "https://other.example"


def test_8_slow_headers_and_slow_bodies_are_cut_off(tiny):
    from gptkit.serve import Server, ServeConfig

    _, model, tok = tiny
    with Server(model, tok, NAME, config=ServeConfig(header_timeout_s=0.5, body_timeout_s=0.5)) as s:
        with socket.create_connection((s.host, s.port), timeout=30) as sock:  # slowloris: headers never end
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert sock.recv(100) == b""  # closed by the server (the socket timeout is 30 s)
        with socket.create_connection((s.host, s.port), timeout=30) as sock:  # a body that never ends
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            answer = b""
            while part := sock.recv(4096):
                answer += part
                if b"body_timeout" in answer:
                    break
            assert answer.startswith(b"HTTP/1.1 400") and b"body_timeout" in answer


# ----------------------------------------------------------------------------------------------
# new: /metrics and /v1/models/{id}

def _metrics(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = get(server, "/metrics")
    assert status == 200
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_metrics_count_requests_tokens_rows_and_latencies(tiny):
    from gptkit.serve import Server

    _, model, tok = tiny
    with Server(model, tok, NAME) as s, Server(model, tok, NAME) as other:  # two in one process: no clash
        assert post(s, {"prompt": "Hello world", "max_tokens": 5, "n": 2})[0] == 200  # 2 prompt tokens, 10 new
        assert post(s, {"prompt": "Hello", "max_tokens": 4, "stream": True})[0] == 200  # 1 + 4
        assert post(s, {"prompt": "Hello", "max_tokens": -1})[0] == 400
        m = _metrics(s)
        assert m['gptkit_requests_total{"route": "/v1/completions", "status": "200"}'] == 2
        assert m['gptkit_requests_total{"route": "/v1/completions", "status": "400"}'] == 1
        assert m["gptkit_prompt_tokens_total{}"] == 3
        assert m["gptkit_generation_tokens_total{}"] == 14
        assert m["gptkit_num_rows_running{}"] == 0 and m["gptkit_num_rows_waiting{}"] == 0
        assert m["gptkit_time_to_first_token_seconds_count{}"] == 2
        assert m["gptkit_e2e_request_latency_seconds_count{}"] == 2
        assert m["gptkit_inter_token_latency_seconds_count{}"] == 14 - 3  # every token after a row's first
        assert _metrics(other)["gptkit_generation_tokens_total{}"] == 0


def test_models_by_id(server):
    status, _, body = get(server, f"/v1/models/{NAME}")
    assert status == 200 and json.loads(body)["id"] == NAME and json.loads(body)["object"] == "model"
    status, _, body = get(server, "/v1/models/gpt-4")
    assert_openai_error(status, body, 404, "model_not_found")
    assert get(server, f"/v1/models/{NAME}", key=None)[0] == 401
    # a completion for another model is a 404 too, as OpenAI answers it
    status, _, body = post(server, {"model": "gpt-4", "prompt": "a", "max_tokens": 1})
    assert_openai_error(status, body, 404, "model_not_found")


def test_a_busy_port_is_one_error_line_before_the_model_loads(capsys):
    from gptkit import cli
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # the model path does not exist: the port is checked first, so the error names the port
        assert cli.main(["serve", "--model", "no/such/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot listen on 127.0.0.1:") and "(--port)" in err


# ----------------------------------------------------------------------------------------------
# new: OpenAI's presence_penalty, frequency_penalty and logit_bias

def test_presence_and_frequency_penalty_match_a_hand_computed_example():
    from gptkit.sample import presence_frequency_penalty

    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5], [1.0, 2.0, 3.0, -1.0, 0.5]])
    counts = torch.tensor([[0, 2, 1, 0, 3], [1, 0, 0, 4, 0]])
    out = presence_frequency_penalty(logits, counts, torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.0]))
    # row 0: j=1: 2 - 0.25*2 - 0.5 = 1.0; j=2: 3 - 0.25 - 0.5 = 2.25; j=4: 0.5 - 0.75 - 0.5 = -0.75
    # row 1: presence -1 raises tokens 0 and 3 by 1 (negative penalties encourage repetition)
    assert out.tolist() == [[1.0, 1.0, 2.25, -1.0, -0.75], [2.0, 2.0, 3.0, 0.0, 0.5]]


def _penalised_greedy(model, tok, prompt: str, n: int, presence: float, frequency: float, bias: dict) -> str:
    """The reference: full recompute each step, OpenAI's formula applied token by token in Python."""
    ids = tok.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1].double().tolist()
            for t, b in bias.items():
                logits[t] += b
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(max(range(len(logits)), key=logits.__getitem__))
    return tok.decode(out)


@pytest.mark.parametrize("presence, frequency, bias", [
    (1.0, 0.0, {}), (0.0, 2.0, {}), (0.5, 1.5, {}), (-2.0, 0.0, {}),
    (0.0, 0.0, {262: 5.0, 11: -100.0}), (0.3, 0.7, {13: 3.0}),
])
def test_penalties_and_logit_bias_follow_openai_semantics(tiny, server, presence, frequency, bias):
    _, model, tok = tiny
    body = {"prompt": "The the the", "max_tokens": 12, "temperature": 0, "presence_penalty": presence,
            "frequency_penalty": frequency, "logit_bias": {str(k): v for k, v in bias.items()}}
    status, _, answer = post(server, body)
    assert status == 200, answer
    want = _penalised_greedy(model, tok, "The the the", 12, presence, frequency, bias)
    assert json.loads(answer)["choices"][0]["text"] == want
    if not (presence or frequency):  # the bias alone changed something, so the test has teeth
        assert want != greedy_reference(model, tok, "The the the", 12)


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {"50257": 1}, {"1": 101}, {"1": "x"}, [1, 2],
                                  {"1": float("nan")}])
def test_bad_logit_bias_is_a_400(server, bias):
    status, _, answer = post(server, json.dumps({"prompt": "hi", "max_tokens": 1, "logit_bias": bias}).encode())
    assert_openai_error(status, answer, 400, None, "logit_bias")

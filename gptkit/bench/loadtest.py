"""`python -m gptkit.bench.loadtest`: many concurrent clients against `gptkit serve`.

Prints requests/s, p50/p99 latency, the batch sizes the server ran (from its `GET /stats`), and the
server's RSS before and after the load. With `--model PATH` it starts `gptkit serve` on a free
loopback port in a subprocess and stops it at the end; with `--url` it uses a running server.

With `--fairness` it measures instead whether long requests can hold the server: it starts
`--long` streaming requests of n=`--long-n` rows and `--long-max-tokens` tokens each (4 x 8 rows fill
the default 32-row batch), waits until all of them generate, then sends `--short` small streaming
requests one after another and reports their time to first token (p50/p99), next to the figures
the server's `GET /metrics` gives (its TTFT histogram, preemptions, tokens, requests by status).

With `--prefill` it measures whether long prompts stall the requests that are decoding: it starts
`--long` streaming requests (short prompts, `--long-max-tokens` tokens each) and, while they stream,
sends `--short` requests with prompts of `--prompt-tokens` random token ids one after another. It
reports the decoding streams' gaps between tokens while the long prompts arrive (p50, p99, max) and
the long prompts' time to first token; compare `--server-args '--prefill-chunk 0'` (whole-prompt
prefills) with the default chunked prefill.

Each client sends its requests one after another (half of the clients stream by default); all
clients start together. A warm-up round (one request per client) comes first, so "RSS before" is
the server's memory once its buffers and thread pools exist, and "after" shows whether serving the
load leaked. The clients use only the standard library, so the figures do not depend on a client
library's overhead.
"""

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path


def _request(url: str, body: dict, api_key: str | None, timeout: float) -> tuple[bool, str]:
    """Send one completion request; (ok, what went wrong). A stream must end with [DONE]."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if body.get("stream"):
                done = False
                for line in r:
                    line = line.strip()
                    if line == b"data: [DONE]":
                        done = True
                    elif line.startswith(b"data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return False, f"error event: {chunk['error'].get('message')}"
                return (True, "") if done else (False, "stream ended without [DONE]")
            d = json.loads(r.read())
            if len(d.get("choices", [])) != body.get("n", 1):
                return False, "wrong number of choices"
            return True, ""
    except urllib.error.HTTPError as e:  # the server's own message says what was wrong with the request
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:
            message = e.reason
        return False, f"HTTP {e.code}: {message}"
    except Exception as e:  # connection reset, timeout, bad JSON: all count as errors
        return False, f"{type(e).__name__}: {e}"


def _get_json(url: str, path: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=30) as r:
        return json.loads(r.read())


def _stream_ttft(url: str, body: dict, api_key: str | None, timeout: float, first: threading.Event | None = None
                 ) -> tuple[float | None, float, str]:
    """Stream one completion: (seconds to its first chunk, seconds to [DONE], error or "")."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers=headers, method="POST")
    t0 = time.perf_counter()
    ttft = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    return ttft, time.perf_counter() - t0, ""
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    if first is not None:
                        first.set()
                if b'"error"' in line:
                    return ttft, time.perf_counter() - t0, "error event"
        return ttft, time.perf_counter() - t0, "stream ended without [DONE]"
    except urllib.error.HTTPError as e:
        return None, time.perf_counter() - t0, f"HTTP {e.code}"
    except Exception as e:  # connection reset, timeout
        return None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"


def read_metrics(url: str, api_key: str | None) -> dict[str, float]:
    """The server's /metrics as {'name{label="v",...}': value} (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return out


def run_fairness(url: str, long: int = 4, long_n: int = 8, long_max_tokens: int = 512, short: int = 20,
                 short_max_tokens: int = 5, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Short requests' time to first token while `long` requests of n=`long_n` rows run."""
    before = read_metrics(url, api_key)
    started = [threading.Event() for _ in range(long)]
    long_results: list[tuple] = []

    def long_client(i: int) -> None:
        body = {"prompt": f"Long request {_letters(i)}:", "max_tokens": long_max_tokens, "n": long_n, "temperature": 1.0}
        long_results.append(_stream_ttft(url, body, api_key, timeout, started[i]))

    threads = [threading.Thread(target=long_client, args=(i,), daemon=True) for i in range(long)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(timeout)
    ttfts, errors, long_done_early = [], [], 0
    for k in range(short):
        ttft, _, err = _stream_ttft(url, {"prompt": f"Short question {_letters(k)}:", "max_tokens": short_max_tokens,
                                          "temperature": 1.0}, api_key, timeout)
        (errors.append(err) if err else ttfts.append(ttft))
        long_done_early = len(long_results)
    during = read_metrics(url, api_key)
    for t in threads:
        t.join(timeout)
    after = read_metrics(url, api_key)

    def delta(name: str, m: dict = after) -> float:
        return m.get(name, 0.0) - before.get(name, 0.0)

    ttft_n = delta("gptkit_time_to_first_token_seconds_count")
    return {
        "long": long, "long_n": long_n, "long_max_tokens": long_max_tokens, "short": short,
        "short_max_tokens": short_max_tokens, "short_answered": len(ttfts), "errors": len(errors),
        "error_kinds": dict(Counter(errors + [e for *_, e in long_results if e])),
        "long_finished_before_shorts_ended": long_done_early,
        "short_ttft_p50_s": _percentile(ttfts, 50) if ttfts else None,
        "short_ttft_p99_s": _percentile(ttfts, 99) if ttfts else None,
        "long_ttft_max_s": max((t for t, *_ in long_results if t is not None), default=None),
        "metrics_rows_running_during": during.get("gptkit_num_rows_running"),
        "metrics_preemptions": delta("gptkit_num_preemptions"),
        "metrics_ttft_mean_s": delta("gptkit_time_to_first_token_seconds_sum") / ttft_n if ttft_n else None,
        "metrics_generation_tokens": delta("gptkit_generation_tokens_total"),
        "metrics_requests_200": delta('gptkit_requests_total{route="/v1/completions",status="200"}'),
    }


def run_prefill(url: str, streams: int = 4, stream_max_tokens: int = 512, long: int = 4, prompt_tokens: int = 512,
                vocab: int = 50257, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Decoding streams' inter-token gaps while `long` prompts of `prompt_tokens` tokens arrive."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    stop, started = threading.Event(), [threading.Event() for _ in range(streams)]
    arrivals: list[list[float]] = [[] for _ in range(streams)]

    def stream(i: int) -> None:
        body = {"prompt": f"Stream {_letters(i)}:", "max_tokens": stream_max_tokens, "temperature": 1.0, "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                for line in r:  # each event carries one token's text (or nothing yet)
                    if line.startswith(b"data: "):
                        arrivals[i].append(time.perf_counter())
                        started[i].set()
                    if stop.is_set() or line.strip() == b"data: [DONE]":
                        return  # closing the connection frees the row
        except Exception:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(timeout)
    rng = random.Random(0)
    t0, ttfts, errors = time.perf_counter(), [], []
    for k in range(long):
        ids = [rng.randrange(vocab) for _ in range(prompt_tokens)]
        ttft, _, err = _stream_ttft(url, {"prompt": ids, "max_tokens": 2, "temperature": 1.0}, api_key, timeout)
        (errors.append(err) if err else ttfts.append(ttft))
    t1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout)
    gaps = [b - a for ts in arrivals for a, b in zip(ts, ts[1:]) if b > t0 and a < t1]
    cut = sum(len(ts) > 0 and ts[-1] < t1 for ts in arrivals)
    return {"streams": streams, "long": long, "prompt_tokens": prompt_tokens, "errors": len(errors),
            "error_kinds": dict(Counter(errors)), "streams_ended_early": cut, "gaps": len(gaps),
            "gap_p50_s": _percentile(gaps, 50) if gaps else None, "gap_p99_s": _percentile(gaps, 99) if gaps else None,
            "gap_max_s": max(gaps, default=None), "long_ttft_p50_s": _percentile(ttfts, 50) if ttfts else None,
            "long_ttft_max_s": max(ttfts, default=None), "window_s": t1 - t0}


def format_prefill(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f} s"  # noqa: E731
    return "\n".join([
        f"{r['streams']} decoding streams; {r['long']} prompts of {r['prompt_tokens']} tokens sent one after another "
        f"({r['window_s']:.1f} s), errors {r['errors']}" + (f" {r['error_kinds']}" if r["errors"] else ""),
        f"decoding streams' gaps between tokens meanwhile ({r['gaps']}): p50 {f(r['gap_p50_s'])}, "
        f"p99 {f(r['gap_p99_s'])}, max {f(r['gap_max_s'])}",
        f"long prompts' time to first token: p50 {f(r['long_ttft_p50_s'])}, max {f(r['long_ttft_max_s'])}",
    ])


def format_fairness(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f} s"  # noqa: E731
    return "\n".join([
        f"{r['long']} long streaming requests (n={r['long_n']}, max_tokens {r['long_max_tokens']}) running; "
        f"{r['short']} short ones (max_tokens {r['short_max_tokens']}) sent one after another",
        f"short requests answered {r['short_answered']}, errors {r['errors']}"
        + (f" {r['error_kinds']}" if r["errors"] else "")
        + f"; long requests finished before the last short one: {r['long_finished_before_shorts_ended']}",
        f"short time to first token: p50 {f(r['short_ttft_p50_s'])}, p99 {f(r['short_ttft_p99_s'])}",
        f"/metrics: rows running during the shorts {r['metrics_rows_running_during']}, preemptions "
        f"{r['metrics_preemptions']:.0f}, mean TTFT (all requests) {f(r['metrics_ttft_mean_s'])}, tokens generated "
        f"{r['metrics_generation_tokens']:.0f}, completions answered 200: {r['metrics_requests_200']:.0f}",
    ])


def _percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _letters(n: int) -> str:
    """A number spelled in letters (0 -> a, 1 -> b, ...): the main job's char model has no digits."""
    return "".join("abcdefghij"[int(d)] for d in str(n))


def default_prompt(c: int, r: int) -> str:
    """Client c's r-th prompt, distinct per request and written in letters only, so that a char model
    trained on tiny Shakespeare (no digits in its vocab) reads it too."""
    return f"Client {_letters(c)} asks question {_letters(r)}:"


def run_load(url: str, clients: int = 50, requests: int = 5, max_tokens: int = 16, api_key: str | None = None,
             stream: str = "half", timeout: float = 300.0, warmup: bool = True, prompt: str | None = None) -> dict:
    """Run the load against a server at `url`; return the figures as a dict. `prompt`: one prompt
    for every request (default: default_prompt's)."""
    def body(c: int, r: int) -> dict:
        streamed = stream == "all" or (stream == "half" and c % 2 == 1)
        return {"prompt": prompt if prompt is not None else default_prompt(c, r), "max_tokens": max_tokens,
                "temperature": 1.0, "stream": streamed}

    def round_of(n_requests: int) -> tuple[list[float], list[str], float]:
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client(c: int) -> None:
            start.wait()
            for r in range(n_requests):
                t0 = time.perf_counter()
                ok, why = _request(url, body(c, r), api_key, timeout)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else errors.append(why))

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout * n_requests)
        return latencies, errors, time.perf_counter() - t0

    rss_start = _get_json(url, "/stats", api_key).get("rss_bytes")
    if warmup:
        round_of(1)
    before = _get_json(url, "/stats", api_key)
    lat, errors, wall = round_of(requests)
    after = _get_json(url, "/stats", api_key)
    sizes = Counter({int(k): v for k, v in after["batch_sizes"].items()})
    sizes.subtract({int(k): v for k, v in before["batch_sizes"].items()})
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    passes = sum(sizes.values())
    return {
        "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens, "stream": stream,
        "answered": len(lat), "errors": len(errors), "error_kinds": dict(Counter(errors)),
        "wall_s": wall, "requests_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_latency_s": _percentile(lat, 50) if lat else None, "p99_latency_s": _percentile(lat, 99) if lat else None,
        "batch_sizes": sizes, "mean_batch": sum(k * v for k, v in sizes.items()) / passes if passes else 0.0,
        "max_batch_seen": max(sizes, default=0),
        "rss_start_bytes": rss_start, "rss_before_bytes": before.get("rss_bytes"),
        "rss_after_bytes": after.get("rss_bytes"),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gptkit serve` in a subprocess on a free loopback port: `with ServerProcess(model) as url: ...`."""

    def __init__(self, model: str, api_key: str | None = None, extra_args: list[str] | None = None,
                 start_timeout: float = 180.0, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "gptkit", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), *(extra_args or [])]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, **(env or {})}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptkit serve exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("gptkit serve did not answer /health in time")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def format_report(r: dict) -> str:
    mb = lambda b: "?" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"{r['clients']} clients x {r['requests_per_client']} requests, max_tokens {r['max_tokens']}, "
        f"stream {r['stream']}",
        f"answered {r['answered']}, errors {r['errors']}",
        *(f"  {n} x {why}" for why, n in r["error_kinds"].items()),
        f"requests/s {r['requests_per_s']:.2f} (wall {r['wall_s']:.2f} s)",
        f"latency p50 {r['p50_latency_s']:.3f} s, p99 {r['p99_latency_s']:.3f} s" if r["answered"] else "latency -",
        f"batch sizes seen (rows per forward pass: count) {r['batch_sizes']}; mean {r['mean_batch']:.1f}, "
        f"max {r['max_batch_seen']}",
        f"server RSS: at start {mb(r['rss_start_bytes'])}, before load (after warm-up) {mb(r['rss_before_bytes'])}, "
        f"after load {mb(r['rss_after_bytes'])}",
    ]
    if r["rss_before_bytes"] and r["rss_after_bytes"]:
        lines[-1] += f" ({100 * (r['rss_after_bytes'] / r['rss_before_bytes'] - 1):+.1f}%)"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptkit.bench.loadtest", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="start `gptkit serve --model MODEL` on a free loopback port")
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=5, help="requests per client, sent one after another")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream", choices=["none", "half", "all"], default="half")
    p.add_argument("--prompt", help="one prompt for every request (default: 'Client <c> asks question <r>:' "
                                    "in letters)")
    p.add_argument("--server-args", default="", help="extra `gptkit serve` options, e.g. '--max-batch 64'")
    p.add_argument("--fairness", action="store_true", help="measure short requests' TTFT while long ones run")
    p.add_argument("--long", type=int, default=4, help="--fairness: long streaming requests (default 4)")
    p.add_argument("--long-n", type=int, default=8, help="--fairness: rows (n) per long request (default 8)")
    p.add_argument("--long-max-tokens", type=int, default=512, help="--fairness: tokens per long row (default 512)")
    p.add_argument("--short", type=int, default=20, help="--fairness: short requests, one after another")
    p.add_argument("--prefill", action="store_true", help="measure decoding streams' inter-token gaps while "
                   "long prompts arrive (--long streams, --short prompts of --prompt-tokens tokens)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="--prefill: tokens per long prompt (default 512)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    a = p.parse_args(argv)
    if a.clients < 1 or a.requests < 1:
        p.error("--clients and --requests must be >= 1")

    def go(url: str) -> dict:
        if a.prefill:
            return run_prefill(url, a.long, a.long_max_tokens, a.short, a.prompt_tokens, api_key=a.api_key)
        if a.fairness:
            return run_fairness(url, a.long, a.long_n, a.long_max_tokens, a.short, a.max_tokens, a.api_key)
        return run_load(url, a.clients, a.requests, a.max_tokens, a.api_key, a.stream, prompt=a.prompt)

    if a.model:
        with ServerProcess(a.model, a.api_key, a.server_args.split()) as srv:
            r = go(srv.url)
    else:
        r = go(a.url.rstrip("/"))
    fmt = format_prefill if a.prefill else format_fairness if a.fairness else format_report
    print(json.dumps(r) if a.json else fmt(r))
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

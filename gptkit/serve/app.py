"""The HTTP side of `gptkit serve`: FastAPI routes, server-sent events and start-up.

Routes (INTERFACES.md, "Server"): `GET /health` 200; `GET /v1/models` lists the one model;
`POST /v1/completions` answers with OpenAI's JSON, or with server-sent events when `stream` is set;
`GET /stats` (an extension) reports the batch sizes seen, the queue and the server's RSS. Errors
are OpenAI's error JSON (`gptkit.serve.protocol`).

A handler reads and checks the request (`protocol`), submits it to the scheduler thread as a `Job`
(`scheduler`) and awaits its events, which cross from that thread to the event loop through
`call_soon_threadsafe`. A client that disconnects cancels its rows.

The model is the fp32 inference copy (`gptkit.quantize`, weights transposed for decoding and an
lm_head that can compute only the top-k logits), or its bf16/int8 copy with `--dtype`.

FastAPI and uvicorn are the `serve` extra; they are imported only when a server is built.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from gptkit.errors import GptkitError
from gptkit.inference import load_for_inference
from gptkit.runtime import setup_threads
from gptkit.serve.config import ServeConfig
from gptkit.serve.protocol import (MAX_BODY, APIError, _SafeTokenizer, body_too_large, check_api_key, completion_choice,
                                   completion_chunk, completion_response, decode_json, generation_failed, models_list,
                                   parse_completion_request, route_error, token_usage)
from gptkit.serve.scheduler import Job, Scheduler


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None):
    """The FastAPI application around a started scheduler."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = scheduler.config
    tokenizer = _SafeTokenizer(scheduler.tokenizer)
    block_size = scheduler.model.config.block_size
    app = FastAPI(title="gptkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    started = int(time.time())

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(APIError)  # Overloaded too: handlers are looked up along the exception's classes
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(route_error(e.status_code, request.method, request.url.path, e.detail))

    def check_key(request: Request) -> None:
        check_api_key(request.headers.get("authorization", ""), api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request)
        return scheduler.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return models_list(model_name, started)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = decode_json(await _read_body(request))
        req = parse_completion_request(body, tokenizer, block_size, model_name, config)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = [p for p in req.prompts for _ in range(req.n)]  # row = prompt * n + choice
        job = Job(rows, req.params, lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        scheduler.submit(job)  # raises Overloaded (503) when full
        answer = _Answer(request, scheduler, job, events, model_name,
                         prompt_tokens=sum(len(p) for p in req.prompts))  # once per prompt, whatever n is
        if req.stream:
            return StreamingResponse(answer.sse(req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await answer.json()

    return app


async def _read_body(request) -> bytes:
    """The request body, read up to MAX_BODY bytes whatever Content-Length says."""
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise body_too_large()
    return bytes(raw)


class _Answer:
    """One submitted job's answer, as one JSON object or as server-sent events. Either way, a job
    whose answer ends before its last row finished (an error, or the client went away) is cancelled,
    so its rows leave the batch."""

    def __init__(self, request, scheduler: Scheduler, job: Job, events: asyncio.Queue, model_name: str,
                 prompt_tokens: int):
        self.request, self.scheduler, self.job, self.events = request, scheduler, job, events
        self.rid, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.prompt_tokens = prompt_tokens
        self.left = job.rows  # rows not finished yet

    def usage(self) -> dict:
        return token_usage(self.prompt_tokens, self.job.completion_tokens)

    async def json(self) -> dict | None:
        """The whole completion (None if the client went away first)."""
        texts = [[] for _ in range(self.job.rows)]
        reasons: list[str | None] = [None] * self.job.rows
        try:
            async with contextlib.aclosing(_job_events(self.request, self.events)) as batches:
                async for item in batches:
                    if isinstance(item, BaseException):
                        raise generation_failed(item)
                    for ev in item:
                        texts[ev.index].append(ev.text)
                        if ev.finished:
                            reasons[ev.index] = ev.finish_reason or "length"
                            self.left -= 1
                    if not self.left:
                        break
        finally:
            if self.left:
                self.scheduler.cancel(self.job)
        if self.left:
            return None
        choices = [completion_choice(i, "".join(t), reasons[i]) for i, t in enumerate(texts)]
        return completion_response(self.rid, self.created, self.model, choices, self.usage())

    async def sse(self, include_usage: bool):
        """Server-sent events: one chunk per row and step with new text (a row's last chunk carries its
        finish_reason), then a usage chunk if `stream_options.include_usage`, then `data: [DONE]`."""
        def chunk(choices, usage=None) -> str:
            d = completion_chunk(self.rid, self.created, self.model, choices, include_usage, usage)
            return _sse_event(d)

        try:
            async with contextlib.aclosing(_job_events(self.request, self.events)) as batches:
                async for item in batches:
                    if isinstance(item, BaseException):
                        yield _sse_event(generation_failed(item).body())
                        return
                    # one choice per chunk, as OpenAI streams n > 1 (clients read chunk.choices[0])
                    out = []
                    for ev in item:
                        reason = ev.finish_reason if ev.finished else None
                        out.append(chunk([completion_choice(ev.index, ev.text, reason)]))
                        self.left -= ev.finished
                    yield "".join(out)
                    if not self.left:
                        break
            if self.left:
                return  # the client went away; `finally` frees its rows
            if include_usage:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            if self.left:
                self.scheduler.cancel(self.job)


def _sse_event(data: dict) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n"


async def _job_events(request, events: asyncio.Queue):
    """A job's event batches as the scheduler sends them; ends early, without error, when the
    client closes the connection (the caller then frees the job's rows)."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait([getter, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return
            yield getter.result()
    finally:
        watcher.cancel()


async def _wait_disconnect(request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


# ----------------------------------------------------------------------------------------------
# building and running a server

def default_model_name(model_path: str) -> str:
    """The model's id in the API when --model-name is not given: the model path's base name."""
    return Path(str(model_path).rstrip("/")).name or str(model_path)


def load_for_serving(model_path: str, vocab: str | None = None, device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer, default model name) for `model_path`: `load_for_inference` plus the name
    the API shows when no --model-name is given."""
    model, tok = load_for_inference(model_path, vocab, device, dtype)
    return model, tok, default_model_name(model_path)


class Server:
    """A uvicorn server on its own thread, e.g. for tests: `with Server(model, tok) as s: s.url`."""

    def __init__(self, model, tokenizer, model_name: str = "gptkit", api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, config: ServeConfig | None = None):
        import uvicorn

        self.scheduler = Scheduler(model, tokenizer, config).start()
        self.app = create_app(self.scheduler, model_name, api_key)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.scheduler.stop()
        self.sock.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, config: ServeConfig | None = None, vocab: str | None = None,
          device: str = "auto", dtype: str = "float32", threads: int = 0) -> None:
    """`gptkit serve`: load the model and serve it until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise GptkitError("the server needs FastAPI and uvicorn", "serve",
                          "pip install 'gptkit[serve]' (or: pip install fastapi uvicorn)") from None

    config = config or ServeConfig()
    if not 0 <= port <= 65535:
        raise GptkitError(f"must be in 0..65535, got {port}", "--port", "pick a free port, e.g. 8000")
    if api_key is not None and not api_key.strip():
        raise GptkitError("the API key is empty", "--api-key", "give a non-empty key or leave the option out")
    if threads < 0:
        raise GptkitError(f"must be >= 0, got {threads}", "--threads", "0 keeps PyTorch's default")
    setup_threads(threads)
    model, tok, default_name = load_for_serving(model_path, vocab, device, dtype)
    name = model_name or default_name
    scheduler = Scheduler(model, tok, config).start()
    app = create_app(scheduler, name, api_key)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} ({model.serving_num_params:,} parameters, {dtype}) on http://{shown}:{port}/v1 "
          f"(max batch {config.max_batch}, queue {config.queue_size}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    finally:
        scheduler.stop()

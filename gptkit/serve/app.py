"""The HTTP side of `gptkit serve`: FastAPI routes, server-sent events, start-up and shutdown.

Routes (INTERFACES.md, "Server"): `GET /` the playground page (assets in `gptkit/serve/static`, no
network needed); `GET /health` 200; `GET /v1/models` lists the one model, `GET /v1/models/{id}`
shows it; `POST /v1/completions` and `POST /v1/chat/completions` answer with OpenAI's JSON, or
with server-sent events when `stream` is set; vLLM's `POST /tokenize`, `POST /detokenize` and
`GET /tokenizer_info` serve lm-eval's remote tokenizer; `GET /metrics` Prometheus text; `GET /stats` (an extension) reports the batch sizes
seen, the queue and the server's RSS. Errors are OpenAI's error JSON (`gptkit.serve.protocol`).

A handler reads the body (within `body_timeout_s`), checks it and tokenizes it off the event loop
(`protocol`), submits it to the scheduler thread as a `Job` (`scheduler`) and awaits its events,
which cross from that thread to the event loop through `call_soon_threadsafe`. A client that
disconnects cancels its rows, or its place in the queue.

Network hygiene, in one ASGI layer (`_Guard`) before any route: the Host header must be one the
server answers to (DNS rebinding), a POST must be `application/json` (so a web page cannot send one
without a CORS preflight), CORS headers only for `--cors-origin`; uvicorn closes connections whose
headers take longer than `header_timeout_s` (slowloris) or that idle past `idle_timeout_s`.

Start-up and shutdown are `gptkit.serve.server`'s.

FastAPI, uvicorn and prometheus_client (the `serve` extra) are imported only when a server is built.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path

from gptkit.serve.metrics import ServeMetrics
from gptkit.serve.protocol import (MAX_BODY, APIError, ShuttingDown, _SafeTokenizer, api_error, body_too_large,
                                   check_api_key, completion_choice, completion_chunk, completion_response,
                                   decode_json, legacy_logprobs, model_card, models_list, parse_completion_request,
                                   route_error, token_usage)
from gptkit.serve.protocol import (chat_chunk, chat_choice, chat_delta, chat_response, detokenize,
                                   parse_chat_request, tokenize, tokenizer_info)
from gptkit.serve.scheduler import Job, Scheduler

log = logging.getLogger("gptkit.serve")
STATIC = Path(__file__).parent / "static"
ROUTES = ("/", "/health", "/stats", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
          "/detokenize", "/tokenizer_info")  # metric labels; others: "other"


class _ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


def allowed_hosts(bound: str, given=None) -> set[str] | None:
    """The Host header values (without port) the server answers to; None: any. Default: the bound
    host and localhost; a wildcard bind (0.0.0.0, ::) answers to any name, as it listens on all."""
    if given:
        hosts = {h.strip().lower().strip("[]") for h in given}
        return None if "*" in hosts else hosts
    if bound in ("0.0.0.0", "::", ""):
        return None
    return {bound.lower().strip("[]"), "localhost", "127.0.0.1", "::1"}


def _host_name(host: str) -> str:
    """A Host header without its port: 'a.b:8000' -> 'a.b', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """The ASGI layer in front of the app: Host check, JSON-only POSTs, and requests counted by
    route and status for /metrics. Its errors are OpenAI's error JSON."""

    def __init__(self, app, hosts: set[str] | None, metrics):
        self.app, self.hosts, self.metrics = app, hosts, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        route = scope["path"] if scope["path"] in ROUTES else ("/v1/models/{id}" if scope["path"].startswith(
            "/v1/models/") else "other")
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        err = None
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            err = APIError(400, f"this server does not answer to the host '{host[:100]}' (see --allowed-hosts)",
                           None, "invalid_host")
        elif scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                err = APIError(400, "the request body must be JSON, sent with 'Content-Type: application/json'",
                               None, "invalid_content_type")
        try:
            if err is not None:
                await _send_error(counted, err)
            else:
                await self.app(scope, receive, counted)
        finally:
            if status[0]:
                self.metrics.request(route, status[0])


async def _send_error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers() or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None, host: str = "127.0.0.1"):
    """The ASGI application around a started scheduler (FastAPI routes behind `_Guard`); its
    `.state` holds the scheduler and the metrics."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = scheduler.config
    tokenizer = _SafeTokenizer(scheduler.tokenizer)
    block_size = scheduler.model.config.block_size
    metrics = ServeMetrics(scheduler)
    app = FastAPI(title="gptkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    started = int(time.time())

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(APIError)  # Overloaded too: handlers are looked up along the exception's classes
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(route_error(e.status_code, request.method, request.url.path, e.detail))

    @app.exception_handler(_ClientGone)
    async def _client_gone(request, e):
        log.warning("client %s went away while sending its request (%s bytes received)",
                    _client(request), e.args[0] if e.args else "?")
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return error_response(api_error(e))

    def check_key(request: Request) -> None:
        raw = dict(request.scope["headers"]).get(b"authorization", b"")
        check_api_key(raw, api_key)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise StarletteHTTPException(404)
        return FileResponse(path)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request)
        return scheduler.stats()

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_key(request)
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return models_list(model_name, started, _has_chat_template(scheduler))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        return model_card(model_name, started, model_id, _has_chat_template(scheduler))

    _tokenizer_routes(app, check_key, tokenizer, block_size, config.body_timeout_s)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion_request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, parse_chat_request, chat=True)

    async def answer(request: Request, parse, chat: bool):
        check_key(request)
        if scheduler.draining:  # before reading anything
            raise ShuttingDown()
        body = decode_json(await _read_body(request, config.body_timeout_s))
        # limits are checked first, then the prompts tokenized, off the event loop
        req = await asyncio.to_thread(parse, body, tokenizer, block_size, model_name, config)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = [p for p in req.prompts for _ in range(req.n)]  # row = prompt * n + choice
        job = Job(rows, req.params, lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        if req.echo and req.logprobs is not None:
            job.prompt_logprobs = req.logprobs
        scheduler.submit(job)  # raises Overloaded or ShuttingDown (503) when it cannot take it
        prompt_tokens = sum(len(p) for p in req.prompts)  # once per prompt, whatever n is
        metrics.prompt_tokens(prompt_tokens)
        ans = _Answer(request, scheduler, job, events, model_name, prompt_tokens, req, tokenizer, chat)
        if req.stream:
            return StreamingResponse(ans.sse(req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await ans.json()

    wrapped = app
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(app, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])
    guard = _Guard(wrapped, allowed_hosts(host, config.allowed_hosts), metrics)
    guard.state = app.state
    return guard


def _has_chat_template(scheduler: Scheduler) -> bool:
    """Whether /v1/chat/completions works (the model's tokenizer has a chat template)."""
    return getattr(scheduler.tokenizer, "chat_template", None) is not None


def _tokenizer_routes(app, check_key, tokenizer, block_size: int, body_timeout: float) -> None:
    """vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (lm-eval's remote tokenizer)."""
    from fastapi import Request

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        check_key(request)
        body = decode_json(await _read_body(request, body_timeout))
        return await asyncio.to_thread(tokenize, body, tokenizer, block_size)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        check_key(request)
        body = decode_json(await _read_body(request, body_timeout))
        return await asyncio.to_thread(detokenize, body, tokenizer)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request):
        check_key(request)
        return tokenizer_info(tokenizer, block_size)


def _client(request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "?"


async def _read_body(request, timeout: float) -> bytes:
    """The request body, read up to MAX_BODY bytes whatever Content-Length says, within `timeout`
    seconds. A client that goes away raises _ClientGone."""
    from starlette.requests import ClientDisconnect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    raw = bytearray()
    parts = request.stream().__aiter__()
    try:
        while True:
            try:
                part = await asyncio.wait_for(parts.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(400, f"the request body did not arrive within {timeout:g} s", None,
                               "body_timeout") from None
            raw += part
            if len(raw) > MAX_BODY:
                raise body_too_large()
    except ClientDisconnect:
        raise _ClientGone(len(raw)) from None
    return bytes(raw)


class _Answer:
    """One submitted job's answer, as one JSON object or as server-sent events. Either way, a job
    whose answer ends before its last row finished (an error, or the client went away) is cancelled,
    so its rows leave the batch."""

    def __init__(self, request, scheduler: Scheduler, job: Job, events: asyncio.Queue, model_name: str,
                 prompt_tokens: int, req=None, tokenizer=None, chat: bool = False):
        self.request, self.scheduler, self.job, self.events = request, scheduler, job, events
        self.chat = chat
        self.rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), model_name
        self.prompt_tokens = prompt_tokens
        self.left = job.rows  # rows not finished yet
        self.req, self.tokenizer = req, tokenizer
        self.want_logprobs = req is not None and req.logprobs is not None
        # per row: generated (token, logprob, top) when logprobs were asked for
        self.scores: list[list] = [[] for _ in range(job.rows)]

    def choice(self, row: int, text: str, reason: str | None) -> dict:
        """One row's whole choice: with echo the prompt's text (and tokens) come first; with logprobs
        OpenAI's legacy object, offsets counted in this choice's text."""
        if self.chat:
            return chat_choice(row, text, reason)
        req, tok = self.req, self.tokenizer
        p = row // req.n if req is not None else 0
        prompt_text = ""
        if req is not None and req.echo:
            prompt_text = req.texts[p] if req.texts[p] is not None else tok.decode(req.prompts[p])
        c = completion_choice(row, prompt_text + text, reason)
        if self.want_logprobs:
            ids, lps, tops = [], [], []
            if req.echo:
                ids = list(req.prompts[p])
                lps, tops = map(list, self.job.scored[row]) if row in self.job.scored else (
                    [None] * len(ids), [None] * len(ids))
            for t, lp, top in self.scores[row]:
                ids.append(t)
                lps.append(lp)
                tops.append(top)
            c["logprobs"] = legacy_logprobs(tok, ids, lps, tops)
        return c

    def usage(self) -> dict:
        return token_usage(self.prompt_tokens, self.job.completion_tokens)

    def failed(self, e: BaseException) -> APIError:
        err = api_error(e)
        if isinstance(err, ShuttingDown):
            log.warning("request %s from %s ended by the shutdown", self.rid, _client(self.request))
        return err

    async def json(self) -> dict | None:
        """The whole completion (None if the client went away first)."""
        texts = [[] for _ in range(self.job.rows)]
        reasons: list[str | None] = [None] * self.job.rows
        try:
            async with contextlib.aclosing(_job_events(self.request, self.events)) as batches:
                async for item in batches:
                    if isinstance(item, BaseException):
                        raise self.failed(item)
                    for ev in item:
                        texts[ev.index].append(ev.text)
                        if ev.logprob is not None:
                            self.scores[ev.index].append((ev.token, ev.logprob, ev.top_logprobs))
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
        choices = [self.choice(i, "".join(t), reasons[i]) for i, t in enumerate(texts)]
        return (chat_response if self.chat else completion_response)(self.rid, self.created, self.model, choices,
                                                                     self.usage())

    def streamed_choice(self, ev, first: bool) -> dict:
        """One event as a streamed choice: a chat `delta`, or a completion's text (with its token's
        legacy logprobs when asked for)."""
        reason = ev.finish_reason if ev.finished else None
        if self.chat:
            return chat_delta(ev.index, ev.text, reason, first)
        c = completion_choice(ev.index, ev.text, reason)
        if self.want_logprobs:
            got = ev.logprob is not None
            c["logprobs"] = legacy_logprobs(self.tokenizer, [ev.token] if got else [], [ev.logprob] if got else [],
                                            [ev.top_logprobs] if got else [])
        return c

    async def sse(self, include_usage: bool):
        """Server-sent events: one chunk per row and step with new text (a row's last chunk carries its
        finish_reason), then a usage chunk if `stream_options.include_usage`, then `data: [DONE]`.
        An error after the 200 is an error event, then [DONE]."""
        def chunk(choices, usage=None) -> str:
            d = (chat_chunk if self.chat else completion_chunk)(self.rid, self.created, self.model, choices,
                                                               include_usage, usage)
            return _sse_event(d)

        started = set()  # chat rows that sent their first chunk (it names the role)

        try:
            async with contextlib.aclosing(_job_events(self.request, self.events)) as batches:
                async for item in batches:
                    if isinstance(item, BaseException):
                        yield _sse_event(self.failed(item).body()) + "data: [DONE]\n\n"
                        return
                    # one choice per chunk, as OpenAI streams n > 1 (clients read chunk.choices[0])
                    out = []
                    for ev in item:
                        out.append(chunk([self.streamed_choice(ev, ev.index not in started)]))
                        started.add(ev.index)
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
    getter = None
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait([getter, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                return
            yield getter.result()
    finally:
        # cancel and await both, so no task is left pending ("Task was destroyed but it is pending!")
        for t in (getter, watcher):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


async def _wait_disconnect(request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return

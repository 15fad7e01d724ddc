"""`gptkit serve`: an OpenAI-compatible completion server that batches concurrent requests.

Layout (INTERFACES.md, "Server"):
- `GET /health` 200; `GET /v1/models` lists the one model; `POST /v1/completions` takes OpenAI's
  completion fields and answers with OpenAI's JSON, or with server-sent events when `stream` is set.
  `GET /stats` (an extension) reports the batch sizes seen, the queue and the server's RSS.
- Errors are `{"error": {"message", "type", "param", "code"}}` with 400, 401, 404 or 503.

How requests are served:
- One `Scheduler` thread owns the model. HTTP handlers tokenize and validate a request, then hand it
  over as a `Job` (one row per prompt x n) and await its events; they never touch the model.
- The engine (`gptkit.generate.Generation`) runs one batch, one token per row per step, and the
  scheduler keeps a single one running for the server's life. A request that arrives while it runs
  joins it at the next step (continuous batching, as vLLM does): the engine prefills the newcomers
  and merges their keys and values into the running cache; finished and cancelled rows leave it.
  When nothing runs, requests arriving within `batch_wait_s` of each other start together.
- The model is the fp32 inference copy (`gptkit.quantize`, weights transposed for decoding and an
  lm_head that can compute only the top-k logits), or its bf16/int8 copy with `--dtype`.
- At most `max_batch` rows run at once; at most `queue_size` requests wait. Past that the server
  answers 503 instead of queueing without limit.
- Events cross from the scheduler thread to the event loop through `call_soon_threadsafe` into an
  unbounded per-request queue (bounded in practice by max_tokens), so a slow client never blocks
  the scheduler. A client that disconnects cancels its rows, which leave the batch at the next step.

FastAPI and uvicorn are the `serve` extra; they are imported only when a server is built.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import asyncio
import contextlib
import hmac
import json
import os
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gptkit.errors import GptkitError


# ----------------------------------------------------------------------------------------------
# settings and errors

@dataclass
class ServeConfig:
    """Server limits. Invalid values fail early, naming the CLI option."""

    max_batch: int = 32  # rows (prompts x n) generated at once
    queue_size: int = 256  # requests waiting for a free row; more get 503
    max_cohorts: int = 4  # ignored: kept so that old configurations and --max-cohorts still work
    batch_wait_s: float = 0.002  # when idle, gather requests arriving this close together
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions

    def __post_init__(self):
        for name, opt in (("max_batch", "--max-batch"), ("queue_size", "--queue-size"),
                          ("max_cohorts", "--max-cohorts"), ("max_tokens_limit", "--max-tokens-limit")):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GptkitError(f"must be an integer >= 1, got {v!r}", opt, "give a positive whole number")
        if not self.batch_wait_s >= 0:
            raise GptkitError(f"must be >= 0, got {self.batch_wait_s!r}", "--batch-wait-ms",
                              "give 0 or more milliseconds")


MAX_BODY = 4 << 20  # bytes of JSON a request may send


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class Overloaded(Exception):
    pass


def rss_bytes() -> int | None:
    """This process's resident set size, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------
# the scheduler: one thread, the only user of the model

@dataclass
class Update:
    """What one step produced for one row of a job (sent from the scheduler thread)."""

    row: int
    text: str
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0  # set when finished


@dataclass
class Job:
    """One HTTP request: its rows (prompt token ids + sampling settings) and where updates go.
    `sink(updates)` is called from the scheduler thread with a list of `Update`s, or with an
    exception if generation failed."""

    prompts: list[list[int]]
    params: list[Any]  # SamplingParams, one per row
    sink: Callable[[Any], None]
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    left: int = 0  # rows still running (scheduler thread)

    @property
    def rows(self) -> int:
        return len(self.prompts)


class Scheduler:
    """Owns the model; admits jobs from a bounded queue into the one running batch and steps it.

    submit() and cancel() may be called from any thread; everything else runs on the scheduler
    thread started by start()."""

    def __init__(self, model, tokenizer, config: ServeConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or ServeConfig()
        self.waiting: deque[Job] = deque()
        self.gen = self._new_generation()
        self.owners: dict[int, tuple[Job, int]] = {}  # generation index -> (job, row in job); scheduler thread
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.paused = threading.Event()  # tests: hold admission while requests pile up
        self.paused.set()
        # statistics (read by /stats, under cond)
        self.running_rows = 0
        self.batch_sizes: Counter[int] = Counter()  # rows in one forward pass -> how many passes
        self.step_sizes: Counter[int] = Counter()  # rows given a token in one step -> how many steps
        self.steps = 0  # forward passes
        self.jobs_done = 0
        self.jobs_rejected = 0
        self.max_waiting = 0

    def _new_generation(self):
        from gptkit.generate import Generation

        return Generation(self.model, [], [], self.tokenizer)

    # -- any thread -------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self.thread = threading.Thread(target=self._run, name="gptkit-scheduler", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.paused.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; raise Overloaded when the queue is full."""
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down")
            if len(self.waiting) >= self.config.queue_size:
                self.jobs_rejected += 1
                raise Overloaded(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.max_waiting = max(self.max_waiting, len(self.waiting))
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): waiting, it is never started; running, its rows leave
        the batch at the next step."""
        job.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"batch_sizes": sizes, "max_batch_seen": max(sizes, default=0), "forward_passes": self.steps,
                    "step_sizes": dict(sorted(self.step_sizes.items())),
                    "requests_done": self.jobs_done, "requests_rejected": self.jobs_rejected,
                    "waiting": len(self.waiting), "max_waiting": self.max_waiting,
                    "running_rows": self.running_rows, "rss_bytes": rss_bytes()}

    # -- scheduler thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                admit = self._admissible_locked()
                while not self.stopping and not self.owners and not admit:
                    self.cond.wait(self._wait_time_locked())
                    admit = self._admissible_locked()
                if self.stopping:
                    break
            if admit:
                self._admit(admit)
            if self.owners:
                self._step()
        # shutting down: tell everyone still running or waiting
        self._fail(self._running_jobs(), RuntimeError("the server shut down"))
        for j in self.waiting:
            self._deliver(j, RuntimeError("the server shut down"))

    def _running_jobs(self) -> list[Job]:
        return list({id(j): j for j, _ in self.owners.values()}.values())

    def _wait_time_locked(self) -> float | None:
        """How long an idle scheduler may sleep: until the gather window of the oldest waiting job ends."""
        live = [j for j in self.waiting if not j.cancelled]
        if not live or not self.paused.is_set():
            return 0.05 if live else None
        return max(0.0, live[0].arrived + self.config.batch_wait_s - time.monotonic()) + 1e-4

    def _admissible_locked(self) -> list[Job]:
        """Take the waiting jobs that may start now (FIFO, as many as there are free rows)."""
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
        if not self.waiting or not self.paused.is_set():
            return []
        free = self.config.max_batch - self.running_rows
        if not self.owners:  # idle: wait a moment for requests arriving together, unless they fill the batch
            want = sum(j.rows for j in self.waiting if not j.cancelled)
            if want < free and time.monotonic() - self.waiting[0].arrived < self.config.batch_wait_s:
                return []
        taken: list[Job] = []
        while self.waiting and self.waiting[0].rows <= free:
            j = self.waiting.popleft()
            if not j.cancelled:
                taken.append(j)
                free -= j.rows
        self.running_rows += sum(j.rows for j in taken)
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Add the jobs' rows to the running batch; they join it at the next step."""
        for j in jobs:
            j.left = j.rows
            added = []
            try:
                for r in range(j.rows):
                    i = self.gen.add(j.prompts[r], j.params[r])
                    added.append(i)
                    self.owners[i] = (j, r)
            except Exception as e:  # prompts were checked by the handler; this is a bug, not a user error
                traceback.print_exc()
                for i in added:
                    self.gen.cancel(i)
                    del self.owners[i]
                with self.cond:
                    self.running_rows -= j.rows
                self._deliver(j, e)

    def _step(self) -> None:
        gen = self.gen
        for i, (j, _) in self.owners.items():
            if j.cancelled:
                gen.cancel(i)  # nothing happens to a row that already finished
        try:
            events = gen.step()
        except Exception as e:
            traceback.print_exc()
            jobs = self._running_jobs()
            self.gen, self.owners = self._new_generation(), {}
            with self.cond:
                self.running_rows = 0
                self.cond.notify_all()
            self._fail(jobs, e)
            return
        per_job: dict[int, tuple[Job, list[Update]]] = {}
        rows_done = jobs_done = 0
        for ev in events:
            owner = self.owners.get(ev.index)
            if owner is None:  # a row of a job that failed to join
                if ev.finished:
                    gen.release(ev.index)
                continue
            j, r = owner
            u = Update(r, ev.text, ev.finished, ev.finish_reason)
            if ev.finished:
                u.completion_tokens = len(gen.rows[ev.index].tokens)
                gen.release(ev.index)
                del self.owners[ev.index]
                rows_done += 1
                j.left -= 1
                jobs_done += j.left == 0
            if ev.text or ev.finished:
                per_job.setdefault(id(j), (j, []))[1].append(u)
        for j, ups in per_job.values():
            if not j.cancelled:
                self._deliver(j, ups)
        rows_run = sum(ev.token is not None for ev in events)
        with self.cond:
            for n in gen.forward_sizes:
                self.batch_sizes[n] += 1
                self.steps += 1
            if rows_run:
                self.step_sizes[rows_run] += 1
            self.running_rows -= rows_done
            self.jobs_done += jobs_done
            if rows_done:
                self.cond.notify_all()

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        for j in jobs:
            self._deliver(j, e)

    @staticmethod
    def _deliver(job: Job, item) -> None:
        try:
            job.sink(item)
        except Exception:  # a sink must never take the scheduler down (e.g. its event loop closed)
            pass


# ----------------------------------------------------------------------------------------------
# request parsing: OpenAI's fields -> rows for the engine

@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids, one per prompt
    n: int
    params: list[Any]  # SamplingParams, one per row (prompt-major: row = prompt * n + choice)
    stream: bool
    include_usage: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, key: str, default, check, expected: str):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise APIError(400, f"'{key}' must be {expected}, got {json.dumps(v)[:80]}", key, "invalid_type")
    return v


def parse_completion_request(body: Any, tokenizer, block_size: int, model_name: str,
                             config: ServeConfig) -> CompletionRequest:
    """Check an OpenAI /v1/completions body; raise APIError(400) naming the bad field."""
    from gptkit.generate import SamplingParams, prepare_prompt
    from gptkit.sample import default_prompt_ids

    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(400, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    # options gptkit does not implement are refused rather than silently ignored
    for key, ok in (("echo", lambda v: v in (None, False)), ("suffix", lambda v: v is None),
                    ("logprobs", lambda v: v in (None, 0)), ("logit_bias", lambda v: not v),
                    ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0))):
        if not ok(body.get(key)):
            raise APIError(400, f"'{key}' is not supported by gptkit serve", key, "unsupported_parameter")

    max_tokens = _get(body, "max_tokens", config.default_max_tokens, _is_int, "an integer")
    if max_tokens < 0:
        raise APIError(400, f"'max_tokens' must be >= 0, got {max_tokens}", "max_tokens", "invalid_value")
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"'max_tokens' must be <= {config.max_tokens_limit}, got {max_tokens}", "max_tokens",
                       "invalid_value")
    temperature = _get(body, "temperature", 1.0, _is_num, "a number")
    if not temperature >= 0:
        raise APIError(400, f"'temperature' must be >= 0, got {temperature}", "temperature", "invalid_value")
    top_p = _get(body, "top_p", 1.0, _is_num, "a number")
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _get(body, "top_k", None, _is_int, "an integer")  # extension, as in vLLM
    if top_k is not None and top_k < 0:
        raise APIError(400, f"'top_k' must be >= 0 (0 = off), got {top_k}", "top_k", "invalid_value")
    penalty = _get(body, "repetition_penalty", 1.0, _is_num, "a number")  # extension, as in vLLM
    if not penalty > 0:
        raise APIError(400, f"'repetition_penalty' must be > 0, got {penalty}", "repetition_penalty", "invalid_value")
    n = _get(body, "n", 1, _is_int, "an integer")
    if n < 1:
        raise APIError(400, f"'n' must be >= 1, got {n}", "n", "invalid_value")
    best_of = _get(body, "best_of", n, _is_int, "an integer")
    if best_of != n:
        raise APIError(400, "'best_of' other than n is not supported by gptkit serve", "best_of",
                       "unsupported_parameter")
    seed = _get(body, "seed", None, _is_int, "an integer")
    stream = _get(body, "stream", False, lambda v: isinstance(v, bool), "true or false")
    opts = _get(body, "stream_options", {}, lambda v: isinstance(v, dict), "an object")
    include_usage = bool(opts.get("include_usage", False))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > 16:
        raise APIError(400, f"'stop' may hold at most 16 strings, got {len(stop)}", "stop", "invalid_value")

    prompts = _parse_prompts(body.get("prompt"), tokenizer)
    ids = []
    for i, p in enumerate(prompts):
        p = default_prompt_ids(tokenizer, p) if isinstance(p, str) else p
        try:
            ids.append(prepare_prompt(p, block_size, truncate=False, where="prompt"))
        except GptkitError as e:
            raise APIError(400, f"prompt {i}: {e.what}; {e.hint}" if len(prompts) > 1 else f"{e.what}; {e.hint}",
                           "prompt", "context_length_exceeded") from None
    rows = len(ids) * n
    if rows > config.max_batch:
        raise APIError(400, f"{len(ids)} prompt(s) x n={n} = {rows} completions, more than this server runs at once "
                       f"({config.max_batch})", "n", "invalid_value")
    params = []
    for _ in ids:
        for j in range(n):
            sp = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_k=top_k or None,
                                top_p=float(top_p), repetition_penalty=float(penalty), stop=tuple(stop),
                                seed=None if seed is None else seed + j)
            try:
                sp.validate()
            except GptkitError as e:
                raise APIError(400, e.what, e.where, "invalid_value") from None
            params.append(sp)
    return CompletionRequest(ids, n, params, stream, include_usage)


def _parse_prompts(prompt, tokenizer) -> list:
    """OpenAI's prompt forms: str, [str], [int] (one tokenized prompt) or [[int]]."""
    vocab = tokenizer.vocab_size

    def tokens(p: list) -> list[int]:
        if not all(_is_int(t) and 0 <= t < vocab for t in p):
            raise APIError(400, f"token ids must be integers in [0, {vocab})", "prompt", "invalid_value")
        return p

    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(p) for p in prompt):
            return [tokens(prompt)]
        if all(isinstance(p, list) and p for p in prompt):
            return [tokens(p) for p in prompt]
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt", "invalid_type")


def _encode_checked(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except GptkitError as e:  # e.g. a character outside a char model's vocabulary
        raise APIError(400, f"{e.what}; {e.hint}", "prompt", "invalid_value") from None


# ----------------------------------------------------------------------------------------------
# the HTTP layer

class _SafeTokenizer:
    """A tokenizer whose encode() failures become 400s (the handler encodes on the event loop)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str) -> list[int]:
        return _encode_checked(self._tok, text)


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
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, msg, None, code))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "gptkit"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        raw = bytearray()
        async for part in request.stream():  # read at most MAX_BODY bytes, whatever Content-Length says
            raw += part
            if len(raw) > MAX_BODY:
                raise APIError(400, f"the request body is larger than {MAX_BODY} bytes", None, "body_too_large")
        try:
            body = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        req = parse_completion_request(body, tokenizer, block_size, model_name, config)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        rows = [p for p in req.prompts for _ in range(req.n)]  # row = prompt * n + choice
        job = Job(rows, req.params, lambda item: loop.call_soon_threadsafe(updates.put_nowait, item))
        try:
            scheduler.submit(job)
        except Overloaded as e:
            raise APIError(503, f"the server is overloaded ({e}); retry later", None, "overloaded") from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in req.prompts)  # once per prompt, whatever n is
        if req.stream:
            return StreamingResponse(_sse(request, scheduler, job, updates, rid, created, model_name, prompt_tokens,
                                          req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [[] for _ in range(job.rows)]
        reasons: list[str | None] = [None] * job.rows
        used = 0
        left = job.rows
        try:
            async with contextlib.aclosing(_job_updates(request, updates)) as batches:
                async for item in batches:
                    if isinstance(item, BaseException):
                        raise APIError(500, f"generation failed: {item}", None, "internal_error")
                    for u in item:
                        texts[u.row].append(u.text)
                        if u.finished:
                            reasons[u.row] = u.finish_reason or "length"
                            used += u.completion_tokens
                            left -= 1
                    if not left:
                        break
        finally:
            if left:  # an error, or the client went away: free its rows
                scheduler.cancel(job)
        if left:
            return None
        choices = [{"index": i, "text": "".join(t), "finish_reason": reasons[i], "logprobs": None}
                   for i, t in enumerate(texts)]
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                          "total_tokens": prompt_tokens + used}}

    return app


async def _job_updates(request, updates: asyncio.Queue):
    """A job's update batches as the scheduler sends them; ends early, without error, when the
    client closes the connection (the caller then frees the job's rows)."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(updates.get())
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


async def _sse(request, scheduler: Scheduler, job: Job, updates: asyncio.Queue, rid: str, created: int,
               model_name: str, prompt_tokens: int, include_usage: bool):
    """Server-sent events: one chunk per row and step with new text (a row's last chunk carries its
    finish_reason), then a usage chunk if `stream_options.include_usage`, then `data: [DONE]`."""
    def chunk(choices, usage=None) -> str:
        d = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    left = job.rows
    used = 0
    try:
        async with contextlib.aclosing(_job_updates(request, updates)) as batches:
            async for item in batches:
                if isinstance(item, BaseException):
                    err = APIError(500, f"generation failed: {item}", None, "internal_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                # one choice per chunk, as OpenAI streams n > 1 (clients read chunk.choices[0])
                out = []
                for u in item:
                    out.append(chunk([{"index": u.row, "text": u.text,
                                       "finish_reason": u.finish_reason if u.finished else None, "logprobs": None}]))
                    if u.finished:
                        used += u.completion_tokens
                        left -= 1
                yield "".join(out)
                if not left:
                    break
        if left:
            return  # the client went away; `finally` frees its rows
        if include_usage:
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                             "total_tokens": prompt_tokens + used})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            scheduler.cancel(job)


# ----------------------------------------------------------------------------------------------
# building and running a server

def load_for_serving(model_path: str, vocab: str | None = None, device: str = "auto", dtype: str = "float32"):
    """(model on its device, for inference, tokenizer, default model name) for `model_path`. The
    model is `quantize_for_inference`'s copy in `dtype`, made in place: for float32 the same values
    with the weights laid out for fast decoding."""
    from gptkit.loading import load_model
    from gptkit.quantize import quantize_for_inference
    from gptkit.runtime import pick_device
    from gptkit.tokenizer import tokenizer_for

    loaded = load_model(model_path)
    tok = tokenizer_for(loaded, vocab)
    model = loaded.model.to(pick_device(device)).eval()
    n_params = model.num_params()
    model = quantize_for_inference(model, dtype, inplace=True)
    model.serving_num_params = n_params  # num_params() counts nn.Parameters, which the copy stores as buffers
    name = Path(str(model_path).rstrip("/")).name or str(model_path)
    return model, tok, name


class Server:
    """A uvicorn server on its own thread, e.g. for tests: `with Server(model, tok) as s: s.url`."""

    def __init__(self, model, tokenizer, model_name: str = "gptkit", api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, config: ServeConfig | None = None):
        import socket

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
    import sys

    config = config or ServeConfig()
    if not 0 <= port <= 65535:
        raise GptkitError(f"must be in 0..65535, got {port}", "--port", "pick a free port, e.g. 8000")
    if api_key is not None and not api_key.strip():
        raise GptkitError("the API key is empty", "--api-key", "give a non-empty key or leave the option out")
    if threads < 0:
        raise GptkitError(f"must be >= 0, got {threads}", "--threads", "0 keeps PyTorch's default")
    from gptkit.runtime import setup_threads

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

"""Running `gptkit serve`: loading the model, uvicorn with a request-head deadline, and the graceful
shutdown on SIGTERM/SIGINT; `Server` runs the same on a thread, for tests.

Shutdown (a signal, or `Server.stop`): stop admitting (503 with Retry-After), let running rows
finish for `shutdown_grace_s`, then end the rest (`Scheduler.abort`): a stream gets an error event
and [DONE], a waiting client a JSON 503. One log line for the signal and one per request ended, no
traceback, exit status 0. uvicorn's own signal handling is replaced: it re-raised the signal once
done, which printed a KeyboardInterrupt traceback (SIGINT) or killed the process (SIGTERM).

Slowloris: uvicorn closes idle keep-alive connections (`idle_timeout_s`); the protocol below also
closes a connection whose request head takes longer than `header_timeout_s`. The body deadline is
the app's (`body_timeout_s`).
"""

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from gptkit.chat_template import load_chat_template
from gptkit.errors import GptkitError
from gptkit.inference import load_for_inference
from gptkit.runtime import setup_threads
from gptkit.serve.app import create_app
from gptkit.serve.config import ServeConfig
from gptkit.serve.scheduler import Scheduler

log = logging.getLogger("gptkit.serve")


def default_model_name(model_path: str) -> str:
    """The model's id in the API when --model-name is not given: the model path's base name."""
    return Path(str(model_path).rstrip("/")).name or str(model_path)


def load_for_serving(model_path: str, vocab: str | None = None, device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer, default model name) for `model_path`: `load_for_inference` plus the name
    the API shows when no --model-name is given."""
    model, tok = load_for_inference(model_path, vocab, device, dtype)
    return model, tok, default_model_name(model_path)


def _http_protocol(header_timeout: float):
    """uvicorn's h11 protocol, plus a deadline for the request headers: a connection that has not sent
    a whole request head within `header_timeout` seconds of starting one is closed (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc):
            self._stop_watch()
            super().connection_lost(exc)

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _watch_head(self) -> None:
            if not self._awaiting_head():
                self._stop_watch()
            elif self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _stop_watch(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self._awaiting_head() and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _uvicorn_config(app, config: ServeConfig, **kw):
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, http=_http_protocol(config.header_timeout_s),
                          timeout_keep_alive=config.idle_timeout_s, timeout_graceful_shutdown=5, **kw)


class _Shutdown:
    """The graceful shutdown of one server: stop admitting, give running rows `grace` seconds, end
    the rest with ShuttingDown, then let uvicorn close. Runs on its own thread; `begin` may be
    called from a signal handler."""

    def __init__(self, scheduler: Scheduler, uvicorn_server, grace: float):
        self.scheduler, self.server, self.grace = scheduler, uvicorn_server, grace
        self.thread: threading.Thread | None = None

    def begin(self, why: str) -> None:
        if self.thread is not None:  # a second signal: do not wait any longer
            log.warning("%s again: ending every request now", why)
            self.scheduler.abort()
            return
        self.scheduler.drain()
        log.warning("%s: not admitting new requests; running ones have %gs to finish", why, self.grace)
        self.thread = threading.Thread(target=self._run, name="gptkit-shutdown", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self.scheduler.idle():
            time.sleep(0.02)
        if not self.scheduler.idle():
            self.scheduler.abort()
        self.server.should_exit = True

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def _graceful_uvicorn(config, scheduler: Scheduler, grace: float):
    """A uvicorn.Server whose SIGTERM/SIGINT start `_Shutdown` instead of uvicorn's own stop, and which
    does not re-raise the signal when it is done (that is what printed a traceback, or killed)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            self.shutdown_plan.begin(signal.Signals(sig).name)

    server = GracefulServer(config)
    server.shutdown_plan = _Shutdown(scheduler, server, grace)
    return server


class Server:
    """A uvicorn server on its own thread, e.g. for tests: `with Server(model, tok) as s: s.url`.
    `stop()` shuts it down as SIGTERM does (`config.shutdown_grace_s`)."""

    def __init__(self, model, tokenizer, model_name: str = "gptkit", api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, config: ServeConfig | None = None):
        self.scheduler = Scheduler(model, tokenizer, config).start()
        self.app = create_app(self.scheduler, model_name, api_key, host)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = _graceful_uvicorn(_uvicorn_config(self.app, self.scheduler.config), self.scheduler,
                                        self.scheduler.config.shutdown_grace_s)
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
        self.server.shutdown_plan.begin("stop")
        self.server.shutdown_plan.join(self.scheduler.config.shutdown_grace_s + 10)
        self.thread.join(10)
        self.scheduler.stop()
        self.sock.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, config: ServeConfig | None = None, vocab: str | None = None,
          device: str = "auto", dtype: str = "float32", threads: int = 0, chat_template: str | None = None) -> None:
    """`gptkit serve`: load the model and serve it until SIGTERM or SIGINT (then shut down gracefully).
    `chat_template`: a template file for /v1/chat/completions, replacing the model's own."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise GptkitError("the server needs FastAPI, uvicorn and prometheus_client", "serve",
                          "pip install 'gptkit[serve]' (or: pip install fastapi uvicorn prometheus_client)") from None

    config = config or ServeConfig()
    if not 0 <= port <= 65535:
        raise GptkitError(f"must be in 0..65535, got {port}", "--port", "pick a free port, e.g. 8000")
    if api_key is not None:
        if not api_key.strip():
            raise GptkitError("the API key is empty", "--api-key / GPTKIT_API_KEY",
                              "give a non-empty key or leave it out")
        if api_key != api_key.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in api_key):
            raise GptkitError("the API key has spaces at its ends or control characters", "--api-key / GPTKIT_API_KEY",
                              "a client could not send it in a header; pick a key without them")
        try:
            api_key.encode("utf-8")
        except UnicodeEncodeError:
            raise GptkitError("the API key is not valid Unicode text", "--api-key / GPTKIT_API_KEY",
                              "pick a key of ordinary characters") from None
    if threads < 0:
        raise GptkitError(f"must be >= 0, got {threads}", "--threads", "0 keeps PyTorch's default")
    setup_threads(threads)
    _log_to_stderr()
    sock = _bind(host, port)  # before loading: a busy port is one error line, not a loaded model that exits
    model, tok, default_name = load_for_serving(model_path, vocab, device, dtype)
    if chat_template:
        tok.chat_template = load_chat_template(chat_template, tok)
    name = model_name or default_name
    scheduler = Scheduler(model, tok, config).start()
    app = create_app(scheduler, name, api_key, host)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} ({model.serving_num_params:,} parameters, {dtype}) on http://{shown}:{port}/v1 "
          f"(max batch {config.max_batch}, queue {config.queue_size}"
          f"{', API key required' if api_key else ''}); playground at http://{shown}:{port}/",
          file=sys.stderr, flush=True)
    server = _graceful_uvicorn(_uvicorn_config(app, config, host=host, port=port), scheduler, config.shutdown_grace_s)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
    if server.shutdown_plan.thread is not None:
        log.warning("stopped")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one error line when the port is taken or the host unknown."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise GptkitError(f"cannot listen on {host}:{port}: {e.strerror or e}", "--port",
                          "another server may be using it: pick another --port, or stop that server") from None
    sock.listen(2048)
    return sock


def _log_to_stderr() -> None:
    """The server's own log lines ('gptkit serve: ...') on stderr, once."""
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("gptkit serve: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False

"""`gptkit serve`: an OpenAI-compatible completion server that batches concurrent requests.

- `protocol`: OpenAI's request fields (checked once), its error shape and its response shapes.
- `scheduler`: the engine thread, the only user of the model, and the jobs it runs (continuous batching).
- `app`: the FastAPI routes, server-sent events, start-up (`serve`) and a thread-hosted `Server` for tests.
- `config`: the server's limits (`ServeConfig`).

FastAPI and uvicorn (the `serve` extra) are imported only when an app is built, so the protocol and
the scheduler import without them.
"""

from gptkit.serve.app import Server, create_app, load_for_serving, serve
from gptkit.serve.config import ServeConfig
from gptkit.serve.protocol import APIError, CompletionRequest, Overloaded, parse_completion_request
from gptkit.serve.scheduler import Job, Scheduler

__all__ = ["APIError", "CompletionRequest", "Job", "Overloaded", "Scheduler", "ServeConfig", "Server", "create_app",
           "load_for_serving", "parse_completion_request", "serve"]

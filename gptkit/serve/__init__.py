"""`gptkit serve`: an OpenAI-compatible completion server that batches concurrent requests.

- `protocol`: OpenAI's request fields (checked once), its error shape and its response shapes.
- `scheduler`: the engine thread, the only user of the model, and the jobs it runs (continuous batching).
- `app`: the FastAPI routes, server-sent events, the Host/Content-Type guard and the playground page.
- `server`: start-up (`serve`), uvicorn, the graceful shutdown, and a thread-hosted `Server` for tests.
- `metrics`: the Prometheus metrics of `GET /metrics`.
- `config`: the server's limits (`ServeConfig`).

FastAPI, uvicorn and prometheus_client (the `serve` extra) are imported only when an app is built,
so the package imports without them.
"""

from gptkit.serve.app import create_app
from gptkit.serve.config import ServeConfig
from gptkit.serve.protocol import APIError, CompletionRequest, Overloaded, parse_completion_request
from gptkit.serve.scheduler import Job, Scheduler
from gptkit.serve.server import Server, load_for_serving, serve

__all__ = ["APIError", "CompletionRequest", "Job", "Overloaded", "Scheduler", "ServeConfig", "Server", "create_app",
           "load_for_serving", "parse_completion_request", "serve"]

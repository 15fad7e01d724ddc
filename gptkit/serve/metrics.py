"""Prometheus metrics of `gptkit serve` (`GET /metrics`), in a registry of the app's own, so that
several servers in one process (tests) do not clash.

Names follow vLLM's where one exists, with a `gptkit_` prefix: requests by HTTP status, prompt and
generated tokens, running and waiting rows, and histograms of time to first token, time between
tokens and end-to-end request latency (seconds)."""


# latency buckets (seconds): from one fast decode step to a long generation
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServeMetrics:
    """The server's counters, gauges and histograms. The scheduler thread calls `first_token`,
    `inter_token`, `generated` and `request_done`; the app calls `request` and `prompt_tokens`."""

    def __init__(self, scheduler=None):
        # prometheus_client is the `serve` extra: imported when a server is built
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt = Counter("gptkit_prompt_tokens", "prompt tokens of admitted completion requests", registry=r)
        self.generation = Counter("gptkit_generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("gptkit_num_rows_running", "rows (prompt x n) generating now", registry=r)
        self.waiting = Gauge("gptkit_num_rows_waiting", "rows waiting for a slot (queued or parked)", registry=r)
        self.waiting_requests = Gauge("gptkit_num_requests_waiting", "requests that have not started yet", registry=r)
        self.preemptions = Gauge("gptkit_num_preemptions", "rows parked for a waiting request so far", registry=r)
        self.ttft = Histogram("gptkit_time_to_first_token_seconds", "from arrival to a request's first token",
                              buckets=_SLOW, registry=r)
        self.itl = Histogram("gptkit_inter_token_latency_seconds", "between two tokens of a row", buckets=_FAST,
                             registry=r)
        self.e2e = Histogram("gptkit_e2e_request_latency_seconds", "from arrival to a request's last token",
                             buckets=_SLOW, registry=r)
        if scheduler is not None:
            self.bind(scheduler)

    def bind(self, scheduler) -> None:
        """Read the row gauges from the scheduler at each scrape."""
        scheduler.metrics = self
        self.running.set_function(lambda: scheduler.running_rows)
        self.waiting.set_function(scheduler.waiting_rows)
        self.waiting_requests.set_function(scheduler.waiting_requests)
        self.preemptions.set_function(lambda: scheduler.preemptions)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def prompt_tokens(self, n: int) -> None:
        self.prompt.inc(n)

    def generated(self, n: int) -> None:
        self.generation.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_done(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition of every metric, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

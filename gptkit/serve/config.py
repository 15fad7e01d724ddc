"""The server's limits (`gptkit serve`'s options), shared by the protocol, the scheduler and the app."""

import math
from dataclasses import dataclass

from gptkit.errors import GptkitError


@dataclass
class ServeConfig:
    """Server limits. Invalid values fail early, naming the CLI option."""

    max_batch: int = 32  # rows (prompts x n) generated at once
    queue_size: int = 256  # requests waiting for a free row; more get 503
    max_cohorts: int = 4  # ignored: kept so that old configurations and --max-cohorts still work
    batch_wait_s: float = 0.002  # when idle, gather requests arriving this close together
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    # fairness: no request may hold the server
    max_rows_per_request: int | None = None  # prompts x n in one request; None: half of max_batch
    request_token_budget: int = 32768  # rows x max_tokens in one request
    preempt_after: int = 32  # a row that generated this many tokens since it (re)started may be parked
    #                          for a waiting request, and resumed later by recompute; 0: never preempt
    prefill_chunk: int = 256  # a longer prompt is prefilled this many tokens per step, so the running rows
    #                           keep decoding meanwhile (chunked prefill); 0: whole prompts at once
    batch_invariant: bool = False  # run every row on its own: its tokens never depend on the batch
    # shutdown and network hygiene
    shutdown_grace_s: float = 5.0  # after SIGTERM/SIGINT, running rows may finish for this long
    header_timeout_s: float = 10.0  # a client must send its request headers within this
    body_timeout_s: float = 30.0  # ... and its body within this
    idle_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    allowed_hosts: tuple[str, ...] | None = None  # Host header values accepted; None: the bound host + localhost
    cors_origins: tuple[str, ...] = ()  # origins allowed by CORS (none: no CORS headers)
    step_delay_s: float = 0.0  # tests: sleep this long per scheduler step, so generations last

    def __post_init__(self):
        for name, opt in (("max_batch", "--max-batch"), ("queue_size", "--queue-size"),
                          ("max_cohorts", "--max-cohorts"), ("max_tokens_limit", "--max-tokens-limit"),
                          ("request_token_budget", "--request-token-budget")):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GptkitError(f"must be an integer >= 1, got {v!r}", opt, "give a positive whole number")
        if self.max_rows_per_request is None:
            self.max_rows_per_request = max(1, self.max_batch // 2)
        v = self.max_rows_per_request
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= self.max_batch:
            raise GptkitError(f"must be an integer in [1, --max-batch={self.max_batch}], got {v!r}",
                              "--max-rows-per-request", "give a whole number of rows")
        if not isinstance(self.preempt_after, int) or self.preempt_after < 0:
            raise GptkitError(f"must be an integer >= 0, got {self.preempt_after!r}", "--preempt-after",
                              "give a number of tokens, or 0 to never preempt")
        if not isinstance(self.prefill_chunk, int) or isinstance(self.prefill_chunk, bool) or self.prefill_chunk < 0:
            raise GptkitError(f"must be an integer >= 0, got {self.prefill_chunk!r}", "--prefill-chunk",
                              "give a number of tokens, or 0 to prefill whole prompts at once")
        for name, opt in (("batch_wait_s", "--batch-wait-ms"), ("shutdown_grace_s", "--shutdown-grace"),
                          ("step_delay_s", "step_delay_s")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise GptkitError(f"must be >= 0, got {v!r}", opt, "give 0 or more")
        for name, opt in (("header_timeout_s", "--header-timeout"), ("body_timeout_s", "--body-timeout"),
                          ("idle_timeout_s", "--idle-timeout")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise GptkitError(f"must be > 0 seconds, got {v!r}", opt, "give a positive number of seconds")

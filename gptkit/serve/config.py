"""The server's limits (`gptkit serve`'s options), shared by the protocol and the scheduler."""

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

    def __post_init__(self):
        for name, opt in (("max_batch", "--max-batch"), ("queue_size", "--queue-size"),
                          ("max_cohorts", "--max-cohorts"), ("max_tokens_limit", "--max-tokens-limit")):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GptkitError(f"must be an integer >= 1, got {v!r}", opt, "give a positive whole number")
        if not self.batch_wait_s >= 0:
            raise GptkitError(f"must be >= 0, got {self.batch_wait_s!r}", "--batch-wait-ms",
                              "give 0 or more milliseconds")

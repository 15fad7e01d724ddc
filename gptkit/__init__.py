"""gptkit: GPT-2 training, fine-tuning, validation and sampling on PyTorch."""

from gptkit.version import __version__  # noqa: E402

from gptkit.config import GPTConfig  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import load_tokenizer  # noqa: E402

__all__ = ["GPT", "GPTConfig", "__version__", "load_tokenizer"]

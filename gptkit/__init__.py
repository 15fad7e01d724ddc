"""gptkit: GPT-2 training, fine-tuning, validation and sampling on PyTorch."""

__version__ = "0.1.0"

from gptkit.config import GPTConfig  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import load_tokenizer  # noqa: E402

__all__ = ["GPT", "GPTConfig", "__version__", "load_tokenizer"]

"""gptkit's version: a leaf module, so checkpoints can record it without importing the package."""

__version__ = "0.1.0"

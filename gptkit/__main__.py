"""`python -m gptkit` is the same as the `gptkit` command."""

from gptkit.cli import entry

entry()

"""Where gptkit finds files before it downloads anything (INTERFACES.md "Where files come from when
offline"): the folder `$GPTKIT_DATA` and the cache `$GPTKIT_CACHE` (default ~/.cache/gptkit).

These two functions are the only readers of those variables.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_file(name: str) -> Path | None:
    """`$GPTKIT_DATA/name` if the variable is set and the file is there, else None."""
    data = os.environ.get("GPTKIT_DATA")
    if not data:
        return None
    p = Path(data) / name
    return p if p.is_file() else None


def cache_dir() -> Path:
    """gptkit's cache: `$GPTKIT_CACHE`, default ~/.cache/gptkit."""
    return Path(os.environ.get("GPTKIT_CACHE") or Path.home() / ".cache" / "gptkit")

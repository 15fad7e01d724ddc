"""Pretrained GPT-2 weights from the Hugging Face hub, through huggingface_hub.

`gpt2`, `gpt2-medium`, `gpt2-large` and `gpt2-xl` are OpenAI's models, hosted as
`openai-community/<name>`. We fetch config.json, the weights (model.safetensors, or
pytorch_model.bin only where a repo has no safetensors; it is later read with
torch.load(weights_only=True), which never runs code) and the tokenizer files, into
huggingface_hub's cache, and return the snapshot directory, which gptkit.formats.hf loads.

The environment is read at call time: HF_ENDPOINT (a mirror), HF_HOME / HF_HUB_CACHE (the cache)
and HF_HUB_OFFLINE (use the cache only). huggingface_hub draws a progress bar per file on stderr
when it is a terminal (HF_HUB_DISABLE_PROGRESS_BARS=1 turns them off, TQDM_POSITION=-1 forces them).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from gptkit.errors import GptkitError

REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def repo_id(name: str) -> str:
    if name in REPOS:
        return REPOS[name]
    if name.startswith("openai-community/"):
        return name
    raise GptkitError(f"unknown pretrained model {name!r}", name, f"use one of {', '.join(REPOS)}")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_settings() -> dict:
    """Endpoint, cache directory and offline flag from the environment, as huggingface_hub reads them."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.path.expanduser(home), "hub")
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return {"endpoint": endpoint, "cache_dir": cache, "offline": offline}


def download_pretrained(name: str, revision: str | None = None, **_ignored) -> Path:
    """Download (or find in the cache) a pretrained GPT-2 and return its local directory."""
    repo = repo_id(name)
    s = hub_settings()
    kw = dict(repo_id=repo, revision=revision, cache_dir=s["cache_dir"], local_files_only=s["offline"])
    if not s["offline"]:
        kw["endpoint"] = s["endpoint"]

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(filename=filename, **kw))

    where = f"{name} from {'the cache ' + s['cache_dir'] if s['offline'] else s['endpoint']}"
    try:
        config = fetch("config.json")
        for i, weights in enumerate(WEIGHTS):
            try:
                fetch(weights)
                break
            except EntryNotFoundError:  # remote 404, or not in the cache when offline
                if i == len(WEIGHTS) - 1:
                    raise
        for extra in TOKENIZER_FILES:
            try:
                fetch(extra)
            except EntryNotFoundError:
                pass
    except LocalEntryNotFoundError:
        if s["offline"]:
            raise GptkitError(f"{repo} is not in the cache and HF_HUB_OFFLINE is set", where,
                              "download it once with network access (unset HF_HUB_OFFLINE) "
                              "or point HF_HOME at a cache that holds it") from None
        raise GptkitError(f"cannot reach the hub and {repo} is not in the cache", where,
                          "check the network or HF_ENDPOINT") from None
    except RepositoryNotFoundError:
        raise GptkitError(f"repository {repo} not found", where, "check the name and HF_ENDPOINT") from None
    except EntryNotFoundError:
        raise GptkitError(f"{repo} has no model.safetensors or pytorch_model.bin", where,
                          "is it a GPT-2 model repository?") from None
    except (OSError, ConnectionError) as e:  # network failures, HTTP errors, offline mode, disk
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptkitError(f"download failed: {msg}", where,
                          "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
    return config.parent

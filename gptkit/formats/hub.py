"""Pretrained weights from the Hugging Face hub, through huggingface_hub.

`gpt2`, `gpt2-medium`, `gpt2-large` and `gpt2-xl` are OpenAI's models, hosted as
`openai-community/<name>`; the Llama-family names (REPOS) are their publishers' repos, and a repo id
itself (`HuggingFaceTB/SmolLM2-135M`) works too. We fetch config.json, the weights
(model.safetensors, or the shards its index names, or pytorch_model.bin only where a repo has no
safetensors; it is later read with torch.load(weights_only=True), which never runs code) and the
tokenizer files, into huggingface_hub's cache, and return the snapshot directory, which
gptkit.formats.hf loads. Gated repos (meta-llama/*) need a token: huggingface_hub reads HF_TOKEN.

The environment is read at call time: HF_ENDPOINT (a mirror), HF_HOME / HF_HUB_CACHE (the cache)
and HF_HUB_OFFLINE (use the cache only). huggingface_hub draws a progress bar per file on stderr
when it is a terminal (HF_HUB_DISABLE_PROGRESS_BARS=1 turns them off, TQDM_POSITION=-1 forces them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptkit.errors import GptkitError

REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
REPOS.update({  # the Llama-family presets of gptkit.config (same names), base and chat/instruct weights
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "tinyllama-1.1b-chat": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
})
INDEX = "model.safetensors.index.json"
WEIGHTS = ("model.safetensors", INDEX, "pytorch_model.bin")  # in order of preference
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def is_pretrained_name(name: str) -> bool:
    """A name download_pretrained resolves: a known name, or the id of a known repo."""
    return name in REPOS or name in REPOS.values() or name.startswith("openai-community/")


def repo_id(name: str) -> str:
    if name in REPOS:
        return REPOS[name]
    if is_pretrained_name(name):
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


def _shard_names(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GptkitError(f"unreadable shard index: {type(e).__name__}", index, "download it again") from None


def download_pretrained(name: str, revision: str | None = None, **_ignored) -> Path:
    """Download (or find in the cache) a pretrained model and return its local directory."""
    # imported here, not at the top: huggingface_hub and its HTTP stack cost ~0.1 s of start-up that
    # every training run from scratch would pay inside its time budget
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
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
                got = fetch(weights)
                if weights == INDEX:
                    for shard in _shard_names(got):
                        try:
                            fetch(shard)
                        except EntryNotFoundError:
                            raise GptkitError(f"missing shard {shard} (named by {INDEX})", where,
                                              "the repository is incomplete; check the name and revision"
                                              ) from None
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
    except GatedRepoError:
        raise GptkitError(f"{repo} is gated", where, "accept its license on the hub, then set HF_TOKEN to a "
                          "token of that account (or `huggingface-cli login`)") from None
    except RepositoryNotFoundError:
        raise GptkitError(f"repository {repo} not found", where, "check the name and HF_ENDPOINT") from None
    except EntryNotFoundError:
        raise GptkitError(f"{repo} has no model.safetensors, {INDEX} or pytorch_model.bin", where,
                          "is it a GPT-2 or Llama-family model repository?") from None
    except (OSError, ConnectionError) as e:  # network failures, HTTP errors, offline mode, disk
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptkitError(f"download failed: {msg}", where,
                          "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
    return config.parent

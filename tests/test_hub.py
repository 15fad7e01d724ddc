"""Pretrained names through huggingface_hub, against a local server that mimics the hub.

The server on 127.0.0.1 answers the hub's file endpoint, /{repo}/resolve/{revision}/{file}, for
HEAD and GET, with the headers huggingface_hub relies on (X-Repo-Commit, ETag, Content-Length,
X-Error-Code on 404). It serves a tiny random GPT-2 that transformers itself saved.
"""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_hf_model
from gptkit.errors import GptkitError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """repos: {repo_id: {filename: bytes}}; `requests` logs (method, path)."""

    def __init__(self, repos):
        self.repos = repos
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                # {org}/{name}/resolve/{revision}/{filename}
                if len(parts) != 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, filename = "/".join(parts[:2]), parts[4]
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                data = hub.repos[repo].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound")
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code, error_code):
                msg = b'{"error": "not found"}'
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", error_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(msg)

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, filename):
        return [m for m, p in self.requests if p.split("?")[0].endswith("/" + filename) and m == "GET"]


def repo_files(d: Path, drop=()):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name not in drop}


@pytest.fixture
def hub(tmp_path):
    d = tmp_path / "served"
    model = make_hf_model(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # both weight files, as the real repos have
    (d / "vocab.json").write_text("{}")
    files_bin = repo_files(d, drop=("model.safetensors",))
    server = FakeHub({"openai-community/gpt2": repo_files(d), "openai-community/gpt2-medium": files_bin})
    yield server, model
    server.close()


@pytest.fixture
def online(monkeypatch, tmp_path, hub):
    """Environment of a user with network access to the fake hub and an empty cache."""
    import huggingface_hub.constants as hc

    server, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # huggingface_hub read the conftest's value at import
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return hub


def logits_equal(model, hf_model):
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=0)


def test_download_resolves_openai_community_prefers_safetensors_and_loads(online, tmp_path):
    from gptkit.formats.hub import download_pretrained
    from gptkit.loading import load_model

    server, hf_model = online
    d = download_pretrained("gpt2")
    assert d.is_relative_to(tmp_path / "hf-home" / "hub" / "models--openai-community--gpt2")
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()
    assert server.fetched("model.safetensors") and not server.fetched("pytorch_model.bin")
    logits_equal(load_model("gpt2").model, hf_model)


def test_download_falls_back_to_pytorch_bin_read_without_unpickling_code(online):
    from gptkit.loading import load_model

    server, hf_model = online
    loaded = load_model("gpt2-medium")
    assert server.fetched("pytorch_model.bin")
    assert (loaded.source / "pytorch_model.bin").is_file()
    logits_equal(loaded.model, hf_model)


def test_offline_uses_the_cache_and_never_touches_the_network(online, monkeypatch):
    import huggingface_hub.constants as hc

    from gptkit.formats.hub import download_pretrained

    server, _ = online
    first = download_pretrained("gpt2")
    n = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert download_pretrained("gpt2") == first
    assert len(server.requests) == n
    with pytest.raises(GptkitError, match="not in the cache and HF_HUB_OFFLINE is set"):
        download_pretrained("gpt2-large")


def test_missing_repository_is_a_one_line_error(online):
    from gptkit.formats.hub import download_pretrained

    with pytest.raises(GptkitError, match="repository openai-community/gpt2-xl not found") as e:
        download_pretrained("gpt2-xl")
    assert "\n" not in e.value.line()


@pytest.mark.slow  # huggingface_hub retries a refused connection with backoff (~25 s)
def test_unreachable_endpoint_is_a_one_line_error(online, monkeypatch):
    from gptkit.formats.hub import download_pretrained

    server, _ = online
    server.close()
    with pytest.raises(GptkitError) as e:
        download_pretrained("gpt2-xl")
    assert "\n" not in e.value.line() and "gpt2-xl" in e.value.line()


def test_unknown_name_is_rejected():
    from gptkit.formats.hub import repo_id

    assert repo_id("gpt2-large") == "openai-community/gpt2-large"
    with pytest.raises(GptkitError, match="unknown pretrained model"):
        repo_id("gpt3")


def test_cli_downloads_with_hf_endpoint_and_hf_home_and_shows_progress(hub, tmp_path):
    server, hf_model = hub
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "home"),
               TQDM_POSITION="-1")  # huggingface_hub draws bars on a terminal; this forces them into the pipe
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "gptkit", "convert", "gpt2", str(out), "--to", "hf"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model.safetensors" in r.stderr and "%|" in r.stderr  # huggingface_hub's tqdm bar
    assert list((tmp_path / "home" / "hub").glob("models--openai-community--gpt2/snapshots/*/config.json"))
    from transformers import GPT2LMHeadModel

    from gptkit.loading import load_model

    logits_equal(load_model(out).model, GPT2LMHeadModel.from_pretrained(out).eval())
    logits_equal(load_model(out).model, hf_model)

"""Shared fixtures. Data beside the project (../shared/data) is found through GPTKIT_DATA;
tests that need it skip with a reason where it is absent."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if "GPTKIT_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["GPTKIT_DATA"] = str(ROOT.parent / "shared" / "data")
# keep the test suite off the user's cache and off the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def data_file(name: str) -> Path:
    d = os.environ.get("GPTKIT_DATA")
    p = Path(d) / name if d else None
    if p is None or not p.is_file():
        pytest.skip(f"{name} not found: set GPTKIT_DATA to the folder holding it (../shared/data in CI)")
    return p


@pytest.fixture
def shakespeare_path() -> Path:
    return data_file("tinyshakespeare.txt")


@pytest.fixture
def gpt2_vocab_path() -> Path:
    return data_file("gpt2.tiktoken")


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Every test gets its own cache directory and deterministic torch threads."""
    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path / "gptkit-cache"))
    torch.manual_seed(0)


def post_json(url: str, body, key: str | None = None, method: str = "POST", timeout: float = 30
              ) -> tuple[int, dict]:
    """(status, parsed JSON) of one request to a test server; `body` is a dict (sent as JSON) or raw
    bytes; an HTTP error status is returned, not raised (an empty error body reads as {})."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def make_hf_model(path: Path, initializer_range: float = 0.3, **kw):
    """A tiny random GPT2LMHeadModel written by transformers itself: the same files users download.

    initializer_range 0.3 (not GPT-2's 0.02) makes every op matter: with 0.02 the activations stay
    so small that, e.g., erf GELU in place of tanh GELU moves the logits by only ~2e-6, under the
    1e-5 parity bar."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=320,
               initializer_range=initializer_range, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def hf_tiny(tmp_path):
    """(directory, transformers model) of a tiny random GPT-2."""
    d = tmp_path / "hf-tiny"
    return d, make_hf_model(d)


@pytest.fixture
def char_data(tmp_path, request):
    """A char-level data directory prepared from the test module's TEXT."""
    from gptkit.prepare import prepare

    src = tmp_path / "text.txt"
    src.write_text(request.module.TEXT)
    return prepare(str(src), tokenizer="char", out=tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# No silent skips: with --allowed-skips FILE (CI passes tests/allowed_skips.txt), a test that skips
# without a matching line in FILE fails the session, so a missing extra or data file can't hide tests.


def pytest_addoption(parser):
    parser.addoption("--allowed-skips", metavar="FILE", default=None,
                     help="fail the session if a test skips unless FILE lists it (node id or fnmatch "
                          "pattern, then '#' and the reason)")


def _allowed_skip_patterns(path: Path) -> list[str]:
    pats = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition("#")
        if not reason.strip():
            raise pytest.UsageError(f"{path}:{n}: every allowed skip needs a reason after '#'")
        pats.append(pattern.strip())
    return pats


_skipped: dict[str, str] = {}


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped[report.nodeid] = reason


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module-level importorskip skips the whole file at collection


def pytest_sessionfinish(session, exitstatus):
    opt = session.config.getoption("--allowed-skips")
    if not opt or not _skipped:
        return
    import fnmatch

    patterns = _allowed_skip_patterns(Path(opt))
    _unlisted.update({n: r for n, r in _skipped.items() if not any(fnmatch.fnmatchcase(n, p) for p in patterns)})
    if _unlisted:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_unlisted: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unlisted:
        terminalreporter.write_sep("=", f"{len(_unlisted)} skipped test(s) not listed in "
                                        f"{config.getoption('--allowed-skips')}", red=True)
        for n, r in sorted(_unlisted.items()):
            terminalreporter.write_line(f"{n}: {r}")

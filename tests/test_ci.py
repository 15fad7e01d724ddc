"""CI's own rules: a skipped test fails the session unless the allow-list names it with a reason."""

import subprocess
import sys

from conftest import ROOT

HOOKS = ("pytest_addoption", "pytest_runtest_logreport", "pytest_collectreport", "pytest_sessionfinish",
         "pytest_terminal_summary")


def _run(tmp_path, allowed: str | None):
    (tmp_path / "conftest.py").write_text(  # the project's conftest under another name, for its hooks only
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_project_conftest', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "mod = sys.modules['_project_conftest'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"from _project_conftest import {', '.join(HOOKS)}\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_runs():\n    pass\n"
        "def test_skips():\n    pytest.skip('no GPU here')\n")
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
            "-c", "/dev/null", str(tmp_path)]
    if allowed is not None:
        (tmp_path / "allowed.txt").write_text(allowed)
        args += ["--allowed-skips", str(tmp_path / "allowed.txt")]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_an_unlisted_skip_fails_the_session(tmp_path):
    r = _run(tmp_path, "# nothing allowed\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 skipped test(s) not listed" in r.stdout and "test_x.py::test_skips: Skipped: no GPU here" in r.stdout


def test_a_listed_skip_passes_and_its_reason_shows(tmp_path):
    r = _run(tmp_path, "test_x.py::test_sk*  # GPU only\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SKIPPED" in r.stdout and "no GPU here" in r.stdout  # -rs shows the reason


def test_without_the_option_skips_pass_as_before(tmp_path):
    assert _run(tmp_path, None).returncode == 0


def test_an_allowed_skip_needs_a_reason(tmp_path):
    r = _run(tmp_path, "test_x.py::test_skips\n")
    assert r.returncode != 0 and "needs a reason" in r.stdout + r.stderr

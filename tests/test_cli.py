"""The command line: --version, --help of every subcommand, and bad input as one-line errors (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from gptkit import __version__
from gptkit.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    rc, out, _ = run_main(capsys, ["--version"])
    assert rc == 0 and out.strip() == f"gptkit {__version__}"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "gptkit", "--version"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and __version__ in r.stdout


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_subcommand_has_help(capsys, cmd):
    rc, out, _ = run_main(capsys, [cmd, "--help"])
    assert rc == 0 and "usage: gptkit " + cmd in out


def test_train_help_lists_every_config_key(capsys):
    from gptkit.config import TrainConfig
    from dataclasses import fields

    _, out, _ = run_main(capsys, ["train", "--help"])
    for f in fields(TrainConfig):
        assert f"  {f.name} = " in out


def _assert_user_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0]


def test_missing_model_file(capsys, tmp_path):
    rc, _, err = run_main(capsys, ["sample", "--model", str(tmp_path / "nope")])
    _assert_user_error(rc, err, "nope")


def test_directory_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    rc, _, err = run_main(capsys, ["sample", "--model", str(tmp_path)])
    _assert_user_error(rc, err, "not a model directory", str(tmp_path))


def test_unknown_option(capsys):
    rc, _, err = run_main(capsys, ["train", "--bogus"])
    _assert_user_error(rc, err, "--bogus")


def test_unknown_config_key(capsys):
    rc, _, err = run_main(capsys, ["train", "learning_rate=1"])
    _assert_user_error(rc, err, "learning_rate")


@pytest.mark.parametrize("argv,needle", [
    (["train", "max_steps=abc"], "max_steps"),
    (["train", "batch_size=0"], "batch_size"),
    (["train", "lr=-1"], "lr"),
    (["train", "--threads", "x"], "--threads"),
])
def test_bad_values(capsys, argv, needle):
    rc, _, err = run_main(capsys, argv)
    _assert_user_error(rc, err, needle)


def test_bad_sampling_value(capsys, tmp_path):
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint

    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=3))
    save_checkpoint(tmp_path / "run", 1, m, {"model_config": m.config.to_dict(), "chars": ["a", "b", "\n"]})
    rc, _, err = run_main(capsys, ["sample", "--model", str(tmp_path / "run"), "--temperature", "-1"])
    _assert_user_error(rc, err, "--temperature")
    outs = []
    for seed in ("1", "1", "2"):
        rc, out, err = run_main(capsys, ["sample", "--model", str(tmp_path / "run"), "--max-new-tokens", "5",
                                         "--seed", seed])
        assert rc == 0, err
        outs.append(out)
    # exactly 5 new characters of the model's vocabulary and a newline; seeded
    assert all(len(o) == 6 and o.endswith("\n") and set(o) <= {"a", "b", "\n"} for o in outs), outs
    assert outs[0] == outs[1] != outs[2]


def test_empty_text(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    rc, _, err = run_main(capsys, ["prepare", str(tmp_path / "empty.txt"), "--tokenizer", "char",
                                   "--out", str(tmp_path / "d")])
    _assert_user_error(rc, err, "empty")


def test_user_errors_in_a_real_process_have_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gptkit", "eval", "--model", str(tmp_path / "x"), "--data",
                        str(tmp_path)], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_key_value_overrides_may_follow_options(monkeypatch):
    import gptkit.train as train_mod

    seen = {}
    monkeypatch.setattr(train_mod, "train", lambda cfg, mov, resume=False, changes=None:
                        seen.update(cfg=cfg, mov=mov) or train_mod.TrainResult(Path(cfg.out), 0, None, None, 0.0))
    assert main(["train", "max_steps=7", "--out", "somewhere", "lr=0.01", "n_layer=3"]) == 0
    assert (seen["cfg"].max_steps, seen["cfg"].lr, seen["cfg"].out, seen["mov"]) == (7, 0.01, "somewhere", {"n_layer": 3})

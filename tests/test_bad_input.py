"""The bad-input table (docs/bad-input.md): every case gives one `error: <what> (<where>): <hint>`
line on stderr, exit code 2, no traceback, and leaves every file that existed before untouched.

Most cases run in-process through `gptkit.cli.main(argv)`; a few run as real subprocesses.
Each case builds its inputs in a fresh directory and returns the argv plus what the error line
must contain. The ids match the table's rows.
"""

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit import GPT, GPTConfig
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.data import write_shard
from gptkit.formats.llmc import write_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["n_layer=1", "n_head=2", "n_embd=16", "batch_size=2", "block_size=8", "max_steps=2", "warmup_steps=1",
        "eval_interval=0", "final_eval=false", "sample_tokens=1", "progress=false", "dtype=float32", "device=cpu"]


def _data(d: Path, vocab=20, n=400, tokens=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(d / "train.bin", rng.integers(0, vocab, n) if tokens is None else tokens)
    write_shard(d / "val.bin", rng.integers(0, vocab, n // 4))
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": vocab,
                                             "chars": ["\n"] + [chr(97 + i) for i in range(vocab - 1)]}))
    return d


def _ckpt_run(d: Path, **kw) -> Path:
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    save_checkpoint(d, 1, m, {"model_config": m.config.to_dict(), "chars": ["\n"] + [chr(97 + i) for i in range(19)], **kw})
    return d


def _llmc(d: Path) -> Path:
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    d.mkdir(parents=True, exist_ok=True)
    write_model(d / "model.bin", m.state_dict(), m.config)
    return d / "model.bin"


def _patch_int(path: Path, index: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * index:4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(raw))


# --- damaged .bin files --------------------------------------------------------------------
def shard_truncated(t):
    d = _data(t / "data")
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:600])
    return ["train", "--data", str(d), "--out", str(t / "run"), *TINY], ["shard is truncated", "train.bin"]


def shard_wrong_magic(t):
    d = _data(t / "data")
    _patch_int(d / "train.bin", 0, 12345)
    return ["train", "--data", str(d), "--out", str(t / "run"), *TINY], ["bad magic 12345", "train.bin"]


def shard_wrong_version(t):
    d = _data(t / "data")
    _patch_int(d / "train.bin", 1, 7)
    return ["train", "--data", str(d), "--out", str(t / "run"), *TINY], ["unsupported shard version 7"]


def shard_size_mismatch(t):
    d = _data(t / "data")
    (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-10])
    return ["eval", "--model", str(_ckpt_run(t / "m")), "--data", str(d)], ["size mismatch", "val.bin"]


def model_bin_truncated(t):
    f = _llmc(t / "m")
    f.write_bytes(f.read_bytes()[:5000])
    return ["sample", "--model", str(f)], ["truncated", "model.bin"]


def model_bin_wrong_magic(t):
    f = _llmc(t / "m")
    _patch_int(f, 0, 20240520)  # a token shard's magic
    return ["sample", "--model", str(f)], ["not a model file", "model.bin"]


def model_bin_wrong_version(t):
    f = _llmc(t / "m")
    _patch_int(f, 1, 9)
    return ["sample", "--model", str(f)], ["unsupported model file version 9", "model.bin"]


def model_bin_size_mismatch(t):
    f = _llmc(t / "m")
    f.write_bytes(f.read_bytes() + b"\0" * 64)
    return ["sample", "--model", str(f)], ["oversized", "model.bin"]


# --- damaged checkpoints -------------------------------------------------------------------
def ckpt_missing_weights(t):
    run = _ckpt_run(t / "run")
    (run / "ckpt_00000001" / "model.safetensors").unlink()
    return ["sample", "--model", str(run)], ["missing checkpoint file", "model.safetensors"]


def ckpt_missing_state(t):
    run = _ckpt_run(t / "run")
    (run / "ckpt_00000001" / "state.json").unlink()
    return ["sample", "--model", str(run / "ckpt_00000001")], ["not a model directory"]


def ckpt_damaged_state(t):
    run = _ckpt_run(t / "run")
    (run / "ckpt_00000001" / "state.json").write_text('{"format": "gptkit-checkpoint", "step": ')
    return ["sample", "--model", str(run)], ["unreadable checkpoint state", "state.json"]


def ckpt_nan_weights(t):
    from safetensors.torch import load_file, save_file

    run = _ckpt_run(t / "run")
    f = run / "ckpt_00000001" / "model.safetensors"
    sd = load_file(str(f))
    sd["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    save_file(sd, str(f))
    return ["sample", "--model", str(run)], ["holds NaN or inf", "model.safetensors"]


def ckpt_config_mismatch(t):
    run = _ckpt_run(t / "run")
    st = run / "ckpt_00000001" / "state.json"
    state = json.loads(st.read_text())
    state["model_config"]["n_embd"] = 32
    st.write_text(json.dumps(state))
    return ["sample", "--model", str(run)], ["model.safetensors"]


def ckpt_resume_damaged_optimizer(t):
    d = _data(t / "data")
    assert main(["train", "--data", str(d), "--out", str(t / "run"), *TINY]) == 0
    (t / "run" / "ckpt_00000002" / "optimizer.safetensors").write_bytes(b"garbage")
    return (["train", "--data", str(d), "--out", str(t / "run"), "--resume", *TINY, "max_steps=4"],
            ["unreadable tensors", "optimizer.safetensors"])


# --- data ----------------------------------------------------------------------------------
def shard_token_out_of_vocab(t):
    # shards from another tool (no meta.json) are scanned; with a meta.json its vocab_size is checked instead
    d = _data(t / "data", vocab=20, tokens=np.r_[np.arange(20), 25, np.arange(300) % 20])
    (d / "meta.json").unlink()
    return (["train", "--data", str(d), "--out", str(t / "run"), *TINY, "vocab_size=20"],
            ["token id 25 >= the model's vocab_size 20", "train.bin"])


def data_vocab_larger_than_model(t):
    d = _data(t / "data", vocab=30)
    return (["train", "--init", str(_ckpt_run(t / "m")), "--data", str(d), "--out", str(t / "run"), *TINY],
            ["the data's vocabulary has 30 tokens, the model's 20", "meta.json"])


def text_empty(t):
    (t / "empty.txt").write_text("")
    return ["prepare", str(t / "empty.txt"), "--tokenizer", "char", "--out", str(t / "d")], ["the text is empty"]


def text_binary(t):
    (t / "blob.txt").write_bytes(bytes(range(256)) * 8)
    return ["prepare", str(t / "blob.txt"), "--tokenizer", "char", "--out", str(t / "d")], ["looks binary"]


def text_not_utf8(t):
    (t / "latin1.txt").write_bytes("café au lait, naïve façade\n".encode("latin-1") * 50)
    return ["prepare", str(t / "latin1.txt"), "--tokenizer", "char", "--out", str(t / "d")], ["not valid UTF-8"]


def prompt_longer_than_context(t):
    run = _ckpt_run(t / "run")
    return ["sample", "--model", str(run), "--prompt", "abcdefghij" * 3, "--max-new-tokens", "2"], ["--prompt"]


# --- options -------------------------------------------------------------------------------
def size_zero(t):
    return ["train", "--out", str(t / "run"), "batch_size=0"], ["batch_size must be a positive integer"]


def size_negative(t):
    return ["sample", "--model", str(_ckpt_run(t / "run")), "--max-new-tokens", "-5"], ["--max-new-tokens"]


def model_size_zero(t):
    return ["train", "--data", str(_data(t / "data")), "--out", str(t / "run"), "n_layer=0"], ["n_layer"]


def unknown_config_key(t):
    return ["train", "--out", str(t / "run"), "learning_rate=0.1"], ["unknown config key 'learning_rate'"]


def unknown_toml_key(t):
    (t / "c.toml").write_text("max_steps = 10\nlr_decay = 0.5\n")
    return ["train", "--config", str(t / "c.toml"), "--out", str(t / "run")], ["unknown config key 'lr_decay'", "c.toml"]


def conflicting_options(t):
    return ["train", "--out", str(t / "a"), f"out={t / 'b'}"], ["--out and out= both given"]


def conflicting_init_architecture(t):
    d = _data(t / "data")
    return (["train", "--init", str(_ckpt_run(t / "m")), "--data", str(d), "--out", str(t / "run"), *TINY,
             "n_layer=3"], ["conflict with the weights of --init"])


def existing_run_without_resume(t):
    d = _data(t / "data")
    assert main(["train", "--data", str(d), "--out", str(t / "run"), *TINY]) == 0
    return ["train", "--data", str(d), "--out", str(t / "run"), *TINY], ["run directory already holds a run"]


def resume_without_run(t):
    return ["train", "--data", str(_data(t / "data")), "--out", str(t / "none"), "--resume", *TINY], \
        ["--resume: no checkpoint in the run directory"]


# --- untrusted files -----------------------------------------------------------------------
class _Exploit:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_with_code_hf(t):
    d = t / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                               "n_positions": 16, "vocab_size": 20}))
    torch.save({"transformer.wte.weight": _Exploit(t / "PWNED")}, d / "pytorch_model.bin")
    return ["sample", "--model", str(d)], ["pytorch_model.bin"]


def pickle_with_code_raw(t):
    (t / "model.pkl").write_bytes(pickle.dumps(_Exploit(t / "PWNED")))
    return ["sample", "--model", str(t / "model.pkl")], ["not a model file", "model.pkl"]


def lora_without_init(t):
    d = _data(t / "data")
    return ["train", "--data", str(d), "--out", str(t / "run"), *TINY, "lora_rank=8"], ["no --init", "(lora_rank)"]


def lora_unknown_target(t):
    d = _data(t / "data")
    return (["train", "--init", str(_ckpt_run(t / "m")), "--data", str(d), "--out", str(t / "run"), *TINY,
             "lora_rank=4", "lora_targets=q_proj"], ["unknown LoRA target module 'q_proj'", "(lora_targets)", "c_attn"])


def chat_missing_role(t):
    (t / "chat.jsonl").write_text('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return (["prepare", "chat", str(t / "chat.jsonl"), "--model", str(_ckpt_run(t / "m")), "--out", str(t / "d")],
            ["message 0 has no role", "chat.jsonl:1"])


def chat_empty_conversation(t):
    (t / "chat.jsonl").write_text('{"messages": []}\n')
    return (["prepare", "chat", str(t / "chat.jsonl"), "--model", str(_ckpt_run(t / "m")), "--out", str(t / "d")],
            ["empty conversation", "chat.jsonl:1"])


# --- options of round 2 --------------------------------------------------------------------
def unknown_optimizer(t):
    return (["train", "--data", str(_data(t / "data")), "--out", str(t / "run"), *TINY, "optimizer=sgd"],
            ["optimizer", "sgd", "auto, adamw, muon"])


def bench_quality_data_without_val(t):
    d = _data(t / "data")
    for f in d.glob("val*.bin"):
        f.unlink()
    return (["bench", "generate", "--model", str(_ckpt_run(t / "m")), "--data", str(d), "--dtype", "int8",
             "--batch", "1", "--prompt-tokens", "2", "--new-tokens", "2", "--repeats", "1"],
            ["no val shards", "data"])


CASES = [shard_truncated, shard_wrong_magic, shard_wrong_version, shard_size_mismatch, model_bin_truncated,
         model_bin_wrong_magic, model_bin_wrong_version, model_bin_size_mismatch, ckpt_missing_weights,
         ckpt_missing_state, ckpt_damaged_state, ckpt_nan_weights, ckpt_config_mismatch,
         ckpt_resume_damaged_optimizer, shard_token_out_of_vocab, data_vocab_larger_than_model, text_empty, text_binary, text_not_utf8,
         prompt_longer_than_context, size_zero, size_negative, model_size_zero, unknown_config_key,
         unknown_toml_key, conflicting_options, conflicting_init_architecture, existing_run_without_resume,
         resume_without_run, pickle_with_code_hf, pickle_with_code_raw, lora_without_init, lora_unknown_target,
         chat_missing_role, chat_empty_conversation, unknown_optimizer, bench_quality_data_without_val]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_error_line(rc, err, needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_in_process(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needles = case(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    _, err = capsys.readouterr()
    _assert_one_error_line(rc, err, needles)
    after = _snapshot(tmp_path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"files changed or removed: {changed}"
    assert not (tmp_path / "PWNED").exists(), "code inside a pickle ran"


def test_full_disk_during_a_checkpoint_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    """The failed-write row: resume a run whose next checkpoint hits ENOSPC."""
    from gptkit import checkpoint

    d = _data(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(d), "--out", str(run), *TINY]) == 0
    before = _snapshot(run / "ckpt_00000002")

    def full(tensors, file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_tensors", full)
    capsys.readouterr()
    rc = main(["train", "--data", str(d), "--out", str(run), "--resume", *TINY, "max_steps=4"])
    _, err = capsys.readouterr()
    _assert_one_error_line(rc, err, ["cannot write checkpoint ckpt_00000004: No space left on device",
                                     "existing checkpoints are intact"])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("ckpt_", "."))) == ["ckpt_00000002"]
    assert _snapshot(run / "ckpt_00000002") == before


@pytest.mark.parametrize("case", [shard_wrong_magic, ckpt_nan_weights, text_not_utf8, unknown_config_key,
                                  pickle_with_code_hf], ids=lambda c: c.__name__)
def test_bad_input_in_a_real_process(case, tmp_path):
    argv, needles = case(tmp_path)
    before = _snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "gptkit", *argv], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    _assert_one_error_line(r.returncode, r.stderr, needles)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


def test_every_user_error_in_the_package_carries_a_hint():
    """INTERFACES.md: a user error prints `error: <what> (<file or option>): <hint>`, so every
    GptkitError raised in gptkit/ names where the problem is and how to fix it."""
    import ast
    from pathlib import Path

    import gptkit

    missing = []
    for p in sorted(Path(gptkit.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            name = getattr(node, "func", None)
            name = getattr(name, "id", getattr(name, "attr", None))
            if isinstance(node, ast.Call) and name == "GptkitError" and not any(a.arg == "hint" for a in node.keywords):
                if len(node.args) < 3 and not any(isinstance(a, ast.Starred) for a in node.args):
                    missing.append(f"{p.name}:{node.lineno}")
    assert not missing, f"GptkitError without a hint at {missing}"


@pytest.mark.parametrize("cmd", ["prepare", "convert-hf", "convert-llmc", "train", "plot"])
def test_an_output_path_that_cannot_be_created_is_a_one_line_error(cmd, tmp_path, capsys, monkeypatch):
    """--out (or DST) below a regular file: mkdir fails; the user sees which path, not a traceback."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "sub"
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 50)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    save_checkpoint(tmp_path / "run", 1, model, {"model_config": model.config.to_dict()})
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 8, "elapsed_s": 0.1, "train_loss": 4.0, "lr": 1e-3, "tok_per_s": 80.0,
                    "mfu": 0.0}) + "\n")
    data = tmp_path / "data"
    main(["prepare", str(text), "--tokenizer", "char", "--out", str(data)])
    argv = {"prepare": ["prepare", str(text), "--tokenizer", "char", "--out", str(bad)],
            "convert-hf": ["convert", str(tmp_path / "run"), str(bad), "--to", "hf"],
            "convert-llmc": ["convert", str(tmp_path / "run"), str(bad), "--to", "llmc"],
            "train": ["train", "--data", str(data), "--out", str(bad), *TINY],
            "plot": ["plot", str(tmp_path / "run"), "--out", str(bad / "loss.png")]}[cmd]
    if cmd == "plot":
        pytest.importorskip("matplotlib")
    capsys.readouterr()
    rc = main(argv)
    _assert_one_error_line(rc, capsys.readouterr().err, ["a-file"])

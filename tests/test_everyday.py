"""Issue 18: the everyday paths as a new user meets them. One regression test (or more) per item:
config.toml round trip, resume keeps the run's settings, run directories never collide, convert
never clobbers, stopping never loses the run, min_lr_ratio, char tables checked, torchrun's
grad_accum, the small things, and the Python generation API."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gptkit.config import TrainConfig, resolve_config
from gptkit.errors import GptkitError
from gptkit.optim import TimeBudget, lr_at
from gptkit.runs import new_run_dir, resume_run_config
from gptkit.train import train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))
TINY = dict(n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16, warmup_steps=2, eval_interval=3,
            eval_batches=2, log_interval=1, sample_tokens=8, progress=False, dtype="float32", device="cpu")


def _cfg(data, out, **kw):
    return resolve_config(None, {k: str(v) for k, v in {"data": data, "out": out, **TINY, **kw}.items()})


def _silent(*a, **k):
    pass


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in _rows(run) if not r.get("final")]


# ---------------------------------------------------------------------------------------------
# 0. config.toml is TOML that reproduces the run
def test_config_toml_loads_back_and_reproduces_the_run(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "a", max_steps=6, lr=3e-3, n_embd=24)
    train(cfg, mov, log=_silent)
    raw = tomllib.loads((tmp_path / "a" / "config.toml").read_text())  # main wrote `model = ...` and [model]
    assert raw["model"] == "shakespeare-char" and raw["architecture"]["n_embd"] == 24
    again, again_mov = resolve_config(tmp_path / "a" / "config.toml", {"out": str(tmp_path / "b")})
    # the file names the optimizer the run used: `auto` resolved (Muon, from scratch)
    assert {**again.to_dict(), "out": ""} == {**cfg.to_dict(), "out": "", "optimizer": "muon"}
    train(again, again_mov, log=_silent)
    assert _train_losses(tmp_path / "b") == _train_losses(tmp_path / "a")


# ---------------------------------------------------------------------------------------------
# 1. --resume takes the run's own config; only mid-run keys change; the LR goes on
def test_resume_keeps_the_runs_config_and_continues_the_lr(char_data, tmp_path):
    run = tmp_path / "run"
    cfg, mov = _cfg(char_data, run, max_steps=6, lr=3e-3, batch_size=8)
    train(cfg, mov, log=_silent)
    last_lr = [r["lr"] for r in _rows(run) if not r.get("final")][-1]
    rcfg, rmov, changes = resume_run_config(str(run), None, {"max_steps": "10"})
    assert rcfg.batch_size == 8 and rcfg.lr == 3e-3 and rcfg.max_steps == 10 and rcfg.decay_steps == 6
    assert changes["max_steps"] == [6, 10]
    train(rcfg, rmov, resume=True, log=_silent, changes=changes)
    rows = [r for r in _rows(run) if not r.get("final")]
    lrs = {r["step"]: r["lr"] for r in rows}
    assert lrs[6] == pytest.approx(last_lr)
    for s in range(7, 11):  # the cosine had reached min_lr at step 6: it stays there (main: back to 4.3e-3)
        assert lrs[s] == pytest.approx(3e-4) and lrs[s] <= lrs[s - 1] + 1e-12
    assert all(r["tokens"] == r["step"] * 8 * 16 for r in rows)  # the run's batch, not the default's
    first_after = next(r for r in rows if r["step"] == 7)
    assert first_after["resumed_with"]["max_steps"] == 10
    toml = (run / "config.toml").read_text()
    assert "max_steps = 10" in toml and "batch_size = 8" in toml and "resumed at step 6" in toml
    tomllib.loads(toml)


def test_resume_refuses_keys_that_define_the_run(char_data, tmp_path, capsys):
    from gptkit.cli import main

    run = tmp_path / "run"
    train(*_cfg(char_data, run, max_steps=2), log=_silent)
    assert main(["train", "--out", str(run), "--resume", "lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lr cannot change when a run is resumed") and "max_steps" in err
    assert main(["train", "--out", str(run), "--resume", "n_layer=3"]) == 2
    assert "n_layer cannot change" in capsys.readouterr().err


def test_a_resumed_time_budget_goes_on_from_where_the_schedule_was():
    # main: the budget restarted at 0 and the LR jumped from min_lr back to ~lr
    done = TimeBudget(0.0, time.time(), 100, start_ratio=1.0)  # no budget now: stays where it was
    assert done.ratio == 1.0 and lr_at(5000, 6e-3, 6e-4, 50, 20000, done.ratio) == 6e-4
    half = TimeBudget(1000.0, time.time(), 100, start_ratio=0.5)
    half.tick(100, 50, 64)
    assert 0.5 <= half.ratio < 0.6


# ---------------------------------------------------------------------------------------------
# 2. run directories are created exclusively; runs/latest names the newest
def test_run_directories_started_in_the_same_second_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = []
    threads = [threading.Thread(target=lambda: got.append(new_run_dir())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(d.is_dir() for d in got)


def test_default_out_makes_a_new_run_and_points_latest_at_it(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train(*_cfg(char_data, "", max_steps=1, final_eval=False), log=_silent).run_dir
    b = train(*_cfg(char_data, "", max_steps=1, final_eval=False), log=_silent).run_dir
    assert a != b and (tmp_path / "runs" / "latest").resolve() == b.resolve()
    cfg, mov, _ = resume_run_config(None, None, {"max_steps": "2"})  # --resume alone: the latest run
    assert Path(cfg.out).resolve() == b.resolve()


# ---------------------------------------------------------------------------------------------
# 4. stopping never loses the run
def _train_argv(data, out, *extra):
    return [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(out), "--threads", "1",
            *(f"{k}={v}" for k, v in {**TINY, "max_steps": 100000, "eval_interval": 0, "final_eval": False,
                                      "log_interval": 1}.items()), *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(char_data, tmp_path, sig):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_argv(char_data, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and _rows(run)):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]  # main: no checkpoint, only config.toml + metrics.jsonl
    ckpts = sorted(run.glob("ckpt_*"))
    assert len(ckpts) == 1, out + err
    assert f"gptkit train --out {run} --resume" in out
    step = int(ckpts[0].name.split("_")[1])
    assert step > 0 and max(r["step"] for r in _rows(run)) == step
    if sig == signal.SIGTERM:
        return
    r = subprocess.run(_train_argv(char_data, run, "--resume", f"max_steps={step + 2}"), capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"from step {step}" in r.stdout


def test_long_runs_save_at_their_eval_steps(char_data, tmp_path):
    # ckpt_every_s: a run this long since its last save saves at its next eval step
    train(*_cfg(char_data, tmp_path / "run", max_steps=6, eval_interval=2, ckpt_every_s=1e-9, keep_last=0),
          log=_silent)
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*")) == [
        "ckpt_00000002", "ckpt_00000004", "ckpt_00000006"]
    assert TrainConfig().ckpt_every_s > TrainConfig().max_time  # the 110 s default run pays no save


def test_a_run_without_a_checkpoint_says_so(tmp_path, capsys):
    from gptkit.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("lr = 0.001\n")
    (run / "metrics.jsonl").write_text("")
    assert main(["sample", "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the run has no checkpoint" in err and "--resume" in err  # main: "not a model directory"


# ---------------------------------------------------------------------------------------------
# 7. min_lr follows lr
def test_min_lr_defaults_to_a_tenth_of_lr():
    assert TrainConfig(lr=1e-4).min_lr == pytest.approx(1e-5)  # main: an error (min_lr 6e-4 > lr)
    assert TrainConfig(lr=1e-3).min_lr == pytest.approx(1e-4)  # main: decayed only to 60%
    assert TrainConfig(lr=1e-3, min_lr_ratio=0.5).min_lr == pytest.approx(5e-4)
    assert TrainConfig(lr=1e-3, min_lr=0.0).min_lr == 0.0
    default = TrainConfig()  # the default run's tuned values are unchanged
    assert (default.lr, default.min_lr) == (6e-3, pytest.approx(6e-4))
    with pytest.raises(GptkitError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)


# ---------------------------------------------------------------------------------------------
# 3. convert never writes into another model's directory
def test_convert_refuses_a_non_empty_destination_and_force_replaces_it_whole(char_data, tmp_path, capsys):
    from gptkit.cli import main
    from gptkit.loading import load_model

    a, b = tmp_path / "a", tmp_path / "b"
    train(*_cfg(char_data, a, max_steps=2, final_eval=False), log=_silent)
    train(*_cfg(char_data, b, max_steps=3, final_eval=False, n_embd=24), log=_silent)
    before = sorted(p.name for p in b.iterdir())
    assert main(["convert", str(a), str(b), "--to", "gptkit"]) == 2  # main: added a foreign ckpt_ into b
    assert "destination directory exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in b.iterdir()) == before
    assert main(["convert", str(a), str(a), "--to", "hf", "--force"]) == 2  # would delete its own source
    assert (a / "config.toml").is_file()
    assert main(["convert", str(a), str(b), "--to", "gptkit", "--force"]) == 0
    assert sorted(p.name for p in b.iterdir()) == ["ckpt_00000002"]  # nothing of the other model is left
    assert load_model(b).model.config.n_embd == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(a), str(empty), "--to", "llmc"]) == 0  # an empty directory is fine


# ---------------------------------------------------------------------------------------------
# 8. char tables are checked
def test_a_char_model_on_data_with_another_character_table_is_an_error(char_data, tmp_path, capsys):
    from gptkit.cli import main
    from gptkit.prepare import prepare

    run = tmp_path / "run"
    train(*_cfg(char_data, run, max_steps=1, final_eval=False), log=_silent)
    other_text = tmp_path / "other.txt"
    other_text.write_text("".join(f"ZQX {i}: xyz!\n" for i in range(300)))
    other = prepare(str(other_text), tokenizer="char", out=tmp_path / "other")
    assert main(["eval", "--model", str(run), "--data", str(other)]) == 2  # main: a loss, no warning
    err = capsys.readouterr().err
    assert "character table" in err and str(other / "meta.json") in err and '"\\n' in err
    with pytest.raises(GptkitError, match="character table"):
        train(*_cfg(other, tmp_path / "init", max_steps=1, init=str(run)), log=_silent)
    assert main(["eval", "--model", str(run), "--data", str(char_data)]) == 0  # its own table is fine


# ---------------------------------------------------------------------------------------------
# 9. torchrun as the README shows it
@pytest.mark.slow
def test_torchrun_with_the_default_grad_accum_trains_and_says_ddp(char_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptkit",
                "train", "--data", str(char_data), *(f"{k}={v}" for k, v in TINY.items()), "max_steps=3",
                "final_eval=false"]
    r = subprocess.run(torchrun + ["--out", str(tmp_path / "ok")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # main: grad_accum=1 is not divisible, twice, then a traceback
    assert "DDP over 2 processes, 1 micro-batch each" in r.stdout and "128 tokens/step" in r.stdout
    rows = _rows(tmp_path / "ok")
    assert rows[-1]["tokens"] == 3 * 2 * 4 * 16
    r = subprocess.run(torchrun + ["--out", str(tmp_path / "bad"), "grad_accum=3"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0 and (r.stdout + r.stderr).count("error: grad_accum=3 is not divisible") == 1


# ---------------------------------------------------------------------------------------------
# 10. the small things
def test_train_says_where_data_and_weights_come_from_and_prints_plain_lines_off_a_terminal(
        char_data, tmp_path, monkeypatch, shakespeare_path):
    import gptkit.train
    from gptkit.prepare import ensure_prepared

    lines = []
    ensure_prepared("shakespeare-char", log=lines.append)
    assert lines == [f"prepared shakespeare-char from {shakespeare_path} into "
                     f"{tmp_path / 'gptkit-cache' / 'data' / 'shakespeare-char'}"]
    monkeypatch.setattr(gptkit.metrics, "on_terminal", lambda: False)  # as under `> log.txt`
    lines.clear()
    train(*_cfg(char_data, tmp_path / "run", max_steps=4, progress=True, threads=1), log=lines.append)
    model_line = next(x for x in lines if x.startswith("model:"))
    assert "context 16), weights from scratch" in model_line and "; 1 thread;" in model_line
    assert lines[lines.index(model_line) + 1].startswith("step 0: val ")  # the initial weights' val loss
    assert any(x.startswith("step 1: loss ") for x in lines)
    assert not any("\r" in x for x in lines)
    rows = _rows(tmp_path / "run")
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] > 0


def test_a_missing_logger_package_fails_before_the_run_directory_exists(char_data, tmp_path, monkeypatch):
    import gptkit.metrics

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(gptkit.metrics.LOGGER_PACKAGES, "tensorboard", "gptkit_no_such_package")
    with pytest.raises(GptkitError, match="tensorboard logger needs"):
        train(*_cfg(char_data, "", max_steps=1, loggers="tensorboard"), log=_silent)
    with pytest.raises(GptkitError, match="tensorboard logger needs"):
        train(*_cfg(char_data, tmp_path / "named", max_steps=1, loggers="tensorboard"), log=_silent)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "named").exists()


def test_the_offline_hint_names_a_command_that_takes_input(tmp_path, monkeypatch):
    from gptkit.prepare import ensure_prepared

    monkeypatch.delenv("GPTKIT_DATA", raising=False)
    monkeypatch.setenv("GPTKIT_SHAKESPEARE_URL", (tmp_path / "nowhere.txt").as_uri())
    with pytest.raises(GptkitError) as e:
        ensure_prepared("shakespeare-char")
    assert "gptkit prepare PRESET --input FILE" in e.value.hint and "pass --input" not in e.value.hint


def test_help_shows_defaults_and_messages_name_the_right_option(char_data, tmp_path, capsys, monkeypatch):
    from gptkit.cli import main

    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    assert "default: 200" in out and "default: auto" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    train(*_cfg(char_data, run, max_steps=1, final_eval=False), log=_silent)
    assert main(["sample", "--model", str(run), "--device", "cuda", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "(--device)" in err and "--device cpu" in err and "device=cpu" not in err
    assert main(["eval", "--model", str(run), "--data", str(char_data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "--split val" in err and "run `gptkit prepare`" not in err


def test_loadtest_prompts_fit_a_char_model_and_its_errors_show_the_servers_message(tmp_path):
    import http.server

    from gptkit.bench.loadtest import _request, default_prompt, format_report

    shakespeare_chars = set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for c, r in [(0, 0), (49, 4), (123, 9)]:  # main: "Client 49 asks question 4:" (digits: 400 on every request)
        assert set(default_prompt(c, r)) <= shakespeare_chars
    assert default_prompt(1, 2) != default_prompt(2, 1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.dumps({"error": {"message": "prompt has characters outside the vocab: '7'",
                                         "type": "invalid_request_error", "param": "prompt", "code": None}})
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        ok, why = _request(f"http://127.0.0.1:{srv.server_port}", {"prompt": "7", "max_tokens": 1}, None, 10)
    finally:
        srv.shutdown()
    assert not ok and why == "HTTP 400: prompt has characters outside the vocab: '7'"  # main: "HTTP 400"
    report = format_report({"clients": 1, "requests_per_client": 1, "max_tokens": 1, "stream": "none",
                            "answered": 0, "errors": 1, "error_kinds": {why: 1}, "requests_per_s": 0.0, "wall_s": 1.0,
                            "batch_sizes": {}, "mean_batch": 0.0, "max_batch_seen": 0, "rss_start_bytes": None,
                            "rss_before_bytes": None, "rss_after_bytes": None})
    assert "1 x HTTP 400: prompt has characters outside the vocab" in report


def test_sampling_past_the_context_warns(char_data, tmp_path, capsys):
    from gptkit.cli import main

    run = tmp_path / "run"
    train(*_cfg(char_data, run, max_steps=1, final_eval=False), log=_silent)  # context 16
    assert main(["sample", "--model", str(run), "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["sample", "--model", str(run), "--max-new-tokens", "30", "--seed", "1"]) == 0  # main: silent
    err = capsys.readouterr().err
    assert "exceed the model's context of 16 tokens" in err and "slides its window" in err


# ---------------------------------------------------------------------------------------------
# 6. runs carry their tokenizer; an llm.c model.bin's tokenizer.bin is used
def test_an_llmc_tokenizer_bin_beside_model_bin_is_the_vocabulary(tmp_path, gpt2_vocab_path, monkeypatch):
    import tiktoken

    from gptkit.config import GPTConfig
    from gptkit.formats import llmc
    from gptkit.loading import load_model
    from gptkit.model import GPT
    from gptkit.tokenizer import load_bpe_vocab, tokenizer_for

    ref = load_bpe_vocab(gpt2_vocab_path)
    d = tmp_path / "llmc"
    d.mkdir()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32))
    llmc.write_model(d / "model.bin", model.state_dict(), model.config, torch.float32)
    llmc.write_tokenizer(d / "tokenizer.bin", llmc.LlmcTokenizer(
        [ref.token_bytes(i) for i in range(50257)], 50256, 2))
    # offline, without GPTKIT_DATA or --vocab: main fell through to tiktoken's download
    monkeypatch.delenv("GPTKIT_DATA", raising=False)
    monkeypatch.delenv("GPTKIT_GPT2_VOCAB", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    tok = tokenizer_for(load_model(d / "model.bin"))
    text = "Hello world<|endoftext|> it's 2024!"
    assert tok.encode(text) == ref.encode(text) and tok.decode(ref.encode(text)) == text


def test_a_gpt2_token_run_carries_its_vocabulary(tmp_path, gpt2_vocab_path, monkeypatch):
    import tiktoken

    from gptkit.loading import load_model
    from gptkit.prepare import prepare
    from gptkit.tokenizer import load_bpe_vocab, tokenizer_for

    src = tmp_path / "text.txt"
    src.write_text(TEXT)
    data = prepare(str(src), tokenizer="gpt2", out=tmp_path / "data")
    run = tmp_path / "run"
    train(*_cfg(data, run, max_steps=1, final_eval=False, sample_tokens=0), log=_silent)
    assert (run / "gpt2.tiktoken").is_file()
    # offline, without GPTKIT_DATA or --vocab (main: tiktoken's download, or an error)
    monkeypatch.delenv("GPTKIT_DATA", raising=False)
    monkeypatch.delenv("GPTKIT_GPT2_VOCAB", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    tok = tokenizer_for(load_model(run))
    ref = load_bpe_vocab(gpt2_vocab_path)
    assert tok.encode(TEXT[:300] + " naïve ünïcode") == ref.encode(TEXT[:300] + " naïve ünïcode")


# ---------------------------------------------------------------------------------------------
# 11. the Python generation API the README shows
def test_model_generate_and_load_tokenizer_as_the_readme_uses_them(char_data, tmp_path):
    from gptkit import GPT, load_tokenizer

    run = tmp_path / "run"
    train(*_cfg(char_data, run, max_steps=3, final_eval=False), log=_silent)
    model = GPT.from_pretrained(str(run))
    tok = load_tokenizer(str(run))
    idx = torch.tensor([tok.encode("line 1")])
    assert tok.decode(idx[0].tolist()) == "line 1"
    out = model.generate(idx, max_new_tokens=20, temperature=0.0)  # past the context of 16: slides
    assert out.shape == (1, 6 + 20) and torch.equal(out[:, :6], idx)
    ref = idx  # greedy by full recomputation over the last 16 tokens, nanoGPT's loop
    with torch.no_grad():
        for _ in range(20):
            ref = torch.cat([ref, model(ref[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    torch.manual_seed(0)
    a = model.generate(idx, 10, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 16)

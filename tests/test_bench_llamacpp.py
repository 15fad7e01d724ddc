"""`python -m gptkit.bench.llamacpp`: gptkit against llama.cpp's llama-batched-bench on the same
GGUF weights. llama.cpp is not installed in CI, so a stand-in binary checks the command line it is
given (the GGUF file gptkit wrote must be a file llama.cpp would read: tensor names and shapes are
checked with the gguf package) and answers in llama-batched-bench's JSONL."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from gptkit.bench import llamacpp
from gptkit.errors import GptkitError

FAKE = textwrap.dedent('''\
    #!{python}
    import json, sys
    from gguf import GGUFReader
    a = sys.argv[1:]
    opt = {{a[i]: a[i + 1] for i in range(0, len(a) - 1, 2)}}
    r = GGUFReader(opt["-m"])
    names = {{t.name for t in r.tensors}}
    assert "token_embd.weight" in names and "blk.0.attn_qkv.weight" in names, names
    with open({log!r}, "a") as f:
        f.write(json.dumps(opt) + "\\n")
    pp, tg = int(opt["-npp"]), int(opt["-ntg"])
    for pl in map(int, opt["-npl"].split(",")):
        print(json.dumps({{"pp": pp, "tg": tg, "pl": pl, "n_threads": int(opt["-t"]), "t_pp": 0.5,
                          "speed_pp": pp / 0.5, "t_tg": 2.0, "speed_tg": pl * tg / 2.0}}))
''')


@pytest.fixture
def fake_binary(tmp_path):
    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "llama-batched-bench"
    exe.write_text(FAKE.format(python=sys.executable, log=str(log)))
    exe.chmod(0o755)
    return exe, log


def test_compares_on_the_same_weights(fake_binary, capsys):
    exe, log = fake_binary
    rc = llamacpp.main(["--llama-batched-bench", str(exe), "--model", "gpt2-tiny", "--dtypes", "f32,q8_0",
                        "--batch", "1,2", "--prompt-tokens", "4", "--new-tokens", "3", "--ttft-prompt-tokens", "16",
                        "--threads", "1", "--repeats", "2", "--json"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    decode = [r for r in rows if r["what"] == "decode"]
    ttft = [r for r in rows if r["what"] == "ttft"]
    assert {(r["gguf"], r["dtype"], r["batch"]) for r in decode} == {
        ("f32", "float32", 1), ("f32", "float32", 2), ("q8_0", "int8", 1), ("q8_0", "int8", 2)}
    for r in decode:  # the stand-in decodes tg tokens per row in 2 s
        assert r["llamacpp_tok_per_s"] == pytest.approx(r["batch"] * 3 / 2.0)
        assert r["gptkit_tok_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["gptkit_tok_per_s"] / r["llamacpp_tok_per_s"], rel=1e-2)
    assert len(ttft) == 2 and all(r["llamacpp_ttft_s"] == 0.5 and r["prompt_tokens"] == 16 for r in ttft)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    # per dtype: a warm-up, then per repeat one decode call and one prompt (ttft) call, same threads
    assert len(calls) == 2 * (1 + 2 * 2)
    assert all(c["-t"] == "1" and c["-tb"] == "1" for c in calls)
    assert {c["-npl"] for c in calls} == {"1", "1,2"} and {c["-npp"] for c in calls} == {"4", "16"}


def test_gptkit_decode_timing_counts_decode_passes_only():
    import torch
    from gptkit.config import model_preset
    from gptkit.model import GPT
    torch.manual_seed(0)
    m = GPT(model_preset("gpt2-tiny")).eval()
    t_prompt, t_decode = llamacpp.time_gptkit(m, 2, 5, 3)
    assert t_prompt > 0 and t_decode > 0


def test_missing_binary_is_one_error_line(tmp_path, capsys):
    assert llamacpp.main(["--llama-batched-bench", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: llama-batched-bench not found") and "--llama-batched-bench" in err[0]
    with pytest.raises(GptkitError):
        llamacpp.find_binary(str(tmp_path / "nope"))

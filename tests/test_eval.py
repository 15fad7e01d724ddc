"""`gptkit eval`: loss and perplexity over a whole val split, checked against transformers computing
the same windows itself; and the done-when of the data issue: `gptkit train --data DIR` on GPT-2
tokens end to end."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import make_hf_model
from gptkit.cli import main
from gptkit.prepare import prepare


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A small GPT-2-token data directory (a slice of tiny Shakespeare; val split in several shards)."""
    import os
    from pathlib import Path

    src = Path(os.environ.get("GPTKIT_DATA", "")) / "tinyshakespeare.txt"
    if not src.is_file() or not (src.parent / "gpt2.tiktoken").is_file():
        pytest.skip("tinyshakespeare.txt and gpt2.tiktoken not found: set GPTKIT_DATA (../shared/data in CI)")
    d = tmp_path_factory.mktemp("gpt2data")
    (d / "text.txt").write_text(src.read_text(encoding="utf-8")[:24_000], encoding="utf-8")
    out = prepare(str(d / "text.txt"), out=d / "data", shard_size=300, val_fraction=0.1, progress=False)
    assert len(list(out.glob("val_*.bin"))) > 1
    return out


def reference_loss(hf_model, data_dir, T: int) -> tuple[float, int]:
    """transformers' own loss over consecutive windows of the val tokens, read by hand."""
    toks = []
    for f in sorted(data_dir.glob("val*.bin")):
        raw = f.read_bytes()
        toks.append(np.frombuffer(raw[1024:], dtype="<u2").astype(np.int64))
    toks = torch.from_numpy(np.concatenate(toks))
    n_full = (len(toks) - 1) // T
    windows = [toks[:n_full * T + 1].unfold(0, T + 1, T)] if n_full else []  # (n_full, T+1)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows + [toks[n_full * T:][None]]:  # the full windows in one batch, then the rest
            if w.shape[1] < 2:
                continue
            logits = hf_model(w[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), w[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count, count


def parse_eval(out: str) -> tuple[float, float, int]:
    m = re.search(r"loss ([\d.]+), perplexity ([\d.]+) over ([\d,]+) tokens", out)
    assert m, out
    return float(m.group(1)), float(m.group(2)), int(m.group(3).replace(",", ""))


@pytest.mark.parametrize("T,B", [(16, 5)])  # the default T (the model's context) is in the next test
def test_eval_matches_transformers_over_the_whole_val_split(tmp_path, gpt2_data, capsys, T, B):
    hf_dir = tmp_path / "hf"
    hf_model = make_hf_model(hf_dir, vocab_size=50257, n_positions=64, n_embd=32)
    args = ["eval", "--model", str(hf_dir), "--data", str(gpt2_data), "--batch-size", str(B)]
    if T:
        args += ["--block-size", str(T)]
    assert main(args) == 0
    loss, ppl, n = parse_eval(capsys.readouterr().out)
    ref, ref_n = reference_loss(hf_model, gpt2_data, T or 64)
    meta = json.loads((gpt2_data / "meta.json").read_text())
    assert n == ref_n == meta["val_tokens"] - 1
    assert loss == pytest.approx(ref, abs=1e-4)
    assert ppl == pytest.approx(math.exp(ref), rel=1e-3)


def test_evaluate_model_library_function(tmp_path, gpt2_data):
    from gptkit.evaluate import evaluate_model

    hf_dir = tmp_path / "hf"
    hf_model = make_hf_model(hf_dir, vocab_size=50257, n_positions=32, n_embd=32, n_layer=1)
    loss, n = evaluate_model(str(hf_dir), str(gpt2_data), batch_size=7, device="cpu")
    ref, ref_n = reference_loss(hf_model, gpt2_data, 32)
    assert n == ref_n and loss == pytest.approx(ref, abs=1e-4)


def test_eval_bad_input_is_one_line_error(tmp_path, gpt2_data, capsys):
    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir)  # vocab 320: too small for GPT-2 tokens
    capsys.readouterr()
    cases = [
        (["--model", str(hf_dir), "--data", str(tmp_path / "nope")], "data directory not found"),
        (["--model", str(hf_dir), "--data", str(gpt2_data)], "vocab"),
        (["--model", str(tmp_path / "missing"), "--data", str(gpt2_data)], "no such file"),
        (["--model", str(hf_dir), "--data", str(gpt2_data), "--batch-size", "0"], "--batch-size"),
        (["--model", str(hf_dir), "--data", str(gpt2_data), "--block-size", "1000"], "--block-size"),
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_train_gpt2_tokens_end_to_end_then_eval(tmp_path, gpt2_data, capsys):
    """Done-when of the data issue: `gptkit train --data DIR` on GPT-2 shards, then `gptkit eval`."""
    run = tmp_path / "run"
    rc = main(["train", "--data", str(gpt2_data), "--model", "gpt2-tiny", "--out", str(run), "--threads", "1",
               "max_steps=4", "batch_size=4", "block_size=32", "warmup_steps=1", "eval_interval=2",
               "eval_batches=2", "sample_tokens=8", "log_interval=1", "progress=false", "device=cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("train_loss") is not None][-1] in (3, 4)
    first = next(x["train_loss"] for x in lines if x.get("train_loss") is not None)  # step 0: val only
    assert math.log(50257) - 1 < first < math.log(50257) + 1  # fresh GPT-2-vocab model
    assert any("val_loss" in x for x in lines)
    assert list(run.glob("ckpt_*"))
    assert main(["eval", "--model", str(run), "--data", str(gpt2_data)]) == 0
    loss, ppl, n = parse_eval(capsys.readouterr().out)
    assert 0 < loss < math.log(50257) + 1 and n == json.loads((gpt2_data / "meta.json").read_text())["val_tokens"] - 1


def test_eval_data_without_meta_json_checks_token_ids_against_the_model(tmp_path, capsys):
    """llm.c's own shards come without meta.json: ids beyond the model's vocab are a one-line error,
    not an IndexError from the embedding."""
    from gptkit.data import write_shard

    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir)  # vocab 320
    data = tmp_path / "llmc-shards"
    data.mkdir()
    write_shard(data / "val.bin", np.arange(0, 2000, 7, dtype=np.uint16))  # ids up to 1995 > 320
    capsys.readouterr()
    assert main(["eval", "--model", str(hf_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "vocab" in err and "\n" not in err, err

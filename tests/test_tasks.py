"""`gptkit eval --task`: HellaSwag scored as llm.c's dev/data/hellaswag.py does, and any
multiple-choice jsonl; and bits per byte of `gptkit eval --data`.

The references are independent of gptkit: transformers' GPT2LMHeadModel computes every choice's
log-probabilities one choice at a time (no batch, no padding), tokenized by tiktoken built
straight from gpt2.tiktoken; bits per byte is worked out by hand from the text."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_file, make_hf_model
from gptkit import tasks
from gptkit.cli import main
from test_prepare import http_root  # noqa: F401  (the 127.0.0.1 file server fixture)

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# HellaSwag-format items written for these tests: the official layout (ctx_a, ctx_b, ctx, endings,
# label, plus fields the scorer ignores), endings of different token lengths so that every item's
# batch is padded, multi-token words, punctuation and a non-ASCII character.
ITEMS = [
    {"ind": 4, "activity_label": "Removing ice from car",
     "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
              "smiles.",
     "ctx_b": "then",
     "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
            "smiles. then",
     "endings": [", the man adds wax to the windshield and cuts it.",
                 ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes "
                 "snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."],
     "label": 3, "split": "val", "split_type": "indomain", "source_id": "activitynet~v_-1IBHYS3L-Y"},
    {"ctx": "A cat sits on the windowsill. It",
     "endings": ["jumps down.", "purrs loudly at the pigeons outside the café window.", "is blue", "sleeps"],
     "label": 0, "ctx_a": "A cat sits on the windowsill.", "ctx_b": "it"},
    {"ctx": "She opened the oven and",
     "endings": ["took out a tray of cookies", "x", "sang a song about the 1990s, loudly!", "closed it again."],
     "label": 2},
    {"ctx": "The stock market",
     "endings": ["rose 3.5% on Tuesday.", "fell", "was closed for the holiday weekend, traders said.",
                 "ate a sandwich"],
     "label": 1},
    {"ctx": "To make tea, boil water, then",
     "endings": ["pour it over the leaves.", "freeze it.", "add the tea bag and wait three minutes before drinking.",
                 "run"],
     "label": 0},
]


@pytest.fixture(scope="module")
def ref_enc():
    """tiktoken's GPT-2 encoding built from gpt2.tiktoken, independently of gptkit's loader."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = data_file("gpt2.tiktoken")
    return tiktoken.Encoding("gpt2-ref", pat_str=GPT2_PAT, mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """(HF directory, transformers model): a tiny random GPT-2 with GPT-2's vocabulary and a
    64-token context. initializer_range 0.5 makes the logits far from uniform, so errors show."""
    d = tmp_path_factory.mktemp("bpe-model") / "hf"
    model = make_hf_model(d, initializer_range=0.5, vocab_size=50257, n_positions=64, n_embd=32,
                          bos_token_id=50256, eos_token_id=50256)
    return d, model


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def reference_losses(hf_model, enc, ctx: str, endings, max_len: int):
    """Per ending (summed loss, mean loss) from transformers, one ending at a time: the last
    tokens of the context (as many as fit beside the longest ending), then " " + ending."""
    c = enc.encode_ordinary(ctx)
    ends = [enc.encode_ordinary(" " + e) for e in endings]
    keep = max_len - max(len(e) for e in ends)
    c = c[-keep:] if len(c) > keep else c
    out = []
    with torch.no_grad():
        for e in ends:
            ids = torch.tensor([c + e])
            logp = torch.log_softmax(hf_model(ids).logits.double(), dim=-1)[0]  # (T, V)
            nll = [-logp[len(c) - 1 + j, e[j]].item() for j in range(len(e))]
            out.append((sum(nll), sum(nll) / len(nll)))
    return out


def reference_scores(hf_model, enc, items, max_len=64, fields=("ctx", "endings", "label")):
    correct = correct_norm = 0
    for it in items:
        losses = reference_losses(hf_model, enc, it[fields[0]], it[fields[1]], max_len)
        correct += int(np.argmin([s for s, _ in losses])) == it[fields[2]]
        correct_norm += int(np.argmin([m for _, m in losses])) == it[fields[2]]
    return correct / len(items), correct_norm / len(items)


# ---------------------------------------------------------------------------------------------- scoring

def test_choice_losses_in_one_padded_batch_equal_transformers_one_by_one(bpe_model, ref_enc, gpt2_vocab_path):
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    d, hf = bpe_model
    loaded = load_model(d)
    tok = tokenizer_for(loaded, gpt2_vocab_path)
    for n, it in enumerate(ITEMS, 1):
        item = tasks.Item(it["ctx"], tuple(it["endings"]), it["label"], n)
        tokens, mask, truncated = tasks.render(item, tok.encode, 64)
        lengths = [len(ref_enc.encode_ordinary(" " + e)) for e in it["endings"]]
        assert not truncated and mask.sum(1).tolist() == lengths
        assert len(set(lengths)) > 1 and max(lengths) > 1  # padded, multi-token
        with torch.no_grad():
            total, mean = tasks.choice_losses(loaded.model(tokens), tokens, mask)
        ref = reference_losses(hf, ref_enc, it["ctx"], it["endings"], 64)
        torch.testing.assert_close(total.double(), torch.tensor([s for s, _ in ref], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mean.double(), torch.tensor([m for _, m in ref], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)


def test_hellaswag_cli_acc_and_acc_norm_equal_transformers(bpe_model, ref_enc, gpt2_vocab_path, tmp_path, capsys):
    d, hf = bpe_model
    f = write_jsonl(tmp_path / "hs.jsonl", ITEMS)
    acc, acc_norm = reference_scores(hf, ref_enc, ITEMS)
    assert main(["eval", "--model", str(d), "--task", "hellaswag", "--data-file", str(f), "--json",
                 "--vocab", str(gpt2_vocab_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    got = json.loads(out[0])
    assert set(got) == {"task", "n", "acc", "acc_norm"}
    assert got["task"] == "hellaswag" and got["n"] == len(ITEMS)
    assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)
    # --limit: the first N items only; the plain output says the same
    acc2, acc_norm2 = reference_scores(hf, ref_enc, ITEMS[:2])
    assert main(["eval", "--model", str(d), "--task", "hellaswag", "--data-file", str(f), "--limit", "2",
                 "--vocab", str(gpt2_vocab_path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"hellaswag: acc {acc2:.4f}, acc_norm {acc_norm2:.4f} over 2 items"


def test_mc_task_reads_context_choices_label_and_scores_like_hellaswag(bpe_model, ref_enc, gpt2_vocab_path,
                                                                       tmp_path, capsys):
    d, hf = bpe_model
    rows = [{"context": it["ctx"], "choices": it["endings"][: 2 + n % 3], "label": min(it["label"], 1 + n % 3)}
            for n, it in enumerate(ITEMS)]  # 2, 3 or 4 choices
    f = write_jsonl(tmp_path / "mc.jsonl", rows)
    acc, acc_norm = reference_scores(hf, ref_enc, rows, fields=("context", "choices", "label"))
    assert main(["eval", "--model", str(d), "--task", "mc", "--data-file", str(f), "--json",
                 "--vocab", str(gpt2_vocab_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"task": "mc", "n": len(rows), "acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm)}


def test_long_context_is_cut_from_the_left_and_counted(bpe_model, ref_enc, gpt2_vocab_path, tmp_path, capsys):
    d, hf = bpe_model
    long_ctx = " ".join(f"word{i}" for i in range(60)) + ". Then"  # well over 64 tokens
    rows = [{"ctx": long_ctx, "endings": ["he left.", "she stayed for the rest of the evening.", "it rained", "no"],
             "label": 1}, ITEMS[1]]
    f = write_jsonl(tmp_path / "long.jsonl", rows)
    acc, acc_norm = reference_scores(hf, ref_enc, rows, max_len=64)
    assert main(["eval", "--model", str(d), "--task", "hellaswag", "--data-file", str(f),
                 "--vocab", str(gpt2_vocab_path)]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == (f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 2 items "
                               "(1 contexts cut from the left to fit the model)")
    assert "note: 1 of 2 contexts were cut from the left" in cap.err
    # the kept context is the context's last tokens, exactly filling the model's 64 positions
    from gptkit.tokenizer import load_bpe_vocab

    tok = load_bpe_vocab(gpt2_vocab_path)
    item = tasks.Item(rows[0]["ctx"], tuple(rows[0]["endings"]), 1)
    tokens, mask, truncated = tasks.render(item, tok.encode, 64)
    ctx = ref_enc.encode_ordinary(long_ctx)
    longest = int(mask.sum(1).max())
    assert truncated and tokens.shape[1] == 64
    assert tokens[0, : 64 - longest].tolist() == ctx[-(64 - longest):]


def test_a_choice_longer_than_the_model_context_is_an_error(bpe_model, gpt2_vocab_path, tmp_path, capsys):
    d, _ = bpe_model
    f = write_jsonl(tmp_path / "x.jsonl", [{"ctx": "a", "endings": ["b" * 200, "c"], "label": 0}])
    assert main(["eval", "--model", str(d), "--task", "hellaswag", "--data-file", str(f),
                 "--vocab", str(gpt2_vocab_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a choice is ") and "more than the model's context of 64" in err
    assert "(line 1)" in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------- bad input

BAD = [
    ("no-endings", [{"ctx": "a b", "label": 0}], "error: no `endings` (", ":1)"),
    ("no-label", [ITEMS[1], {"ctx": "a b", "endings": ["x", "y"]}], "error: no `label` (", ":2)"),
    ("label-range", [{"ctx": "a", "endings": ["x", "y", "z", "w"], "label": 4}],
     "error: `label` 4 is out of range for 4 endings (", "0..3"),
    ("label-negative", [{"ctx": "a", "endings": ["x", "y"], "label": -1}], "error: `label` -1 is out of range", ""),
    ("label-type", [{"ctx": "a", "endings": ["x", "y"], "label": 0.5}], "error: `label` must be an int", ""),
    ("empty", [], "error: no items: the file is empty (", ""),
    ("blank-lines", ["", "  "], "error: no items: the file is empty (", ""),
    ("not-json", ['{"ctx": "a", '], "error: not valid JSON", ":1)"),
    ("not-object", ["[1, 2]"], "error: expected a JSON object, got list", ""),
    ("one-ending", [{"ctx": "a", "endings": ["x"], "label": 0}], "error: `endings` must be a list of 2 or more", ""),
    ("empty-ctx", [{"ctx": "", "endings": ["x", "y"], "label": 0}], "error: `ctx` is empty", ""),
    ("mc-layout", [{"context": "a", "choices": ["x", "y"], "label": 0}], "error: no `ctx`, `endings` (", "--task mc"),
]


@pytest.mark.parametrize("name,rows,start,contains", BAD, ids=[b[0] for b in BAD])
def test_bad_task_file_is_one_line_error_before_the_model_loads(tmp_path, capsys, name, rows, start, contains):
    f = write_jsonl(tmp_path / f"{name}.jsonl", rows) if rows else tmp_path / "empty.jsonl"
    if not rows:
        f.write_bytes(b"")
    # the model does not exist: the data is checked first, so the error is about the data
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--task", "hellaswag", "--data-file", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and contains in err and "\n" not in err, err


@pytest.mark.parametrize("argv,message", [
    (["--task", "mc"], "error: --task mc needs a data file (--data-file)"),
    (["--task", "hellaswag", "--limit", "0"], "error: must be > 0, got 0 (--limit)"),
    (["--task", "piqa"], "invalid choice"),
    ([], "error: give either --data DIR or --task NAME"),
    (["--task", "mc", "--data-file", "missing.jsonl"], "error: file not found (missing.jsonl)"),
    (["--data", "d", "--json"], "error: --data-file, --limit and --json go with --task"),
])
def test_bad_eval_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["eval", "--model", "gpt2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_mc_with_unknown_characters_for_a_char_model_names_the_line(tmp_path, capsys):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import GPTConfig
    from gptkit.model import GPT

    chars = [" ", "a", "b", "c"]
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=len(chars)))
    save_checkpoint(tmp_path / "run", 1, m, {"model_config": m.config.to_dict(), "chars": chars})
    f = write_jsonl(tmp_path / "mc.jsonl", [{"context": "ab", "choices": ["c", "a b"], "label": 0},
                                             {"context": "ab", "choices": ["c", "xyz"], "label": 1}])
    assert main(["eval", "--model", str(tmp_path / "run"), "--task", "mc", "--data-file", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: character 'x' is not in the model's vocabulary (line 2)"), err


# ---------------------------------------------------------------------------------------------- data lookup

def test_hellaswag_file_lookup_order_then_download_into_cache(tmp_path, monkeypatch, http_root):  # noqa: F811
    www, url, hits = http_root
    write_jsonl(www / "hellaswag_val.jsonl", ITEMS)
    monkeypatch.setenv("GPTKIT_HELLASWAG_URL", f"{url}/hellaswag_val.jsonl")
    data, cache = tmp_path / "data", Path(os.environ["GPTKIT_CACHE"])
    data.mkdir()
    own = write_jsonl(tmp_path / "own.jsonl", ITEMS[:1])
    write_jsonl(data / "hellaswag_val.jsonl", ITEMS[:2])
    monkeypatch.setenv("GPTKIT_DATA", str(data))
    assert tasks.hellaswag_path(own) == own
    assert tasks.hellaswag_path() == data / "hellaswag_val.jsonl"
    assert hits == []
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "none"))
    assert len(tasks.task_items("hellaswag")) == len(ITEMS)  # downloaded
    assert hits == ["/hellaswag_val.jsonl"]
    assert (cache / "hellaswag_val.jsonl").read_bytes() == (www / "hellaswag_val.jsonl").read_bytes()
    assert not list(cache.glob("*.part"))
    assert len(tasks.task_items("hellaswag", limit=3)) == 3  # from the cache: no second request
    assert hits == ["/hellaswag_val.jsonl"]


def test_failed_hellaswag_download_is_one_line_error(tmp_path, monkeypatch, http_root, capsys):  # noqa: F811
    www, url, hits = http_root
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("GPTKIT_HELLASWAG_URL", f"{url}/missing.jsonl")
    assert main(["eval", "--model", "gpt2", "--task", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: download failed") and "\n" not in err
    assert not list(Path(os.environ["GPTKIT_CACHE"]).glob("*"))


# ---------------------------------------------------------------------------------------------- bits per byte

def _eval_line(capsys):
    import re

    out = capsys.readouterr().out
    m = re.search(r"loss ([\d.]+), perplexity [\d.]+ over ([\d,]+) tokens, ([\d.]+) bits per byte \(([\d,]+) bytes\)",
                  out)
    assert m, out
    return float(m.group(1)), int(m.group(2).replace(",", "")), float(m.group(3)), int(m.group(4).replace(",", ""))


def _val_tokens(d: Path) -> np.ndarray:
    return np.concatenate([np.frombuffer(f.read_bytes()[1024:], dtype="<u2").astype(np.int64)
                           for f in sorted(d.glob("val*.bin"))])


def _hf_total_nats(hf, toks: np.ndarray, T: int) -> float:
    """transformers' summed loss over every token but the first, in windows of T."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(toks) - 1, T):
            w = torch.from_numpy(toks[s:s + T + 1])[None]
            logp = torch.log_softmax(hf(w[:, :-1]).logits.double(), -1)
            total -= logp.gather(-1, w[:, 1:, None]).sum().item()
    return total


@pytest.mark.parametrize("text,ascii_only", [("the cat sat on the mat.\nto be or not to be\n" * 40, True),
                                             ("naïve café — ½ été\nnaïve\n" * 40, False)])
def test_bits_per_byte_on_a_char_model(tmp_path, capsys, text, ascii_only):
    from gptkit.prepare import prepare

    src = tmp_path / "text.txt"
    src.write_text(text, encoding="utf-8")
    data = prepare(str(src), tokenizer="char", out=tmp_path / "data", val_fraction=0.25, progress=False)
    meta = json.loads((data / "meta.json").read_text())
    hf = make_hf_model(tmp_path / "m", initializer_range=0.5, vocab_size=meta["vocab_size"], n_positions=32)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--block-size", "32"]) == 0
    loss, n, bpb, n_bytes = _eval_line(capsys)
    toks = _val_tokens(data)
    target_text = "".join(meta["chars"][i] for i in toks[1:])  # by hand: the predicted characters
    assert n == len(toks) - 1
    assert n_bytes == len(target_text.encode("utf-8"))
    if ascii_only:
        assert n_bytes == n  # one byte per character
        assert bpb == pytest.approx(loss / math.log(2), abs=2e-4)
    else:
        assert n_bytes > n
    total = _hf_total_nats(hf, toks, 32)
    assert bpb == pytest.approx(total / math.log(2) / n_bytes, abs=1e-4)


def test_bits_per_byte_on_gpt2_tokens_counts_each_tokens_bytes(tmp_path, capsys, ref_enc, gpt2_vocab_path,
                                                               bpe_model):
    from gptkit.prepare import prepare

    (tmp_path / "docs").mkdir()
    docs = [("a", "Hello world, naïve café. "), ("b", "To be or not to be — ½ ☃. "), ("c", "Übermensch! ")]
    for name, text in docs:
        (tmp_path / "docs" / f"{name}.txt").write_text(text * 8, encoding="utf-8")
    data = prepare(str(tmp_path / "docs"), tokenizer="gpt2", vocab=str(gpt2_vocab_path), out=tmp_path / "data",
                   val_fraction=0.5, progress=False)
    d, hf = bpe_model
    assert main(["eval", "--model", str(d), "--data", str(data), "--vocab", str(gpt2_vocab_path)]) == 0
    loss, n, bpb, n_bytes = _eval_line(capsys)
    toks = _val_tokens(data)
    assert 50256 in toks[1:]  # a document boundary among the predicted tokens
    # by hand: each predicted token's bytes from tiktoken; <|endoftext|> stands for no text
    expected = sum(len(ref_enc.decode_single_token_bytes(int(t))) for t in toks[1:] if t != 50256)
    assert n_bytes == expected
    assert bpb == pytest.approx(_hf_total_nats(hf, toks, 64) / math.log(2) / expected, abs=1e-4)


def test_token_byte_lengths_of_a_char_tokenizer_are_utf8_lengths():
    from gptkit.tokenizer import CharTokenizer

    from gptkit.evaluate import token_byte_lengths

    t = token_byte_lengths(CharTokenizer(["\n", "a", "é", "☃", "😀"]), 7)
    assert t.tolist() == [1, 1, 2, 3, 4, 0, 0]


# ---------------------------------------------------------------------------------------------- during training

TEXT = "".join(f"the cat sat on the mat. then, the dog ran to the door and it was open.\n" for _ in range(300))
# HellaSwag-layout items in the char vocabulary of TEXT
CHAR_ITEMS = [
    {"ctx": "the cat sat on the", "endings": ["mat.", "dog ran", "door", "open."], "label": 0},
    {"ctx": "then, the dog ran to the", "endings": ["cat", "door.", "mat", "sat"], "label": 1},
    {"ctx": "it was", "endings": ["the cat", "mat.", "open.", "then"], "label": 2},
]


def _train(char_data, out, **kw):
    from gptkit.config import resolve_config
    from gptkit.train import train

    base = dict(data=str(char_data), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, block_size=16,
                max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=2, sample_tokens=0,
                progress=False, dtype="float32", max_time=0)
    base.update(kw)
    cfg, mov = resolve_config(None, {k: str(v) for k, v in base.items()})
    return train(cfg, mov, log=lambda *a, **k: None)


def test_eval_tasks_during_training_log_acc_norm_at_every_eval(char_data, tmp_path, capsys):
    f = write_jsonl(tmp_path / "hs.jsonl", CHAR_ITEMS + [{"ctx": "the", "endings": ["x", "y"], "label": 0}])
    _train(char_data, tmp_path / "run", eval_tasks="hellaswag", eval_task_file=f, eval_task_limit=3)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the step-0 row is the initial weights' val loss alone (kept cheap: it runs inside the time budget)
    assert rows[0]["step"] == 0 and "val_loss" in rows[0] and "hellaswag_acc_norm" not in rows[0]
    evals = [r for r in rows if "val_loss" in r and r["step"] > 0]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1].get("final")
    for r in evals:
        assert 0 <= r["hellaswag_acc_norm"] <= 1 and 0 <= r["hellaswag_acc"] <= 1
        assert r["hellaswag_acc_norm"] * 3 == pytest.approx(round(r["hellaswag_acc_norm"] * 3), abs=1e-4)
    assert not any("hellaswag_acc_norm" in r for r in rows if "val_loss" not in r)
    # the final row's figures are what `gptkit eval --task` says of the saved model
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--task", "hellaswag", "--data-file", str(f),
                 "--limit", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["acc"] == pytest.approx(evals[-1]["hellaswag_acc"], abs=1e-6)
    assert got["acc_norm"] == pytest.approx(evals[-1]["hellaswag_acc_norm"], abs=1e-6)


@pytest.mark.parametrize("kw,message", [
    (dict(eval_tasks="piqa"), "error: unknown task 'piqa' (eval_tasks)"),
    (dict(eval_tasks="mc"), "error: --task mc needs a data file"),
    (dict(eval_tasks="hellaswag", eval_task_file="FILE", eval_task_limit=-1), "eval_task_limit"),
    (dict(eval_tasks="hellaswag,mc", eval_task_file="FILE"), "eval_task_file goes with exactly one task"),
    (dict(eval_tasks="hellaswag", eval_task_file="BAD"), "error: no `label`"),
    (dict(eval_tasks="hellaswag", eval_task_file="NONCHAR"), "error: character 'Z' is not in the model's vocabulary"),
])
def test_bad_eval_tasks_stop_the_run_before_its_first_step(char_data, tmp_path, capsys, kw, message):
    f = write_jsonl(tmp_path / "hs.jsonl", CHAR_ITEMS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "the", "endings": ["cat", "dog"]}])
    nonchar = write_jsonl(tmp_path / "nonchar.jsonl", [{"ctx": "the", "endings": ["Zebra", "dog"], "label": 0}])
    files = {"FILE": f, "BAD": bad, "NONCHAR": nonchar}
    kw = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    argv = ["train", "--data", str(char_data), "--out", str(tmp_path / "run"), "n_layer=1", "n_head=2", "n_embd=16",
            "max_steps=2", "max_time=0", "progress=false", *[f"{k}={v}" for k, v in kw.items()]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    # nothing that would refuse the same --out once the file is fixed: no metrics.jsonl, no checkpoint
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list((tmp_path / "run").glob("ckpt_*"))


# ---------------------------------------------------------------------------------------------- HF tokenizers

MC_ROWS = [
    {"context": "The quick brown fox", "choices": ["jumps over the lazy dog.", "is a fox", "sleeps"], "label": 0},
    {"context": "It's 3.14159 o'clock; we'll", "choices": ["see you're fine.", "eat", "run fast"], "label": 0},
    {"context": "for (int i = 0; i < n; i++)", "choices": ["{ sum += x[i] * 2; }", "hello", "return"], "label": 0},
]


def test_hf_tokenizer_choices_are_split_from_the_joint_encoding_as_lm_eval_does(tmp_path, capsys):
    """A Llama-2-style SentencePiece tokenizer makes " choice" on its own start with a lone "▁"
    token; gptkit encodes context + " " + choice whole and splits after the context's ids, as
    lm-evaluation-harness does. Reference: transformers' AutoTokenizer + GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizers = pytest.importorskip("hf_tokenizers")
    d = hf_tokenizers.build_llama2(tmp_path / "m")
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    hf = make_hf_model(d, initializer_range=0.5, vocab_size=len(ref_tok), n_positions=64)
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    correct = correct_norm = 0
    apart_differs, ref = False, []
    for r in MC_ROWS:
        c = ref_tok.encode(r["context"], add_special_tokens=False)
        losses = []
        for ch in r["choices"]:
            whole = ref_tok.encode(r["context"] + " " + ch, add_special_tokens=False)
            ctx, cont = whole[:len(c)], whole[len(c):]
            apart_differs |= cont != ref_tok.encode(" " + ch, add_special_tokens=False)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits.double(), -1)[0]
            nll = [-logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)]
            losses.append((sum(nll), sum(nll) / len(nll)))
        correct += int(np.argmin([s for s, _ in losses])) == r["label"]
        correct_norm += int(np.argmin([m for _, m in losses])) == r["label"]
        ref.append(losses)
    assert apart_differs  # the case this guards: encoding " choice" alone would score other tokens
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    loaded = load_model(d)
    encode, joint = tasks.task_encoding(tokenizer_for(loaded))
    assert joint
    for r, losses in zip(MC_ROWS, ref):
        tokens, mask, _ = tasks.render(tasks.Item(r["context"], tuple(r["choices"]), r["label"]), encode, 64, joint)
        with torch.no_grad():
            total, mean = tasks.choice_losses(loaded.model(tokens), tokens, mask)
        assert total.tolist() == pytest.approx([s for s, _ in losses], rel=1e-5, abs=1e-4)
        assert mean.tolist() == pytest.approx([m for _, m in losses], rel=1e-5, abs=1e-4)
    assert main(["eval", "--model", str(d), "--task", "mc", "--data-file", str(f), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["acc"] == pytest.approx(correct / len(MC_ROWS)) and got["acc_norm"] == pytest.approx(
        correct_norm / len(MC_ROWS))


def test_hellaswag_on_a_llama_family_model_equals_transformers(ref_enc, gpt2_vocab_path, tmp_path, capsys):
    """The scorer only needs logits: a Llama-architecture model (RoPE, RMSNorm, SwiGLU, GQA) with
    GPT-2's vocabulary scores as transformers' LlamaForCausalLM does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5, tie_word_embeddings=False))
    hf.eval()
    hf.save_pretrained(tmp_path / "llama")
    from gptkit.loading import load_model
    from gptkit.tokenizer import tokenizer_for

    loaded = load_model(tmp_path / "llama")
    encode = tokenizer_for(loaded, gpt2_vocab_path).encode
    for it in ITEMS:  # every choice's summed loss, in one padded batch, equals transformers' one by one
        tokens, mask, _ = tasks.render(tasks.Item(it["ctx"], tuple(it["endings"]), it["label"]), encode, 64)
        with torch.no_grad():
            total, _ = tasks.choice_losses(loaded.model(tokens), tokens, mask)
        ref = reference_losses(hf, ref_enc, it["ctx"], it["endings"], 64)
        assert total.tolist() == pytest.approx([t for t, _ in ref], rel=1e-5, abs=1e-4)
    f = write_jsonl(tmp_path / "hs.jsonl", ITEMS)
    acc, acc_norm = reference_scores(hf, ref_enc, ITEMS)
    assert main(["eval", "--model", str(tmp_path / "llama"), "--task", "hellaswag", "--data-file", str(f), "--json",
                 "--vocab", str(gpt2_vocab_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)

"""Speculative decoding changes no output: greedy tokens equal plain decoding's (GPT-2 and Llama
tiny models, prompt lookup and a draft model), and sampled tokens follow the target's exact
distribution (a chi-square test against the probabilities computed from the target itself)."""

import itertools

import pytest
import torch

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.speculative import ModelDrafter, NgramDrafter, speculative_generate, target_probs


def tiny(family="gpt2", vocab_size=64, block_size=64, std=0.5, seed=0, n_layer=2):
    torch.manual_seed(seed)
    kw = dict(n_kv_head=1, n_head=2) if family == "llama" else dict(n_head=2)
    m = GPT(GPTConfig(family=family, block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_embd=32, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


PROMPTS = [
    [5],
    [1, 2, 3, 4, 1, 2, 3, 4, 1, 2],  # repetitive: prompt lookup drafts get accepted
    [7, 7, 7, 7, 7, 7],
    list(range(10, 30)) + list(range(10, 20)),
]


def plain_greedy(model, prompt, n):
    return generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_speculative_equals_plain_decoding(family):
    model = tiny(family)
    draft = tiny(family, seed=1, n_layer=1)
    accepted = 0
    for prompt in PROMPTS:
        want = plain_greedy(model, prompt, 24)
        for drafter, k in ((NgramDrafter(), 1), (NgramDrafter(), 4), (ModelDrafter(draft), 3)):
            got, stats = speculative_generate(model, prompt, drafter, 24, k=k)
            assert got == want, (prompt, type(drafter).__name__, k)
            accepted += stats.accepted
        # the target drafting for itself: every draft is accepted
        got, stats = speculative_generate(model, prompt, ModelDrafter(model), 24, k=3)
        assert got == want and stats.accepted == stats.drafted
    assert accepted > 10  # drafts were kept, so the rollback paths ran


def test_greedy_speculative_runs_past_the_context_and_stops_at_stop_ids():
    model = tiny(block_size=24)
    prompt = [1, 2, 3, 1, 2, 3]
    want = plain_greedy(model, prompt, 40)  # slides its window past 24 tokens
    got, _ = speculative_generate(model, prompt, NgramDrafter(), 40, k=4)
    assert got == want
    stop = want[5]
    got, _ = speculative_generate(model, prompt, ModelDrafter(tiny(block_size=24, seed=3)), 40, stop_ids=[stop])
    assert got == want[:want.index(stop)]


def test_draft_model_with_another_vocabulary_is_an_error():
    with pytest.raises(GptkitError, match="tokenizer"):
        speculative_generate(tiny(), [1], ModelDrafter(tiny(vocab_size=32)), 4)


def exact_first_tokens(model, prompt, n, sampling):
    """P(first n tokens) of plain sampling, enumerated: {tuple: prob}."""
    V = model.config.vocab_size
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n):
            pr = 1.0
            for i in range(n):
                probs = target_probs(model(torch.tensor([prompt + list(seq[:i])]))[0, -1:], *sampling)[0]
                pr *= float(probs[seq[i]])
                if pr == 0:
                    break
            out[seq] = pr
    return out


def chi_square_pvalue(counts: dict, probs: dict, N: int) -> float:
    """Pearson's chi-square of observed counts against probs, cells with expected < 5 pooled."""
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for key, p in probs.items():
        if p * N >= 5:
            obs.append(counts.get(key, 0))
            exp.append(p * N)
        else:
            pool_o += counts.get(key, 0)
            pool_e += p * N
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    obs, exp = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("drafter_kind,sampling", [
    ("ngram", (1.0, None, None)),
    pytest.param("draft", (0.8, 5, 0.9), marks=pytest.mark.slow),  # a draft forward per drafted token
])
def test_sampled_speculative_has_the_target_distribution(drafter_kind, sampling):
    V, n, N = 8, 2, 2000
    model = tiny(vocab_size=V, std=0.3)
    prompt = [1, 2, 3, 1, 2]  # prompt lookup drafts 3, 1, ... from the start
    drafter = NgramDrafter() if drafter_kind == "ngram" else ModelDrafter(tiny(vocab_size=V, std=0.3, seed=5))
    g = torch.Generator().manual_seed(1234)
    if drafter_kind == "draft":
        drafter.generator = g
    counts, drafted, accepted = {}, 0, 0
    for _ in range(N):
        out, stats = speculative_generate(model, prompt, drafter, n + 1, k=3, temperature=sampling[0],
                                          top_k=sampling[1], top_p=sampling[2], generator=g)
        key = tuple(out[:n])
        counts[key] = counts.get(key, 0) + 1
        drafted += stats.drafted
        accepted += stats.accepted
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    probs = exact_first_tokens(model, prompt, n, sampling)
    assert abs(sum(probs.values()) - 1) < 1e-5
    assert all(probs[k] > 0 for k in counts)  # nothing outside top-k/top-p was ever produced
    assert chi_square_pvalue(counts, probs, N) > 0.001


def test_sample_cli_speculative_prints_plain_decodings_text_and_refuses_another_tokenizer(capsys, tmp_path):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.cli import main

    chars = list("abcd\n")
    for name, seed, cs in (("big", 0, chars), ("small", 1, chars), ("other", 2, list("wxyz\n"))):
        m = tiny(vocab_size=5, block_size=32, seed=seed, n_layer=2 if name == "big" else 1)
        save_checkpoint(tmp_path / name, 1, m, {"model_config": m.config.to_dict(), "chars": cs})
    base = ["sample", "--model", str(tmp_path / "big"), "--prompt", "abcabcab", "--temperature", "0",
            "--max-new-tokens", "20"]
    assert main(base) == 0
    want = capsys.readouterr().out
    for extra in (["--speculative", "ngram"], ["--draft-model", str(tmp_path / "small"), "--draft-k", "3"]):
        assert main(base + extra) == 0
        out, err = capsys.readouterr()
        assert out == want and "drafts accepted" in err
    assert main(base + ["--draft-model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--draft-model" in err and "tokenizer" in err


def test_bench_speculative_reports_acceptance_and_the_same_tokens(gpt2_vocab_path):
    from gptkit.bench.speculative import bench_speculative, first_layers
    from gptkit.quantize import quantize_for_inference
    from gptkit.tokenizer import gpt2_tokenizer

    model = tiny(vocab_size=50257, block_size=256, std=0.2)
    tok = gpt2_tokenizer(str(gpt2_vocab_path))
    draft = quantize_for_inference(first_layers(model, 1), "float32")
    for kind, d in (("ngram", None), ("draft", draft)):
        rows = bench_speculative(quantize_for_inference(model, "float32"), tok, kind, d, new_tokens=8, repeats=1)
        assert [r["text"] for r in rows] == ["repetitive", "plain"]
        assert all(r["same"] and 0 <= r["acceptance"] <= 1 and r["speedup"] > 0 for r in rows)

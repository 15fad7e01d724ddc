"""The generation engine on its own: filters, the fused sampler, KV cache vs recompute, padded
batches, seeds, stop strings, streaming text and long prompts."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams, TextStream, generate, generate_batch, prepare_prompt
from gptkit.model import GPT
from gptkit.sample import candidate_probs, repetition_penalty, sample_from_logits, top_k_filter, top_p_filter
from gptkit.tokenizer import CharTokenizer, load_bpe_vocab

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(vocab_size=96, block_size=48, std=0.5, seed=0, **kw):
    """A tiny random GPT (or, with kw, another 2-layer shape) with large weights, so greedy choices
    are rarely near-ties."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{"block_size": block_size, "vocab_size": vocab_size, "n_layer": 2, "n_head": 2,
                         "n_embd": 32, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


def char_tok(n=96):
    return CharTokenizer([chr(32 + i) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# pure functions

def test_fused_sampler_distribution_equals_reference_filters():
    torch.manual_seed(1)
    logits = torch.randn(4, 200) * 3
    temps = torch.tensor([1.0, 0.7, 1.3, 2.0])
    ks = torch.tensor([200, 50, 5, 120])
    ps = torch.tensor([0.9, 1.0, 0.5, 0.95])
    probs, ids = candidate_probs(logits, temps, ks, ps)
    got = torch.zeros_like(logits).scatter_(1, ids, probs / probs.sum(-1, keepdim=True))
    for i in range(4):
        ref = top_p_filter(top_k_filter(logits[i:i + 1] / temps[i], int(ks[i])), float(ps[i]))
        torch.testing.assert_close(got[i], torch.softmax(ref, -1)[0], atol=1e-6, rtol=1e-5)


def _transformers_kept(logits, temperature, k, p):
    """The tokens transformers' warpers keep (temperature, top-k, top-p, in generate()'s order)."""
    transformers = pytest.importorskip("transformers")
    x = transformers.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if k:
        x = transformers.TopKLogitsWarper(k)(None, x)
    if p < 1.0:
        x = transformers.TopPLogitsWarper(p)(None, x)
    return x > float("-inf"), torch.softmax(x, -1)


@pytest.mark.parametrize("seed", range(6))
def test_filters_and_fused_sampler_keep_what_transformers_warpers_keep(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 300, generator=g) * 3
    for k, p, t in [(0, 0.9, 1.0), (50, 1.0, 0.7), (5, 0.5, 1.3), (120, 0.95, 2.0), (0, 0.3, 0.5), (20, 0.8, 1.0)]:
        kept, ref = _transformers_kept(logits, t, k, p)
        ours = top_p_filter(top_k_filter(logits / t, k or None), p)
        assert torch.equal(ours > float("-inf"), kept)
        n = logits.size(0)
        probs, ids = candidate_probs(logits, torch.full((n,), t), torch.full((n,), k or 300), torch.full((n,), p))
        got = torch.zeros_like(logits).scatter_(1, ids, probs / probs.sum(-1, keepdim=True))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_top_p_boundary_follows_transformers():
    """probs [0.5, 0.25, 0.125, 0.125], p = 0.5: the first token alone reaches p, so only it is kept
    (transformers' TopPLogitsWarper keeps {0}; a token whose preceding mass already equals p is removed)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    kept, _ = _transformers_kept(logits, 1.0, 0, 0.5)
    assert kept.tolist() == [[True, False, False, False]]
    assert (top_p_filter(logits, 0.5) > float("-inf")).tolist() == kept.tolist()
    probs, _ = candidate_probs(logits, torch.ones(1), torch.tensor([4]), torch.tensor([0.5]))
    assert (probs > 0).tolist() == kept.tolist()
    # just above the boundary the second token joins
    assert (top_p_filter(logits, 0.5001) > float("-inf")).sum() == 2


def test_fused_sampler_draws_by_inverse_cdf():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    one = torch.ones(1)
    pick = lambda u: int(sample_from_logits(logits, one, torch.tensor([3]), one, torch.tensor([u])))  # noqa: E731
    assert [pick(0.1), pick(0.6), pick(0.9)] == [0, 1, 2]
    # top-p 0.6 keeps {0, 1}; top-k 1 keeps {0}
    assert int(sample_from_logits(logits, one, torch.tensor([3]), torch.tensor([0.6]), torch.tensor([0.99]))) == 1
    assert int(sample_from_logits(logits, one, torch.tensor([1]), one, torch.tensor([0.99]))) == 0


def test_inverse_cdf_takes_the_first_token_whose_cdf_exceeds_u():
    """u lands exactly on a cdf step: the draw is the next token (u in [0, 1) covers [cdf_i-1, cdf_i)),
    so a zero-probability token is never drawn, even with u = 0."""
    from gptkit.sample import sample_unfiltered

    one = torch.ones(1)
    half = torch.log(torch.tensor([[0.5, 0.5]]))
    assert int(sample_from_logits(half, one, torch.tensor([2]), one, torch.tensor([0.5]))) == 1
    assert int(sample_unfiltered(half, one, torch.tensor([0.5]))) == 1
    masked = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert int(sample_unfiltered(masked, one, torch.tensor([0.0]))) == 1


def test_unfiltered_sampler_draws_softmax_by_inverse_cdf():
    from gptkit.sample import sample_unfiltered

    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    one = torch.ones(1)
    assert [int(sample_unfiltered(logits, one, torch.tensor([u]))) for u in (0.1, 0.6, 0.9)] == [0, 1, 2]
    # over a fine grid of u, each token gets the share of softmax(logits / T), as the fused sampler gives it
    torch.manual_seed(2)
    logits, temps = torch.randn(3, 50) * 2, torch.tensor([1.0, 0.5, 2.0])
    u = (torch.arange(20000) + 0.5) / 20000
    for i in range(3):
        rows = logits[i].expand(len(u), 50)
        t = temps[i].expand(len(u))
        got = torch.bincount(sample_unfiltered(rows, t, u), minlength=50) / len(u)
        fused = torch.bincount(sample_from_logits(rows, t, torch.full((len(u),), 50), torch.ones(len(u)), u),
                               minlength=50) / len(u)
        ref = torch.softmax(logits[i] / temps[i], -1)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
        torch.testing.assert_close(fused, ref, atol=2e-4, rtol=0)


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, ids, True)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(repetition_penalty(logits, seen, 1.3), ref)


# ---------------------------------------------------------------------------------------------
# engine

def test_kv_cache_generation_equals_full_recompute():
    m = tiny_model()
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    a = generate(m, idx, 30, temperature=0)
    b = generate(m, idx, 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    # past the context, the engine slides its window exactly like the recomputing reference
    a = generate(m, idx, 50, temperature=0)
    b = generate(m, idx, 50, temperature=0, use_cache=False)
    assert a.shape[1] == 55 and torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_padded_batch_rows_equal_generating_alone(temperature):
    m = tiny_model()
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [10, 11]]
    sps = [SamplingParams(max_new_tokens=12, temperature=temperature, top_k=40, top_p=0.9, seed=s) for s in range(4)]
    batch = generate_batch(m, prompts, sps)
    for p, sp, c in zip(prompts, sps, batch):
        alone = generate_batch(m, [p], sp)[0]
        assert c.token_ids == alone.token_ids
        assert len(c.token_ids) == 12 and c.finish_reason == "length"


def test_rows_with_different_settings_and_lengths_share_a_batch():
    m = tiny_model()
    sps = [SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=9, temperature=0.8, seed=1),
           SamplingParams(max_new_tokens=0), SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.5)]
    prompts = [[1, 2], [3], [4, 5, 6], [7, 7, 7]]
    out = generate_batch(m, prompts, sps)
    assert [len(c.token_ids) for c in out] == [3, 9, 0, 6]
    for p, sp, c in zip(prompts, sps, out):
        assert c.token_ids == generate_batch(m, [p], sp)[0].token_ids


def test_same_seed_gives_same_sample_and_other_seeds_differ():
    m = tiny_model()
    run = lambda seed: generate_batch(m, [[1, 2, 3]], SamplingParams(max_new_tokens=20, seed=seed))[0].token_ids  # noqa
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_eot_and_stop_token_ids_end_a_row_and_are_not_returned():
    m = tiny_model()
    free = generate_batch(m, [[1, 2]], SamplingParams(max_new_tokens=20, temperature=0))[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = generate_batch(m, [[1, 2]], SamplingParams(max_new_tokens=20, temperature=0), eot=stop_at)[0]
    assert out.token_ids == free[:first] and out.finish_reason == "stop"
    out = generate_batch(m, [[1, 2]], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:first]
    out = generate_batch(m, [[1, 2]], SamplingParams(max_new_tokens=20, temperature=0, ignore_eot=True),
                         eot=stop_at)[0]
    assert out.token_ids == free


def test_stop_string_spanning_tokens_ends_generation_and_is_not_returned():
    m, tok = tiny_model(), char_tok()
    prompt = tok.encode("Hi")
    free = generate_batch(m, [prompt], SamplingParams(max_new_tokens=30, temperature=0.8, seed=3), tok)[0].text
    stop = free[10:13]  # three characters = three tokens
    out = generate_batch(m, [prompt], SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, stop=[stop]), tok)[0]
    assert out.text == free[: free.index(stop)]
    assert out.finish_reason == "stop"
    # streamed pieces add up to the same text; nothing of the stop string leaks out
    gen = Generation(m, [prompt], SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, stop=[stop]), tok)
    assert "".join(e.text for e in gen) == out.text


def test_text_stream_holds_back_possible_stop_prefixes():
    s = TextStream(stops=["END", "xyz"])
    pieces = [s.push(b) for b in [b"ab", b"cE", b"N", b"x", b"E", b"ND", b"tail"]]
    assert "".join(pieces) == "abcENx"
    assert s.stopped and pieces[-1] == ""
    s = TextStream(stops=["END"])
    assert s.push(b"aE") == "a" and s.push(b"N") == "" and s.finish() == "EN"


def test_streaming_never_splits_a_utf8_character(gpt2_vocab_path):
    tok = load_bpe_vocab(gpt2_vocab_path)
    text = "naïve café 😀 日本語 🇫🇷 ok"
    ids = tok.encode(text)
    pieces_per_token = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_per_token)  # the test needs characters split across tokens
    s = TextStream()
    pieces = [s.push(tok.token_bytes(i)) for i in ids] + [s.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_engine_streams_whole_characters_from_a_bpe_model(gpt2_vocab_path):
    tok = load_bpe_vocab(gpt2_vocab_path)
    m = tiny_model(vocab_size=50257, block_size=64, std=0.02)
    # make byte tokens that only form characters together (the 😀 bytes) the likely ones, whatever
    # the seed draws: the final LayerNorm outputs a fixed vector v, and those tokens' rows point along v
    target = tok.encode("😀😀😀")
    with torch.no_grad():
        v = torch.randn(32)
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(v)
        m.transformer.wte.weight[target] += 0.5 * v
    gen = Generation(m, [tok.encode("Hello")], SamplingParams(max_new_tokens=40, temperature=1.0, seed=0), tok)
    events = list(gen)
    toks = [e.token for e in events if e.token is not None and e.token != tok.eot]
    full = tok.decode_bytes(toks).decode("utf-8", errors="replace")
    assert "".join(e.text for e in events) == full
    assert any("\ufffd" in tok.decode([t]) for t in toks)  # some tokens were partial characters


def test_cancel_removes_a_row_and_the_others_go_on():
    m = tiny_model()
    sp = SamplingParams(max_new_tokens=10, temperature=0)
    gen = Generation(m, [[1, 2], [3, 4], [5, 6]], sp)
    gen.step()
    gen.cancel(1)
    events = list(gen)
    assert any(e.index == 1 and e.finished and e.finish_reason == "stop" for e in events)
    assert all(not (e.index == 1 and e.token is not None) for e in events)
    done = gen.completions()
    assert len(done[1].token_ids) == 1
    assert done[0].token_ids == generate_batch(m, [[1, 2]], sp)[0].token_ids
    assert done[2].token_ids == generate_batch(m, [[5, 6]], sp)[0].token_ids


@pytest.mark.parametrize("temperature, fast", [(0.0, False), (0.9, False), (0.0, True), (0.9, True)])
def test_requests_added_mid_flight_equal_generating_them_alone(temperature, fast):
    """Continuous batching: rows join a running batch (longer and shorter prompts than the rows
    already there, several at once), run past the context, get cancelled, and each one still
    generates what it generates alone."""
    from gptkit.quantize import quantize_for_inference

    m = tiny_model(std=0.2)  # block_size 48, weights small enough that greedy tokens depend on the context
    if fast:
        m = quantize_for_inference(m, "float32")

    def sp(n, seed, **kw):
        return SamplingParams(max_new_tokens=n, temperature=temperature, top_k=40, top_p=0.9, seed=seed, **kw)

    first = [([5, 6], sp(40, 0)), ([1, 2, 3], sp(6, 1))]
    joins = {2: [(list(range(10, 22)), sp(10, 2)), ([4], sp(12, 3, repetition_penalty=1.3))],  # two at once
             4: [(list(range(30, 60)), sp(30, 4))],  # longer than every running row; later past the context
             9: [([7, 7], sp(5, 5))],
             20: [([8, 9, 10], sp(30, 6))]}  # by the end, the other rows are gone or past the context
    gen = Generation(m, [p for p, _ in first], [s for _, s in first])
    requests = dict(enumerate(first))
    tokens: dict[int, list[int]] = {i: [] for i in requests}
    sizes = []
    step = 0
    while not gen.done or gen.pending:
        for p, s in joins.get(step, []):
            i = gen.add(p, s)
            requests[i], tokens[i] = (p, s), []
        if step == 12:
            gen.cancel(1)  # already finished: nothing happens
            gen.cancel(0)  # leaves the batch; the others go on
        for e in gen.step():
            if e.token is not None:
                tokens[e.index].append(e.token)
        sizes.append(sum(gen.forward_sizes))
        step += 1
    assert len(requests) == 7 and max(sizes) >= 4
    for i, (p, s) in requests.items():
        c = gen.rows[i]
        assert c.tokens == tokens[i]
        alone = generate_batch(m, [p], s)[0].token_ids
        if i == 0:  # cancelled after 12 tokens
            assert c.finish_reason == "stop" and c.tokens == alone[:12]
        else:
            assert c.tokens == alone, i
        gen.release(i)
    assert not gen.rows


def test_an_empty_generation_takes_requests_later():
    m = tiny_model()
    gen = Generation(m, [], [])
    assert gen.done and gen.step() == []
    sp = SamplingParams(max_new_tokens=5, temperature=0)
    i = gen.add([3, 4], sp)
    j = gen.add([1], SamplingParams(max_new_tokens=0))
    with pytest.raises(GptkitError, match="context is 48"):
        gen.add(list(range(48)), sp)
    done = gen.completions()
    assert (i, j) == (0, 1) and done[0].token_ids == generate_batch(m, [[3, 4]], sp)[0].token_ids
    assert done[1].token_ids == [] and done[1].finish_reason == "length"


def test_long_prompt_is_an_error_or_truncated_with_a_warning():
    with pytest.raises(GptkitError, match="context is 16"):
        prepare_prompt(list(range(20)), 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = prepare_prompt(list(range(20)), 16, truncate=True)
    assert ids == list(range(5, 20)) and "keeping its last 15 tokens" in str(w[0].message)


def test_invalid_sampling_params_name_the_field():
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(max_new_tokens=-2), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty")]:
        with pytest.raises(GptkitError) as e:
            SamplingParams(**bad).validate()
        assert e.value.where == field


def test_inference_copies_fp32_exact_bf16_and_int8_close():
    from gptkit.quantize import quantize_for_inference

    m = tiny_model(std=0.02)
    x = torch.randint(0, 96, (2, 12))
    ref = m(x)
    for dt, tol in [("float32", 1e-5), ("bfloat16", 0.02), ("int8", 0.05)]:
        q = quantize_for_inference(m, dt)
        err = (q(x) - ref).abs().max() / ref.abs().max()
        assert err < tol, (dt, float(err))
    assert m.lm_head.weight.dtype == torch.float32  # the original is untouched


# ---------------------------------------------------------------------------------------------
# CLI

def _run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_sample_streams_seeded_samples_and_rejects_long_prompts(tmp_path, gpt2_vocab_path):
    from gptkit.formats.hf import save_hf

    m = tiny_model(vocab_size=50257, block_size=32, std=0.02)
    save_hf(m, tmp_path / "m")
    args = ["sample", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "5",
            "--num-samples", "2", "--top-k", "20", "--vocab", str(gpt2_vocab_path)]
    a = _run_cli(*args, cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout.count("--- sample") == 2 and a.stdout.count("Hello") == 2
    # the same text as the library produces for seeds 5 and 6
    from gptkit.inference import sample_text

    texts = sample_text(m, load_bpe_vocab(gpt2_vocab_path), "Hello", 8, top_k=20, seed=5, num_samples=2)
    assert a.stdout == "".join(f"--- sample {i + 1} ---\nHello{t}\n" for i, t in enumerate(texts))
    long = _run_cli("sample", "--model", str(tmp_path / "m"), "--prompt", "word " * 40, "--vocab",
                    str(gpt2_vocab_path), cwd=tmp_path)
    assert long.returncode == 2 and "Traceback" not in long.stderr
    assert long.stderr.startswith("error: prompt has 41 tokens, the model's context is 32 (--prompt)")
    assert "--truncate" in long.stderr  # the hint names the option that allows it


def test_bench_generate_json_lines_compare_transformers(tmp_path, capsys):
    import json

    pytest.importorskip("transformers")
    from gptkit.cli import main
    from gptkit.formats.hf import save_hf

    save_hf(tiny_model(vocab_size=50257, block_size=32, std=0.02), tmp_path / "m")
    rc = main(["bench", "generate", "--model", str(tmp_path / "m"), "--batch", "1,3", "--new-tokens", "4",
               "--repeats", "1", "--dtype", "float32,bfloat16", "--compare", "hf", "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 6
    assert {(r["system"], r["dtype"], r["batch"]) for r in lines} == {
        (s, d, b) for s, d in [("gptkit", "float32"), ("gptkit", "bfloat16"), ("transformers", "float32")]
        for b in (1, 3)}
    for r in lines:
        assert r["prompt_tokens"] == 8 and r["new_tokens"] == 4 and r["tok_per_s"] > 0 and r["vs_transformers"] > 0
    assert all(r["greedy_tokens"] == 64 and isinstance(r["greedy_agree"], int) for r in lines
               if r["dtype"] == "bfloat16")  # the count itself is checked in test_quality_check_counts_...
    assert main(["bench"]) == 2


def test_screened_lm_head_gives_the_exact_top_k_logits():
    from gptkit.quantize import ScreenedHead, quantize_for_inference

    m = tiny_model(vocab_size=1000, std=0.02)
    fast = quantize_for_inference(m, "float32")
    assert isinstance(fast.lm_head, ScreenedHead)
    h = torch.randn(3, 32)
    ref = h @ m.transformer.wte.weight.t()  # (3, Vp)
    for k in (1, 20):
        fast.lm_head.top_k = k
        got = fast.lm_head(h)
        top = torch.topk(ref[:, :1000], k).indices
        torch.testing.assert_close(got.gather(1, top), ref.gather(1, top))
        assert torch.equal(torch.topk(got[:, :1000], k).indices, top)
    # the engine uses it for greedy and top-k rows and gets the tokens of the plain model
    sp = [SamplingParams(max_new_tokens=10, temperature=0), SamplingParams(max_new_tokens=10, top_k=5, seed=1)]
    assert [c.token_ids for c in generate_batch(fast, [[1, 2], [3]], sp)] == \
        [c.token_ids for c in generate_batch(m, [[1, 2], [3]], sp)]
    assert fast.lm_head.calls > 0 and fast.lm_head.top_k is None


def test_quality_check_counts_the_leading_greedy_tokens_that_agree():
    """bench generate's greedy_agree: the length of the common prefix of the two models' greedy
    continuations, computed here by full recompute (no KV cache, no engine)."""
    from gptkit.bench.generate import _prompts, quality_check

    a, b = tiny_model(vocab_size=64, block_size=80, std=0.3, seed=0), tiny_model(vocab_size=64, block_size=80, std=0.3)
    with torch.no_grad():  # b: a copy of a with one weight nudged, so the continuations part somewhere
        b.transformer.h[1].mlp.c_proj.weight.add_(0.02 * torch.randn_like(b.transformer.h[1].mlp.c_proj.weight))
    assert quality_check(a, a, tokens=64)["greedy_agree"] == 64

    def greedy(m):
        seq = torch.tensor(_prompts(1, 8, 64, 0))
        for _ in range(64):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        return seq[0, 8:].tolist()

    ga, gb = greedy(a), greedy(b)
    expected = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), 64)
    assert 0 < expected < 64  # the case is informative
    assert quality_check(a, b, tokens=64)["greedy_agree"] == expected


def test_bf16_copy_runs_gpt2s_mlp_fused_and_as_its_bf16_weights_compute():
    """quantize_for_inference(..., "bfloat16") on a CPU: each GPT-2 MLP becomes a BF16MLP (GELU fused
    into c_fc's GEMM, its bf16 output fed to c_proj). Checked against the same computation in fp32
    over the bf16-rounded weights and input, rounded to bf16 where the fused path rounds, with
    random biases (a dropped bias or GELU is far outside the bf16 tolerance)."""
    import torch.nn.functional as F

    from gptkit.quantize import BF16Linear, BF16MLP, quantize_for_inference

    m = tiny_model(std=0.3)
    q = quantize_for_inference(m, "bfloat16")
    if q.transformer.h[0].mlp.c_fc.packed is None:
        pytest.skip("no oneDNN packed bf16 weights on this machine: the unfused path runs")
    assert all(isinstance(b.mlp, BF16MLP) for b in q.transformer.h)
    x = torch.randn(3, 7, 32)
    rb = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    for bq, b in zip(q.transformer.h, m.transformer.h):
        fc, proj = b.mlp.c_fc, b.mlp.c_proj
        h = rb(F.gelu(rb(x) @ rb(fc.weight).t() + fc.bias, approximate="tanh"))
        ref = h @ rb(proj.weight).t() + proj.bias
        with torch.no_grad():
            got = bq.mlp(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2
        unfused = F.gelu(rb(x) @ rb(fc.weight).t(), approximate="tanh")  # the bias left out
        assert float((rb(unfused) @ rb(proj.weight).t() + proj.bias - ref).abs().max() / ref.abs().max()) > 0.05
    lin = BF16Linear(m.transformer.h[0].attn.c_attn.weight, m.transformer.h[0].attn.c_attn.bias)
    want = rb(x) @ rb(lin.weight.float()).t() + m.transformer.h[0].attn.c_attn.bias
    assert float((lin(x) - want).abs().max() / want.abs().max()) < 1e-2  # the bias added inside the GEMM

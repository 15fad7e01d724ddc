"""Chunked prefill (`gptkit serve --prefill-chunk`, `Generation.prefill_chunk`): a long prompt that
joins a running batch is prefilled a chunk per step while the running rows go on decoding, and it
gets exactly the tokens an unchunked prefill gives (and transformers' greedy tokens). Progress is
counted in engine steps and tokens per forward pass, never in seconds. Also `bench generate --ttft`."""

import threading
import time

import pytest
import torch

from gptkit.config import GPTConfig, model_preset
from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams
from gptkit.model import GPT
from gptkit.quantize import quantize_for_inference

from test_serve_batch import V, model  # noqa: F401 (the fixture: a 2-layer GPT, fp32 inference weights)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _joined(model, chunk: int, invariant: bool = False):
    """Two running rows, then three prompts (two longer than any chunk tried) joining mid-run:
    every row's tokens and the number of tokens each forward pass fed, step by step."""
    fed: list[list[int]] = []
    gen = Generation(model)
    gen.prefill_chunk, gen.batch_invariant = chunk, invariant
    forward = gen.model.forward

    def counting(idx, *a, **kw):
        fed[-1].append(idx.size(1))
        return forward(idx, *a, **kw)

    gen.model.forward = counting
    try:
        ids = [gen.add(_prompt(5, 1), SamplingParams(max_new_tokens=60, temperature=0.0)),
               gen.add(_prompt(9, 2), SamplingParams(max_new_tokens=60, temperature=0.9, top_p=0.9, seed=4,
                                                     repetition_penalty=1.2))]
        for step in range(200):
            if step == 2:
                ids.append(gen.add(_prompt(90, 3), SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20,
                                                                  seed=11)))
                ids.append(gen.add(_prompt(3, 4), SamplingParams(max_new_tokens=12, temperature=0.0)))
            if step == 4:
                ids.append(gen.add(_prompt(61, 5), SamplingParams(max_new_tokens=12, temperature=0.0)))
            if gen.done:
                break
            fed.append([])
            gen.step()
    finally:
        del gen.model.forward
    return [gen.rows[i].tokens for i in ids], fed


@pytest.mark.parametrize("chunk", [16, 33])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prompt_prefill(model, chunk):
    """Greedy and seeded sampled rows, running and joining, get the same tokens with chunking on
    and off, and no forward pass feeds more than `chunk` tokens of a row."""
    want, fed_whole = _joined(model, 0)
    got, fed = _joined(model, chunk)
    assert got == want
    assert max(max(f) for f in fed_whole) == 90  # unchunked: the long prompt in one pass
    assert max(max(f) for f in fed) == chunk
    assert all(len(t) == 12 for t in got[2:])


def test_batch_invariant_rows_with_chunked_prefill_get_their_tokens(model):
    assert _joined(model, 16, invariant=True)[0] == _joined(model, 0, invariant=True)[0]


def test_decoding_rows_keep_producing_tokens_during_a_long_prefill(model):
    """A 90-token prompt with 16-token chunks takes 6 steps to prefill; a running row gets a token at
    every one of them, and the joining row gets its first token after its last chunk, not before."""
    gen = Generation(model)
    gen.prefill_chunk = 16
    run = gen.add(_prompt(4, 1), SamplingParams(max_new_tokens=50, temperature=0.0))
    gen.step()
    late = gen.add(_prompt(90, 2), SamplingParams(max_new_tokens=5, temperature=0.0))
    steps_to_first = None
    for step in range(1, 10):
        events = gen.step()
        assert [e.index for e in events if e.index == run and e.token is not None] == [run]
        if any(e.index == late and e.token is not None for e in events):
            steps_to_first = step
            break
        assert len(gen.rows[late].tokens) == 0
    assert steps_to_first == 6  # ceil(90 / 16) chunks, the last one with the first token
    assert len(gen.rows[run].tokens) == 7
    # unchunked, the whole prompt runs in the first step (one long stall for the running row)
    gen = Generation(model)
    gen.add(_prompt(4, 1), SamplingParams(max_new_tokens=50, temperature=0.0))
    gen.step()
    late = gen.add(_prompt(90, 2), SamplingParams(max_new_tokens=5, temperature=0.0))
    assert any(e.index == late for e in gen.step())


def test_a_long_prompt_cancelled_or_parked_mid_prefill(model):
    """Cancelled during its chunks, a row finishes ("stop") and the next long prompt starts; parked
    and resumed, it is prefilled again from the start and gets its tokens all the same."""
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = Generation(model, [_prompt(70, 7)], sp).completions()[0].token_ids
    gen = Generation(model)
    gen.prefill_chunk = 16
    gone = gen.add(_prompt(80, 6), sp)
    keep = gen.add(_prompt(70, 7), sp)
    gen.step()
    gen.step()
    gen.cancel(gone)
    assert [e.finish_reason for e in gen.step() if e.index == gone] == ["stop"]
    gen.step()
    gen.park(keep)
    gen.step()
    gen.resume(keep)
    assert gen.running == 1 and not gen.done
    while not gen.done:
        gen.step()
    assert gen.rows[keep].tokens == want and gen.rows[gone].tokens == []


def test_turning_chunking_off_mid_prefill_runs_the_rest_of_the_prompt_at_once(model):
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = Generation(model, [_prompt(70, 7)], sp).completions()[0].token_ids
    gen = Generation(model)
    gen.prefill_chunk = 16
    i = gen.add(_prompt(70, 7), sp)
    assert gen.step() == []
    gen.prefill_chunk = 0
    assert [e.index for e in gen.step()] == [i]
    while not gen.done:
        gen.step()
    assert gen.rows[i].tokens == want


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_chunked_prefill_greedy_equals_transformers_greedy(preset):
    """Greedy tokens, and each token's logprob (a random model's greedy tokens hardly depend on the
    early context, its logprobs do), equal transformers' for a prompt prefilled in chunks."""
    pytest.importorskip("transformers")
    from gptkit.bench.hf_twin import hf_model_from

    torch.manual_seed(0)
    m = GPT(model_preset(preset)).eval()
    hf = hf_model_from(m)
    T = min(m.config.block_size - 20, 100)
    prompt = torch.randint(0, m.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref = out.sequences[0, T:].tolist()
    ref_logp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ref)]
    gen = Generation(m)
    gen.prefill_chunk = 24
    gen.add([1, 2, 3], SamplingParams(max_new_tokens=40, temperature=0.0))  # a running row beside it
    gen.step()
    i = gen.add(prompt[0].tolist(), SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=1))
    logp = []
    while not gen.rows[i].finished:
        logp += [e.logprob for e in gen.step() if e.index == i and e.token is not None]
    assert gen.rows[i].tokens == ref
    torch.testing.assert_close(torch.tensor(logp), torch.tensor(ref_logp), atol=1e-4, rtol=0)


def test_serve_prefill_chunk_option():
    from gptkit.cli import build_parser
    from gptkit.serve import ServeConfig

    assert ServeConfig().prefill_chunk == 256
    for bad in (-1, 1.5, True):
        with pytest.raises(GptkitError, match="--prefill-chunk"):
            ServeConfig(prefill_chunk=bad)
    a = build_parser().parse_args(["serve", "--model", "m", "--prefill-chunk", "64"])
    assert a.prefill_chunk == 64


def test_scheduler_streams_running_rows_while_a_long_prompt_prefills(model):
    """Through the server's scheduler: a long prompt joining a running request takes
    ceil(len / chunk) scheduler steps to its first token, during which the running request's
    tokens keep coming, and it gets the tokens it gets alone."""
    from gptkit.serve import Job, Scheduler, ServeConfig

    long_prompt = _prompt(100, 9)
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=0)  # logprobs: every token is an event
    want = Generation(model, [long_prompt], sp).completions()[0].token_ids
    sched = Scheduler(model, None, ServeConfig(prefill_chunk=20, batch_wait_s=0, step_delay_s=0.005)).start()
    got: dict[str, list] = {"run": [], "long": []}
    done = {k: threading.Event() for k in got}

    def sink(name):
        def f(item):
            assert not isinstance(item, BaseException), item
            got[name].extend(item)
            if any(e.finished for e in item):
                done[name].set()
        return f

    running = Job([[1, 2, 3]], [SamplingParams(max_new_tokens=100, temperature=0.0)], sink("run"))
    try:
        sched.submit(running)
        deadline = time.monotonic() + 60
        while running.served < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        job = Job([long_prompt], [sp], sink("long"))
        sched.submit(job)
        assert done["long"].wait(60)
        before = running.served
        assert not done["run"].is_set()
        # 100 tokens in chunks of 20: 5 steps (the step it was submitted during may count as 0)
        assert job.first_token_step - job.submitted_step >= 4
        assert before >= 3 + 4  # the running request got a token at each of those steps
    finally:
        sched.stop()
    assert [e.token for e in got["long"] if e.token is not None] == want


def test_bench_generate_ttft_lines(capsys):
    import json

    pytest.importorskip("transformers")
    from gptkit.cli import main

    rc = main(["bench", "generate", "--ttft", "--model", "gpt2-tiny", "--prompt-tokens", "40", "--repeats", "1",
               "--dtype", "float32,int8", "--compare", "hf", "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [(r["system"], r["dtype"]) for r in lines] == [
        ("gptkit", "float32"), ("gptkit", "int8"), ("transformers", "float32")]
    for r in lines:
        assert r["batch"] == 1 and r["prompt_tokens"] == 40 and r["new_tokens"] == 1
        assert r["ttft_s"] > 0 and r["vs_transformers"] > 0
    assert lines[-1]["vs_transformers"] == 1.0
    assert main(["bench", "generate", "--ttft", "--model", "gpt2-tiny", "--prompt-tokens", "5000"]) == 2


def test_int8_prefill_kernel_matches_the_dequantized_reference_and_chunking_keeps_its_tokens():
    """Int8Linear's prefill path (the weight dequantized to bf16, one GEMM; taken from 64 rows on,
    or for any rows inside `prefill_kernels`) against an fp32 product with the dequantized weight;
    and an int8 model's chunked prefill gives the tokens of its whole-prompt prefill."""
    from gptkit.quantize import INT8_DEQUANT_ROWS, Int8Linear, prefill_kernels

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80)
    q = Int8Linear(lin.weight, lin.bias)
    ref_w = q.qweight.float() * q.scale[:, None]  # (N, K) dequantized, fp32
    for rows in (3, INT8_DEQUANT_ROWS, 200):
        x = torch.randn(rows, 96)
        with prefill_kernels(torch.nn.Sequential(q)):
            got = q(x)
        ref = x @ ref_w.t() + lin.bias
        torch.testing.assert_close(got, ref, atol=0.02 * ref.abs().max().item(), rtol=0)
        assert torch.equal(got[:3], q(x)[:3]) == (rows >= INT8_DEQUANT_ROWS)  # outside: per-row kernel below 64
    torch.manual_seed(0)
    m = quantize_for_inference(GPT(GPTConfig(block_size=256, vocab_size=V, n_layer=2, n_head=2, n_embd=64)), "int8")
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=1)
    runs = []
    for chunk in (0, 100):  # whole; a 100-row chunk, then a 50-row one
        gen = Generation(m)
        gen.prefill_chunk = chunk
        gen.add(_prompt(150, 3), sp)
        events = [e for e in gen if e.token is not None]
        runs.append(([e.token for e in events], torch.tensor([e.logprob for e in events])))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-6, rtol=0)  # (3e-5 apart with the kernels mixed)

"""Every path GPT-2 takes, taken by a Llama-family model: training from scratch and from an HF Llama
directory, exact resume, eval, the generation engine (KV cache with GQA, padded batches, stop
strings, streaming, continuous batching), the server, the benchmarks, torchrun DDP/FSDP and the
attention backends with grouped-query attention.

References are independent of gptkit where one exists: transformers' LlamaForCausalLM (loss over
the val split, logits), and otherwise the same path run the simple way (full recompute, one row
alone, one process).
"""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (as test_attention)

import importlib.util

import numpy as np
import pytest
import torch

from gptkit import GPT
from gptkit.config import model_preset, resolve_config
from gptkit.generate import Generation, SamplingParams, generate, generate_batch
from gptkit.loading import load_model
from gptkit.train import train
from test_attention import assert_same_training_pass
from test_sample import char_tok, tiny_model

transformers = pytest.importorskip("transformers")

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _silent(*a, **k):
    pass


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="llama-tiny", batch_size=4, block_size=16, max_steps=8,
                decay_steps=8, warmup_steps=2, eval_interval=0, log_interval=1, final_eval=False, sample_tokens=1,
                progress=False, dtype="float32", device="cpu", seed=3)
    base.update(kw)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


def _losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in json.loads(line)]


def tiny_llama(vocab_size=96, block_size=48, std=0.5, seed=0, **kw) -> GPT:
    """A random GQA Llama (4 query heads, 2 key/value heads) with large weights, so that greedy
    choices are rarely near-ties."""
    return tiny_model(vocab_size, block_size, std, seed, **{"family": "llama", "n_head": 4, "n_kv_head": 2,
                                                            "intermediate_size": 64, "bias": False, **kw})


# ------------------------------------------------------------------------------------------------
# training, resume, eval, sample

def test_llama_tiny_trains_from_scratch_and_resumes_on_the_same_curve(char_data, tmp_path):
    cfg, mov = _cfg(char_data, tmp_path / "straight")
    train(cfg, mov, log=_silent)
    cfg, mov = _cfg(char_data, tmp_path / "split", max_steps=4)
    train(cfg, mov, log=_silent)
    cfg, mov = _cfg(char_data, tmp_path / "split")
    train(cfg, mov, resume=True, log=_silent)
    straight = _losses(tmp_path / "straight")
    assert len(straight) == 8 and straight[-1] < straight[0]
    assert _losses(tmp_path / "split") == straight  # bit for bit
    state = json.loads((tmp_path / "straight" / "ckpt_00000008" / "state.json").read_text())
    assert state["model_config"]["family"] == "llama" and state["model_config"]["n_kv_head"] == 2


def test_llama_run_evals_samples_and_exports_like_transformers(char_data, tmp_path):
    """The trained run's full-split val loss equals transformers' loss on its HF export, and
    `gptkit sample` greedy and beam search equal transformers' generate."""
    from test_eval import reference_loss

    from gptkit.convert import convert
    from gptkit.evaluate import evaluate_model
    from gptkit.inference import run_sample

    cfg, mov = _cfg(char_data, tmp_path / "run", max_steps=3)
    train(cfg, mov, log=_silent)
    loss, n = evaluate_model(str(tmp_path / "run"), str(char_data), block_size=16, device="cpu")
    convert(str(tmp_path / "run"), str(tmp_path / "hf"), "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ref, ref_n = reference_loss(hf, char_data, 16)
    assert n == ref_n and abs(loss - ref) < 1e-5

    out = []
    texts = run_sample(str(tmp_path / "run"), prompt="line 3", max_new_tokens=12, temperature=0, device="cpu",
                       out=out.append)
    tok = load_model(str(tmp_path / "run")).chars
    ids = torch.tensor([[tok.index(c) for c in "line 3"]])
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert texts == ["".join(tok[i] for i in want)]
    assert "".join(out) == "line 3" + texts[0] + "\n"
    # beam search (`sample --num-beams`): transformers' two best beams
    texts = run_sample(str(tmp_path / "run"), prompt="line 3", max_new_tokens=8, num_beams=3, num_samples=2,
                       device="cpu", out=lambda s: None)
    want = hf.generate(ids, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                       early_stopping=True, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].tolist()
    assert texts == ["".join(tok[i] for i in w) for w in want]


def test_fine_tuning_inits_from_a_transformers_llama_dir(char_data, tmp_path):
    """--init an HF Llama directory: the run starts from its weights (a learning rate of 1e-20
    leaves them as they are, so the run's final val loss is transformers' own over the split),
    its architecture and untied head are kept, and a real step then trains it."""
    from test_eval import reference_loss
    from test_llama import make_llama

    hf = make_llama(tmp_path / "hf", initializer_range=0.05)  # vocab 300 holds the 28 characters
    ref, _ = reference_loss(hf, char_data, 16)
    cfg, mov = _cfg(char_data, tmp_path / "still", init=str(tmp_path / "hf"), model="gpt2", lr=1e-20, min_lr=0,
                    max_steps=1, final_eval=True)
    res = train(cfg, mov, log=_silent)
    assert abs(res.final_val_loss - ref) < 1e-5
    loaded = load_model(str(tmp_path / "still"))
    assert loaded.model.config.family == "llama" and loaded.model.config.n_kv_head == 2
    assert not loaded.model.config.tie_embeddings
    cfg, mov = _cfg(char_data, tmp_path / "tuned", init=str(tmp_path / "hf"), model="gpt2", lr=3e-3, max_steps=6)
    train(cfg, mov, log=_silent)
    losses = _losses(tmp_path / "tuned")
    assert abs(losses[0] - _losses(tmp_path / "still")[0]) < 1e-5 and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------
# the generation engine with GQA

def test_gqa_kv_cache_generation_equals_full_recompute_also_past_the_context():
    m = tiny_llama()
    assert m.config.kv_heads == 2 < m.config.n_head
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    for n in (30, 60):  # 60: past the 48-token context, the window slides as the recompute's does
        a = generate(m, idx, n, temperature=0)
        b = generate(m, idx, n, temperature=0, use_cache=False)
        assert a.shape[1] == 5 + n and torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_gqa_padded_batch_rows_equal_generating_alone(temperature):
    m = tiny_llama()
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [10, 11]]
    sps = [SamplingParams(max_new_tokens=12, temperature=temperature, top_k=40, top_p=0.9, seed=s,
                          repetition_penalty=1.2 if s == 2 else 1.0) for s in range(4)]
    batch = generate_batch(m, prompts, sps)
    for p, sp, c in zip(prompts, sps, batch):
        assert c.token_ids == generate_batch(m, [p], sp)[0].token_ids
        assert len(c.token_ids) == 12


def test_gqa_stop_strings_and_streaming_give_the_text_before_the_stop():
    m, tok = tiny_llama(), char_tok()
    prompt = tok.encode("Hi")
    sp = dict(max_new_tokens=30, temperature=0.8, seed=3)
    free = generate_batch(m, [prompt], SamplingParams(**sp), tok)[0].text
    stop = free[10:13]
    out = generate_batch(m, [prompt], SamplingParams(**sp, stop=[stop]), tok)[0]
    assert out.text == free[: free.index(stop)] and out.finish_reason == "stop"
    gen = Generation(m, [prompt], SamplingParams(**sp, stop=[stop]), tok)
    assert "".join(e.text for e in gen) == out.text


def test_gqa_requests_added_mid_flight_equal_generating_them_alone():
    """Continuous batching in the engine: rows join a running batch, one is cancelled, one runs past
    the context, and each generates what it generates alone."""
    m = tiny_llama(std=0.2)
    sp = lambda n, seed: SamplingParams(max_new_tokens=n, temperature=0.9, top_k=40, seed=seed)  # noqa: E731
    gen = Generation(m, [[5, 6], [1, 2, 3]], [sp(40, 0), sp(6, 1)])
    requests = {0: ([5, 6], sp(40, 0)), 1: ([1, 2, 3], sp(6, 1))}
    joins = {2: [(list(range(10, 22)), sp(10, 2)), ([4], sp(12, 3))], 5: [(list(range(30, 60)), sp(30, 4))]}
    step, widest = 0, 0
    while not gen.done or gen.pending:
        for p, s in joins.get(step, []):
            requests[gen.add(p, s)] = (p, s)
        if step == 12:
            gen.cancel(0)
        gen.step()
        widest = max(widest, sum(gen.forward_sizes))
        step += 1
    assert widest >= 4
    for i, (p, s) in requests.items():
        alone = generate_batch(m, [p], s)[0].token_ids
        assert gen.rows[i].tokens == (alone[:12] if i == 0 else alone), i


# ------------------------------------------------------------------------------------------------
# the server: continuous batching with a Llama

def test_serve_a_llama_request_arriving_mid_generation_joins_the_running_batch(gpt2_vocab_path):
    """test_serve's continuous-batching equality, on a GQA Llama with the GPT-2 vocabulary."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import greedy_reference, wait_for

    from gptkit.quantize import quantize_for_inference
    from gptkit.serve import Server, ServeConfig
    from gptkit.tokenizer import load_bpe_vocab

    tok = load_bpe_vocab(gpt2_vocab_path)
    model = quantize_for_inference(tiny_llama(vocab_size=50257, block_size=1024, std=0.02, seed=1), "float32")
    with Server(model, tok, "llama", config=ServeConfig(batch_wait_s=0)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        sched = s.scheduler
        first = c.completions.create(model="llama", prompt="A long story:", max_tokens=600, temperature=0,
                                     stream=True)
        it = iter(first)
        pieces = [next(it).choices[0].text, next(it).choices[0].text]
        before = dict(sched.batch_sizes)
        assert set(before) == {1}
        second = c.completions.create(model="llama", prompt="Meanwhile, elsewhere", max_tokens=5, temperature=0)
        joined = {b: n - before.get(b, 0) for b, n in sched.batch_sizes.items() if n > before.get(b, 0)}
        assert wait_for(lambda: sched.stats()["running_rows"] == 1)
        assert max(joined) == 2
        pieces += [ch.choices[0].text for ch in it]
    assert second.choices[0].text == greedy_reference(model, tok, "Meanwhile, elsewhere", 5)
    alone = generate_batch(model, [tok.encode("A long story:")], SamplingParams(max_new_tokens=600, temperature=0),
                           tok)[0]
    assert "".join(pieces) == alone.text


# ------------------------------------------------------------------------------------------------
# benchmarks

def test_bench_train_compares_a_llama_preset_with_transformers_llama():
    from gptkit.bench.train import bench_train

    rows = bench_train("llama-tiny", batch_size=2, block_size=16, dtype="float32", steps=1, warmup=0,
                       compare=["hf"], device="cpu", threads=1)
    assert [r["system"] for r in rows] == ["gptkit", "transformers"]
    assert rows[0]["params"] == rows[1]["params"] == GPT(model_preset("llama-tiny")).num_params()
    assert rows[1]["model_class"] == "LlamaForCausalLM"


def test_bench_generate_loads_a_llama_dir_and_its_transformers_twin_has_equal_logits(tmp_path):
    from test_llama import make_llama

    from gptkit.bench.generate import bench_generate
    from gptkit.bench.hf_twin import hf_model_from

    hf = make_llama(tmp_path / "hf")
    m = load_model(str(tmp_path / "hf")).model.eval()
    twin = hf_model_from(m)
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, hf(x).logits, atol=1e-4, rtol=0)
    rows = bench_generate(str(tmp_path / "hf"), batches=(1, 2), prompt_tokens=4, new_tokens=4, compare="hf",
                          repeats=1, quality=False)
    assert {(r["system"], r["batch"]) for r in rows} == {(s, b) for s in ("gptkit", "transformers") for b in (1, 2)}
    rows = bench_generate("llama-tiny", batches=(2,), prompt_tokens=4, new_tokens=4, compare="hf", repeats=1,
                          quality=False)  # a preset: its shape with random weights
    assert [r["model"] for r in rows] == ["llama-tiny (random weights)"] * 2


# ------------------------------------------------------------------------------------------------
# the attention backends with GQA, in the model (training and KV-cache decoding)

BACKENDS = ["sdpa", "flash", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_llama_with_backend_matches_math_in_training_and_cached_decoding(backend):
    from gptkit.model import KVCache

    ref = tiny_llama(vocab_size=61, block_size=32, std=0.1, n_embd=64, attention="math", block_q=8, block_k=8)
    model = GPT(ref.config.replace(attention=backend))
    model.load_state_dict(ref.state_dict())
    idx = assert_same_training_pass(model, ref, vocab_size=61)
    # decoding from a left-padded prefill: q_offset, key_mask and positions in use
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, :3] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    outs = []
    for m in (ref.eval(), model.eval()):
        cache = KVCache(m.config, batch_size=2, max_len=12)
        with torch.no_grad():
            steps = [m(idx[:, :7], cache=cache, positions=positions[:, :7], key_mask=key_mask[:, :7])[:, -1]]
            for t in range(7, 12):
                steps.append(m(idx[:, t:t + 1], cache=cache, positions=positions[:, t:t + 1],
                               key_mask=key_mask[:, :t + 1])[:, -1])
        outs.append(torch.stack(steps, 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# torchrun: DDP and FSDP with a Llama

@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["fsdp=true"]], ids=["ddp", "fsdp"])
def test_two_llama_ranks_times_k_equal_one_process_times_2k(char_data, tmp_path, extra):
    from test_distributed import _single, _torchrun

    from gptkit.loading import load_checkpoint_model

    common = ["--model", "llama-tiny", "--data", str(char_data), "n_layer=1", "batch_size=4", "block_size=16",
              "warmup_steps=1", "eval_interval=0", "log_interval=1", "final_eval=false", "sample_tokens=1",
              "progress=false", "dtype=float32", "device=cpu", "seed=7", "max_steps=3", "grad_accum=4",
              "optimizer=adamw"]  # as test_distributed's: data-parallel equality to 1e-5
    _single(["--out", str(tmp_path / "one"), *common])
    r = _torchrun(2, ["--out", str(tmp_path / "two"), *common, *extra])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    assert r.stdout.count("done: ") == 1
    sd_two = load_checkpoint_model(tmp_path / "two" / "ckpt_00000003").model.state_dict()
    sd_one = load_checkpoint_model(tmp_path / "one" / "ckpt_00000003").model.state_dict()
    assert "lm_head.weight" in sd_two  # the untied head survives the FSDP gather
    for name in sd_one:
        torch.testing.assert_close(sd_two[name], sd_one[name], rtol=1e-4, atol=1e-5)

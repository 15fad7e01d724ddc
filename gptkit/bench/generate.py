"""`gptkit bench generate` (INTERFACES.md "Benchmarks"): tokens per second of generation.

Batch sizes 1 and 16 by default, on random weights of the gpt2 shape (no download), with an
8-token prompt, 64 new tokens, top-k 50 and top-p 0.95: the settings of the reference
measurement of transformers' `generate` (INTERFACES.md). The clock covers the whole call (prefill included):
tok_per_s = batch * new_tokens / seconds. With `--compare hf`, transformers runs the same weights
and settings in the same process, interleaved with gptkit, and every line carries the ratio to it.
Lower-precision weights (`--dtype bfloat16,int8`) come with a quality check against fp32: how many
of 64 greedy tokens agree, and (with tiny Shakespeare at hand) the perplexity ratio.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from gptkit.bench.hf_twin import hf_model_from
from gptkit.config import MODEL_PRESETS, model_preset
from gptkit.data import SplitTokens, split_files
from gptkit.errors import GptkitError
from gptkit.evaluate import evaluate
from gptkit.formats.hub import is_pretrained_name
from gptkit.generate import Generation, SamplingParams, generate_batch
from gptkit.loading import load_model
from gptkit.model import GPT
from gptkit.paths import data_file
from gptkit.prepare import PRESETS, ensure_prepared
from gptkit.quantize import normalize_dtype, quantize_for_inference
from gptkit.tokenizer import gpt2_tokenizer, tokenizer_for
from gptkit.bench.speculative import bench_speculative, first_layers
from gptkit.bench.ttft import bench_ttft
from gptkit.inference import load_for_inference, same_tokenizer

HELP = "generation tokens/s, batch 1 and 16 prompts, vs transformers"


def _prompts(batch: int, prompt_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_tokens), generator=g).tolist()


def _time_gptkit(model, prompts, sp) -> float:
    t = time.perf_counter()
    gen = Generation(model, prompts, sp)
    while not gen.done:
        gen.step()
    return time.perf_counter() - t


def _time_hf(hf, prompts, new_tokens, temperature, top_k, top_p) -> float:
    idx = torch.tensor(prompts)
    kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False)
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=hf.config.eos_token_id, **kw)
    return time.perf_counter() - t


def quality_check(model, quantized, tokens: int = 64, seed: int = 0, text_tokens=None) -> dict:
    """How a lower-precision copy compares with the fp32 model on random prompts (the secondary
    figure: a random-weight model's logits are near ties): the number of leading greedy tokens (of
    `tokens`) that agree, and the perplexity ratio on `text_tokens` (a 1-D tensor) if given."""
    prompt = _prompts(1, 8, model.config.vocab_size, seed)
    sp = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eot=True)
    a = generate_batch(model, prompt, sp)[0].token_ids
    b = generate_batch(quantized, prompt, sp)[0].token_ids
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    out = {"greedy_agree": agree, "greedy_tokens": tokens}
    if text_tokens is not None:
        T = min(model.config.block_size, 256)
        n = min(len(text_tokens) - 1, 4 * T) // T * T
        if n >= T:
            x = text_tokens[:n].view(-1, T)
            y = text_tokens[1:n + 1].view(-1, T)
            with torch.inference_mode():
                l32 = float(model(x, y)[1])
                lq = float(quantized(x, y)[1])
            out.update(ppl_fp32=round(float(torch.exp(torch.tensor(l32))), 4),
                       ppl=round(float(torch.exp(torch.tensor(lq))), 4),
                       ppl_ratio=round(float(torch.exp(torch.tensor(lq - l32))), 5))
    return out


def trained_quality_check(model, quantized, data_dir: Path, prompts: int = 16, tokens: int = 64,
                          prompt_tokens: int = 32) -> dict:
    """The check for a trained model: perplexity over the whole val split of `data_dir` (fp32 and
    the lower precision; within 1% is the bar), and greedy agreement on `prompts` prompts taken
    evenly from the val split, `tokens` new tokens each: the mean share of tokens before the first
    difference (`val_greedy_agree`) and how many continuations are identical (`val_greedy_same`)."""
    T = model.config.block_size
    prompt_tokens = max(1, min(prompt_tokens, T // 2))
    tokens = max(1, min(tokens, T - prompt_tokens))
    with torch.inference_mode():
        l32, n = evaluate(model, data_dir, T, 32, torch.device("cpu"), torch.float32)
        lq, _ = evaluate(quantized, data_dir, T, 32, torch.device("cpu"), torch.float32)
    val = SplitTokens(data_dir, "val")
    step = max(1, (len(val) - prompt_tokens) // prompts)
    starts = list(range(0, len(val) - prompt_tokens, step))[:prompts]
    ps = [[int(t) for t in val[s:s + prompt_tokens]] for s in starts]
    sp = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eot=True)
    a = [c.token_ids for c in generate_batch(model, ps, sp)]
    b = [c.token_ids for c in generate_batch(quantized, ps, sp)]
    lead = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), len(u)) / max(len(u), 1)
            for u, v in zip(a, b)]
    return {"val_tokens": n, "val_ppl_fp32": round(math.exp(l32), 4), "val_ppl": round(math.exp(lq), 4),
            "val_ppl_ratio": round(math.exp(lq - l32), 5), "val_greedy_agree": round(sum(lead) / len(lead), 4),
            "val_greedy_same": sum(u == v for u, v in zip(a, b)), "val_prompts": len(ps), "val_new_tokens": tokens}


def quality_data_dir(loaded, data: str | None) -> Path | None:
    """The prepared data whose val split checks a trained model: `--data`, else the run's own data
    (a gptkit checkpoint names it in state.json), else None."""
    if data:
        split_files(data, "val")  # fail early, naming the directory
        return Path(data)
    cfg = (loaded.state or {}).get("train_config") if loaded is not None else None
    if not cfg:
        return None
    if cfg.get("data"):
        d = Path(cfg["data"])
        return d if d.is_dir() else None
    if cfg.get("dataset") in PRESETS:
        try:
            return ensure_prepared(cfg["dataset"])
        except GptkitError:
            return None
    return None


def _shakespeare_tokens(model, vocab):
    """Tiny Shakespeare's tokens for the model's tokenizer, or None when the text is not at hand."""
    p = data_file("tinyshakespeare.txt")
    if p is None or model.config.vocab_size != 50257:
        return None
    try:
        tok = gpt2_tokenizer(vocab)
    except GptkitError:
        return None
    return torch.tensor(tok.encode(p.read_text(encoding="utf-8")[:20000]), dtype=torch.long)


def bench_model(model_path: str | None, seed: int = 0):
    """The model a generation benchmark runs: (model, its name, the loaded model or None). No path,
    or an architecture preset (gpt2, llama-tiny, ...), gives random weights seeded by `seed`."""
    preset = model_path or "gpt2"
    if not model_path or (preset in MODEL_PRESETS and not is_pretrained_name(preset) and not Path(preset).exists()):
        torch.manual_seed(seed)
        return GPT(model_preset(preset)).eval(), f"{preset} (random weights)", None
    loaded = load_model(model_path)
    return loaded.model.eval(), str(model_path), loaded


def bench_generate(model_path: str | None = None, batches=(1, 16), prompt_tokens: int = 8, new_tokens: int = 64,
                   temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = 0.95,
                   dtypes=("float32",), compare: str | None = None, repeats: int = 3, seed: int = 0,
                   threads: int | None = None, vocab: str | None = None, quality: bool = True, emit=None,
                   data: str | None = None) -> list[dict]:
    """Measure generation throughput; returns (and passes to `emit`, as they come) one dict per
    (system, dtype, batch): system, model, dtype, batch, prompt_tokens, new_tokens, tok_per_s, plus
    `vs_transformers` (the ratio) with compare="hf" and the quality fields for lower precisions
    (on a trained model with a val split at hand, `data` or its run's own, the `val_*` fields too)."""
    if compare not in (None, "hf"):
        raise GptkitError(f"unknown comparison {compare!r}", "--compare", "use --compare hf")
    if new_tokens < 1 or prompt_tokens < 1 or repeats < 1 or any(b < 1 for b in batches):
        raise GptkitError("batch sizes, token counts and repeats must be >= 1", "bench generate",
                          "give positive values")
    dtypes = [normalize_dtype(d) for d in dtypes]
    if threads:
        torch.set_num_threads(threads)
    model, name, loaded = bench_model(model_path, seed)
    model_path = model_path if loaded is not None else None
    if prompt_tokens + new_tokens > model.config.block_size:
        raise GptkitError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceed the context "
                          f"{model.config.block_size}", "--new-tokens", "use fewer --prompt-tokens or --new-tokens")
    variants = {d: quantize_for_inference(model, d) for d in dtypes}
    hf = hf_model_from(model) if compare == "hf" else None
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        ignore_eot=True, seed=seed)
    quality_fields = {}
    if quality:
        text = _shakespeare_tokens(model, vocab) if model_path else None
        data_dir = quality_data_dir(loaded, data)
        for d, q in variants.items():
            if d != "float32":
                quality_fields[d] = quality_check(model, q, 64, seed, text)
                if data_dir is not None:
                    quality_fields[d].update(trained_quality_check(model, q, data_dir))
    results = []
    emit = emit or (lambda r: None)
    for B in batches:
        prompts = _prompts(B, prompt_tokens, model.config.vocab_size, seed)
        runs: dict[tuple, list[float]] = {}
        jobs = [(("gptkit", d), lambda q=q: _time_gptkit(q, prompts, sp)) for d, q in variants.items()]
        if hf is not None:
            jobs.append((("transformers", "float32"),
                         lambda: _time_hf(hf, prompts, new_tokens, temperature, top_k, top_p)))
        for key, fn in jobs:  # warm-up: first calls pay for allocations and kernel selection
            if key[0] == "gptkit":
                _time_gptkit(variants[key[1]], prompts, SamplingParams(**{**sp.__dict__, "max_new_tokens": 4}))
            else:
                _time_hf(hf, prompts, 4, temperature, top_k, top_p)
        for _ in range(repeats):  # interleaved, so load changes hit every system alike
            for key, fn in jobs:
                runs.setdefault(key, []).append(fn())
        ref = None
        if hf is not None:
            ref = B * new_tokens / statistics.median(runs[("transformers", "float32")])
        for (system, d), ts in runs.items():
            tps = B * new_tokens / statistics.median(ts)
            r = {"system": system, "model": name, "dtype": d, "batch": B, "prompt_tokens": prompt_tokens,
                 "new_tokens": new_tokens, "tok_per_s": round(tps, 2), "threads": torch.get_num_threads()}
            if ref is not None:
                r["vs_transformers"] = round(tps / ref, 3)
            if system == "gptkit" and d in quality_fields:
                r.update(quality_fields[d])
            results.append(r)
            emit(r)
    return results


def add_arguments(p) -> None:
    p.add_argument("--model", help="model to load, or an architecture preset such as llama-tiny for random "
                   "weights (default: the gpt2 shape with random weights)")
    p.add_argument("--batch", help="comma-separated batch sizes (default 1,16; with --ttft 1)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default 8; with --ttft 512)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", default="float32",
                   help="comma-separated weight precisions for gptkit: float32, bfloat16, int8")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system; the median counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--vocab", help="GPT-2 vocabulary, for the perplexity check of a loaded model")
    p.add_argument("--data", help="prepared data directory whose val split checks a trained model's lower "
                   "precisions (default: the run's own data)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality check of lower precisions")
    p.add_argument("--compare", action="append", default=[], metavar="SYSTEM",
                   help="also time this system in the same run: hf (transformers)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--ttft", action="store_true", help="instead: time to first token (prefill) of a "
                   "--prompt-tokens prompt, greedy")
    p.add_argument("--speculative", choices=["ngram", "draft"],
                   help="instead: speculative vs plain greedy decoding (batch 1), on repetitive and plain text")
    p.add_argument("--draft-model", help="--speculative draft: the draft model (default: the model's first 2 layers)")
    p.add_argument("--draft-k", type=int, default=4, help="--speculative: tokens drafted per step")


def _int_list(s: str, opt: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise GptkitError(f"expected comma-separated integers, got {s!r}", opt, "e.g. 1,16") from None


def run(a) -> int:
    if a.compare not in ([], None) and set(a.compare) != {"hf"}:
        raise GptkitError(f"unknown system(s) {a.compare}", "--compare", "use --compare hf")
    def emit(r):
        if a.json:
            print(json.dumps(r), flush=True)

    if a.speculative:
        res = _run_speculative(a, emit)
        if not a.json:
            print(format_table(res))
        return 0
    if a.ttft:
        if a.threads:
            torch.set_num_threads(a.threads)
        model, name, _ = bench_model(a.model, a.seed)
        res = bench_ttft(model, name, _int_list(a.batch or "1", "--batch"), 512 if a.prompt_tokens is None else a.prompt_tokens,
                         [d.strip() for d in a.dtype.split(",") if d.strip()], "hf" if a.compare else None,
                         a.repeats, a.seed, emit)
        if not a.json:
            print(format_table(res))
        return 0
    res = bench_generate(a.model, _int_list(a.batch or "1,16", "--batch"),
                         8 if a.prompt_tokens is None else a.prompt_tokens, a.new_tokens, a.temperature,
                         a.top_k, a.top_p, [d.strip() for d in a.dtype.split(",") if d.strip()],
                         "hf" if a.compare else None, a.repeats, a.seed, a.threads, a.vocab, not a.no_quality, emit, a.data)
    if not a.json:
        print(format_table(res))
    return 0


def _run_speculative(a, emit) -> list[dict]:
    """`--speculative`: the model (or the gpt2 shape with random weights) and its tokenizer."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        loaded = load_model(a.model)
        model, tok = loaded.model.eval(), tokenizer_for(loaded, a.vocab)
    else:
        torch.manual_seed(a.seed)
        model, tok = GPT(model_preset("gpt2")).eval(), gpt2_tokenizer(a.vocab)
    dtype = normalize_dtype(a.dtype.split(",")[0])
    draft = None
    if a.speculative == "draft" and not a.draft_model:  # before quantizing: packed weights don't copy
        draft = quantize_for_inference(first_layers(model), dtype)
    model = quantize_for_inference(model, dtype)
    if a.draft_model:
        draft, dtok = load_for_inference(a.draft_model, a.vocab, "cpu", a.dtype.split(",")[0])
        if not same_tokenizer(tok, dtok):
            raise GptkitError("the draft model's tokenizer differs from the model's", "--draft-model",
                              "use a draft model trained with the same tokenizer")
    return bench_speculative(model, tok, a.speculative, draft, a.new_tokens, a.draft_k, a.repeats, emit)


def format_table(rows: list[dict]) -> str:
    cols = ["system", "speculative", "text", "dtype", "batch", "prompt_tokens", "new_tokens", "ttft_s", "tok_per_s",
            "vs_transformers", "greedy_agree", "ppl_ratio", "val_ppl_ratio", "val_greedy_agree", "val_greedy_same",
            "acceptance", "tokens_per_pass", "plain_tok_per_s",
            "speedup", "same"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols))]
    lines += ["  ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)


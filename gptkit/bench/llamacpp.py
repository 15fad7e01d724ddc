"""gptkit's decoding against llama.cpp's on the same weights, in one run:
`python -m gptkit.bench.llamacpp --llama-batched-bench PATH`.

The gpt2 shape with random weights is written as GGUF files (f32, f16, q8_0) by `gptkit convert
--to gguf` (with GPT-2's tokenizer, from `--vocab` or gpt2.tiktoken where gptkit finds it: llama.cpp
takes the vocabulary size from it), and llama.cpp's `llama-batched-bench` runs each one; gptkit decodes the same weights
(float32, bfloat16, int8: the nearest of its inference dtypes) with the same thread count,
interleaved with llama.cpp, and the median of `--repeats` runs counts.

What is compared is what `llama-batched-bench` reports: decode speed, S_TG = batch * new tokens /
the time of the decode passes after the prompt pass (no sampling: gptkit decodes greedily, which
costs an argmax), at batch 1 and 16 with an 8-token prompt and 64 new tokens, and the prompt pass
of a 512-token prompt at batch 1 (time to first token, T_PP). llama.cpp is not a dependency: build
it (`cmake -B build && cmake --build build --target llama-batched-bench`) and give the binary's
path, or put it on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptkit.config import model_preset
from gptkit.errors import GptkitError
from gptkit.convert import export_gguf
from gptkit.formats.hf import save_hf
from gptkit.generate import Generation, SamplingParams
from gptkit.model import GPT
from gptkit.quantize import quantize_for_inference

# GGUF weight type -> the gptkit inference dtype that stores weights alike
PAIRS = {"f32": "float32", "f16": "bfloat16", "q8_0": "int8"}


def find_binary(path: str | None) -> Path:
    p = path or shutil.which("llama-batched-bench")
    if not p or not Path(p).is_file():
        raise GptkitError(f"llama-batched-bench not found{f' at {path}' if path else ' on PATH'}",
                          "--llama-batched-bench", "build llama.cpp's llama-batched-bench and give its path")
    return Path(p)


def run_llamacpp(binary: Path, gguf: Path, prompt: int, new: int, batches: list[int], threads: int,
                 ctx: int) -> list[dict]:
    """One llama-batched-bench call: its JSONL rows (pp, tg, pl, t_pp, speed_tg, ...)."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt),
           "-ntg", str(new), "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
           "--output-format", "jsonl"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptkitError(f"llama-batched-bench failed: {tail}", str(gguf), "run the command by hand: " + " ".join(cmd))
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def time_gptkit(model, batch: int, prompt: int, new: int, seed: int = 0) -> tuple[float, float]:
    """(time of the prompt pass, time of the `new` decode passes after it), greedy, batch rows."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()
    gen = Generation(model, prompts, SamplingParams(max_new_tokens=new + 1, temperature=0, ignore_eot=True))
    t0 = time.perf_counter()
    gen.step()  # the prompt pass: the first new token
    t1 = time.perf_counter()
    while not gen.done:
        gen.step()
    return t1 - t0, time.perf_counter() - t1


def bench(binary: Path, preset: str = "gpt2", dtypes=("f32", "f16", "q8_0"), batches=(1, 16), prompt: int = 8,
          new: int = 64, ttft_prompt: int = 512, threads: int = 2, repeats: int = 3, seed: int = 0, emit=None,
          vocab: str | None = None):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(model_preset(preset)).eval()
    ctx = model.config.block_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "hf")
        for gd in dtypes:
            if gd not in PAIRS:
                raise GptkitError(f"unknown GGUF type {gd!r}", "--dtypes", f"use {', '.join(PAIRS)}")
            gguf = Path(tmp) / f"{preset}-{gd}.gguf"
            export_gguf(Path(tmp) / "hf", gguf, gd, vocab)
            q = quantize_for_inference(model, PAIRS[gd])
            time_gptkit(q, max(batches), prompt, 4)  # warm-up
            run_llamacpp(binary, gguf, prompt, 4, [1], threads, ctx)
            ours: dict[tuple, list[float]] = {}
            theirs: dict[tuple, list[float]] = {}
            for _ in range(repeats):  # interleaved: load changes hit both alike
                for r in run_llamacpp(binary, gguf, prompt, new, list(batches), threads, ctx):
                    theirs.setdefault(("decode", r["pl"]), []).append(r["speed_tg"])
                for r in run_llamacpp(binary, gguf, ttft_prompt, 1, [1], threads, ctx):
                    theirs.setdefault(("ttft", 1), []).append(r["t_pp"])
                for b in batches:
                    _, t = time_gptkit(q, b, prompt, new, seed)
                    ours.setdefault(("decode", b), []).append(b * new / t)
                t, _ = time_gptkit(q, 1, ttft_prompt, 1, seed)
                ours.setdefault(("ttft", 1), []).append(t)
            for (what, b), vals in ours.items():
                mine, other = statistics.median(vals), statistics.median(theirs[(what, b)])
                row = {"what": what, "batch": b, "gguf": gd, "dtype": PAIRS[gd], "threads": threads}
                if what == "decode":
                    row.update(prompt_tokens=prompt, new_tokens=new, gptkit_tok_per_s=round(mine, 2),
                               llamacpp_tok_per_s=round(other, 2), ratio=round(mine / other, 3))
                else:
                    row.update(prompt_tokens=ttft_prompt, gptkit_ttft_s=round(mine, 4),
                               llamacpp_ttft_s=round(other, 4), ratio=round(other / mine, 3))
                rows.append(row)
                if emit:
                    emit(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptkit.bench.llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-batched-bench", help="path of llama.cpp's llama-batched-bench (default: on PATH)")
    p.add_argument("--model", default="gpt2", help="architecture preset, random weights (default gpt2)")
    p.add_argument("--dtypes", default="f32,f16,q8_0", help="GGUF weight types (f32, f16, q8_0)")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes for decoding")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ttft-prompt-tokens", type=int, default=512, help="prompt of the time-to-first-token row")
    p.add_argument("--threads", type=int, default=2, help="threads for both systems (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", help="GPT-2's vocabulary (gpt2.tiktoken) for the GGUF files' tokenizer")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    a = p.parse_args(argv)
    try:
        rows = bench(find_binary(a.llama_batched_bench), a.model, [d.strip() for d in a.dtypes.split(",") if d.strip()],
                     [int(b) for b in a.batch.split(",")], a.prompt_tokens, a.new_tokens, a.ttft_prompt_tokens,
                     a.threads, a.repeats, emit=(lambda r: print(json.dumps(r), flush=True)) if a.json else None,
                     vocab=a.vocab)
    except GptkitError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not a.json:
        for r in rows:
            if r["what"] == "decode":
                print(f"decode  batch {r['batch']:>2}  {r['gguf']:>5} vs {r['dtype']:<8}  gptkit {r['gptkit_tok_per_s']:>8} tok/s"
                      f"  llama.cpp {r['llamacpp_tok_per_s']:>8} tok/s  ratio {r['ratio']}")
            else:
                print(f"ttft    prompt {r['prompt_tokens']}  {r['gguf']:>5} vs {r['dtype']:<8}  gptkit {r['gptkit_ttft_s']} s"
                      f"  llama.cpp {r['llamacpp_ttft_s']} s  ratio {r['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

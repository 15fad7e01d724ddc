"""Peak memory and time of one attention forward + backward, per backend.

Each backend runs in a fresh Python process, so its peak resident set size (Linux ru_maxrss)
belongs to that backend alone: torch's own footprint plus whatever the attention needed at its
worst moment. The default shape is GPT-2 124M's at a long context: B=1, T=2048, 12 heads of 64, fp32, causal.

    python -m gptkit.bench.attention                     # math, sdpa, flash: a table
    python -m gptkit.bench.attention --json --T 1024     # one JSON object per backend

`measure_attention` is the library function behind it (the slow test calls it too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptkit.attention import attend

DEFAULT_BACKENDS = ("math", "sdpa", "flash")


def _rss_mib() -> float:
    """Current resident set size (Linux /proc); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _peak_rss_mib() -> float:
    """This process image's peak RSS. On Linux, VmHWM of /proc/self/status: ru_maxrss would carry
    the parent's peak over fork + exec (a large test process made every backend look as big)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _worker(backend: str, B: int, T: int, n_head: int, head_size: int, dtype: str, repeats: int,
            threads: int = 0) -> dict:
    """Runs in the child: forward + backward `repeats` times, then reports peak RSS and the best time."""
    if threads > 0:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(B, n_head, T, head_size, generator=g, dtype=dt).requires_grad_() for _ in range(3))
    do = torch.randn(B, n_head, T, head_size, generator=g, dtype=dt)
    base = _rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = attend(q, k, v, backend=backend)  # (B, nh, T, hs)
        out.backward(do)
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
        del out
    return dict(backend=backend, batch=B, T=T, n_head=n_head, head_size=head_size, dtype=dtype,
                peak_rss_mib=round(_peak_rss_mib(), 1), baseline_rss_mib=round(base, 1),
                fwd_bwd_s=round(min(times), 4), threads=torch.get_num_threads())


def measure_attention(backends=DEFAULT_BACKENDS, *, B: int = 1, T: int = 2048, n_head: int = 12,
                      head_size: int = 64, dtype: str = "float32", repeats: int = 2, threads: int = 0) -> list[dict]:
    """One fresh subprocess per backend; returns one dict per backend with `peak_rss_mib`,
    `baseline_rss_mib` (after import and inputs, before attention), `fwd_bwd_s` and `vs_math`
    (peak RSS over math's, when math was measured)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for backend in backends:
        cmd = [sys.executable, "-m", "gptkit.bench.attention", "--worker", backend, "--B", str(B), "--T", str(T),
               "--heads", str(n_head), "--head-size", str(head_size), "--dtype", dtype, "--repeats", str(repeats),
               "--threads", str(threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"attention benchmark for {backend!r} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    math_peak = next((r["peak_rss_mib"] for r in rows if r["backend"] == "math"), None)
    for r in rows:
        r["vs_math"] = round(r["peak_rss_mib"] / math_peak, 3) if math_peak else None
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | peak RSS (MiB) | above baseline (MiB) | vs math | fwd+bwd (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        vs = "" if r["vs_math"] is None else f"{100 * r['vs_math']:.0f}%"
        lines.append(f"| {r['backend']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} "
                     f"| {vs} | {r['fwd_bwd_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptkit.bench.attention", description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated (math,sdpa,flash,triton)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0 = torch's default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per backend")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the child process
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.B, a.T, a.heads, a.head_size, a.dtype, a.repeats, a.threads)))
        return 0
    rows = measure_attention(a.backends.split(","), B=a.B, T=a.T, n_head=a.heads, head_size=a.head_size,
                             dtype=a.dtype, repeats=a.repeats, threads=a.threads)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"attention forward + backward, B={a.B}, T={a.T}, {a.heads} heads of {a.head_size}, {a.dtype}, causal, "
              f"{rows[0]['threads']} thread(s)")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

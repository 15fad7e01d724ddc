"""Mutation testing: does the test suite fail when the code is wrong?

Each mutant in tools/mutants.toml is one small deliberate bug: a snippet of a gptkit/ file replaced
by another (the snippet must occur exactly once, and the result must parse and differ from the
original as an AST, so a mutant can neither silently miss nor be a no-op). Mutants are applied one
at a time to a temporary copy of the repository, never to the working tree, and the part of the
default suite that covers the mutated module (the [tests] map, run with -x) decides: a failing
run kills the mutant, a passing one lets it survive.

    python tools/mutate.py                     # every mutant
    python tools/mutate.py --sample 8          # a fixed sample (the slow CI test runs this)
    python tools/mutate.py --only gelu-erf -v  # one mutant, showing pytest's output

Exit status: 0 if the score (killed / all) reaches --min-score (default 0.95), 1 otherwise,
2 for a broken mutant list.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "tools" / "mutants.toml"
COPY = ("gptkit", "tests", "pyproject.toml")


class BadMutant(Exception):
    pass


def load(path: Path = MUTANTS) -> tuple[list[dict], dict[str, list[str]]]:
    spec = tomllib.loads(path.read_text())
    return spec["mutant"], spec["tests"]


def apply(source: str, old: str, new: str, where: str) -> str:
    """The source with the one occurrence of `old` replaced by `new`."""
    n = source.count(old)
    if n != 1:
        raise BadMutant(f"{where}: the snippet {old!r} occurs {n} times (it must occur once)")
    mutated = source.replace(old, new)
    try:
        if ast.dump(ast.parse(mutated)) == ast.dump(ast.parse(source)):
            raise BadMutant(f"{where}: replacing {old!r} by {new!r} changes no code")
    except SyntaxError as e:
        raise BadMutant(f"{where}: the mutant does not parse: {e}") from None
    return mutated


def tests_for(m: dict, table: dict[str, list[str]]) -> list[str]:
    if "tests" in m:
        return m["tests"]
    if m["file"] not in table:
        raise BadMutant(f"{m['id']}: no tests listed for {m['file']} in [tests]")
    return table[m["file"]]


def check(mutants: list[dict], table: dict[str, list[str]], root: Path = ROOT) -> None:
    """Every mutant applies to the current tree (raises BadMutant otherwise)."""
    ids = set()
    for m in mutants:
        if m["id"] in ids:
            raise BadMutant(f"duplicate mutant id {m['id']}")
        ids.add(m["id"])
        if not (root / m["file"]).is_file():
            raise BadMutant(f"{m['id']}: {m['file']} does not exist (did the module move?)")
        apply((root / m["file"]).read_text(), m["old"], m["new"], m["id"])
        for t in tests_for(m, table):
            if not (root / t.split("::")[0]).is_file():
                raise BadMutant(f"{m['id']}: test file {t} does not exist")


def run_one(m: dict, table: dict[str, list[str]], work: Path, timeout: float, verbose: bool) -> dict:
    target = work / m["file"]
    original = target.read_text()  # the copy's own text: the working tree may have moved on
    target.write_text(apply(original, m["old"], m["new"], m["id"]))
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("COVERAGE_PROCESS_START", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           *tests_for(m, table)]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, "timeout"
    finally:
        target.write_text(original)
    # 1: a test failed; 2/3/4: the mutant broke collection or pytest itself; -1: a hang. All kill it.
    status = "survived" if rc == 0 else "killed"
    if rc == 5:
        status = "no-tests"
    res = {"id": m["id"], "file": m["file"], "status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}
    if verbose or status != "killed":
        tail = "\n".join(out.strip().splitlines()[-15:])
        res["output"] = tail
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=Path, default=MUTANTS)
    ap.add_argument("--only", nargs="*", help="mutant ids to run")
    ap.add_argument("--sample", type=int, help="run this many mutants, a fixed sample spread over the list")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant; a longer run counts as killed")
    ap.add_argument("--min-score", type=float, default=0.95)
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies")
    ap.add_argument("--json", action="store_true", help="print one JSON object per mutant")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    mutants, table = load(args.mutants)
    try:
        check(mutants, table)
    except BadMutant as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutants)} mutants apply")
        return 0
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutants}
        if unknown:
            print(f"error: unknown mutant id(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m["id"] in args.only]
    if args.sample and args.sample < len(mutants):
        step = len(mutants) / args.sample  # evenly spread, so every area of the code is sampled
        mutants = [mutants[int(i * step)] for i in range(args.sample)]

    results = []
    with tempfile.TemporaryDirectory(prefix="gptkit-mutants-") as tmp:
        work = Path(tmp)
        for name in COPY:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, work / name)
        for m in mutants:
            res = run_one(m, table, work, args.timeout, args.verbose)
            results.append(res)
            if args.json:
                print(json.dumps(res), flush=True)
            else:
                print(f"{res['status']:>8}  {res['id']:<32} {res['file']:<28} {res['seconds']:>6.1f} s", flush=True)
                if "output" in res and (args.verbose or res["status"] != "killed"):
                    print("          " + res["output"].replace("\n", "\n          "), flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    score = killed / len(results) if results else 1.0
    survivors = [r["id"] for r in results if r["status"] != "killed"]
    print(f"mutation score: {killed}/{len(results)} killed = {score:.1%}"
          + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    return 0 if score >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())

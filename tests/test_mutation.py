"""tools/mutate.py: the mutation tester itself (fast), and a fixed sample of its mutants (slow)."""

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402


def test_a_mutant_must_match_once_and_change_the_code():
    src = "def f(a, b):\n    return a < b  # compare\n"
    assert mutate.apply(src, "a < b", "a <= b", "m") == src.replace("a < b", "a <= b")
    for old, new, why in [("a", "x", "occurs 3 times"), ("nope", "x", "occurs 0 times"),
                          ("# compare", "# other", "changes no code"), ("a < b", "a <", "does not parse")]:
        with pytest.raises(mutate.BadMutant, match=why):
            mutate.apply(src, old, new, "m")


def test_the_mutant_list_has_40_mutants_across_the_package():
    mutants, table = mutate.load()
    assert len(mutants) >= 40 and len({m["id"] for m in mutants}) == len(mutants)
    assert all(mutate.tests_for(m, table) for m in mutants)


@pytest.mark.slow
def test_a_fixed_sample_of_mutants_is_killed():
    """Every mutant of an evenly spread sample of 8 applies to today's code and fails its tests
    (the full list: `python tools/mutate.py`)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "mutate.py"), "--sample", "8", "--min-score", "1.0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr

"""experiments.bench_ab: the paired ratios it prints, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cnnjax.errors import UsageError
from experiments.bench_ab import paired_ratios


def test_paired_ratios_median_of_rounds_and_fastest_rounds():
    # Round 2 hit a slow spell on A only; round 3 on B only.
    a_runs, b_runs = [100.0, 60.0, 100.0], [110.0, 108.0, 70.0]
    median, fastest = paired_ratios(a_runs, b_runs)
    assert median == pytest.approx(1.1)        # ratios 1.1, 1.8, 0.7
    assert fastest == pytest.approx(110 / 100)


@pytest.mark.parametrize("a_runs,b_runs", [([1.0], [1.0, 2.0]), ([], [])])
def test_paired_ratios_need_equal_nonempty_rounds(a_runs, b_runs):
    with pytest.raises(UsageError, match="same number of runs on each side"):
        paired_ratios(a_runs, b_runs)


def test_a_process_variant_is_refused_in_one_line():
    out = subprocess.run([sys.executable, "-m", "experiments.bench_ab", "--a", "+kept conv input", "--b", "+huge pages",
                          "--models", "lenet5"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "setting of the whole process" in line]
    assert len(lines) == 1 and "experiments.bench_cpu" in lines[0]
    assert "Traceback" not in out.stderr


"""experiments.bench_onednn_paths: which convs it times, its table, its one-line refusals."""

from __future__ import annotations

import subprocess
import sys

from experiments.bench_onednn_paths import stride1_convs
from tests.onednn_marks import needs_onednn


def test_it_times_the_stride1_convs_whose_kernel_gradients_auto_gives_onednn():
    got = [(c["input"], c["kernel"], c["count"]) for c in stride1_convs("cifar_resnet20")]
    assert got == [((32, 32, 3), (3, 3, 3, 16), 1), ((32, 32, 16), (3, 3, 16, 16), 6),
                   ((16, 16, 32), (3, 3, 32, 32), 5), ((8, 8, 64), (3, 3, 64, 64), 5)]  # no strided or 1x1 convs
    # resnet18 at 32x32: the 2x2 and 1x1 maps of layers 3 and 4 run as patches, the stem is strided.
    assert [c["input"] for c in stride1_convs("resnet18")] == [(8, 8, 64), (4, 4, 128)]
    assert all(c["pads"] == ((1, 1), (1, 1)) for c in stride1_convs("resnet18"))


def _tables(stdout: str, model: str) -> list[list[list[str]]]:
    """Each table's rows of ``model``, as lists of stripped cells."""
    tables = []
    for block in stdout.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith(f"| {model}")]
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
        if rows:
            tables.append(rows)
    return tables


@needs_onednn
def test_the_tables_have_each_path_and_a_per_step_sum():
    out = subprocess.run([sys.executable, "-m", "experiments.bench_onednn_paths", "--models", "cifar_resnet20",
                          "--batch", "4", "--rounds", "1", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wgrads, forwards = _tables(out.stdout, "cifar_resnet20")
    for rows, paths in ((wgrads, ("native", "forward", "matmul")), (forwards, ("primitive", "input gradient"))):
        assert [r[1] for r in rows] == ["32x32x3", "32x32x16", "16x16x32", "8x8x64", "per step"]
        header_cells = 4 + len(paths) + 3
        assert all(len(r) == header_cells for r in rows)  # the per-step row too
        for row in rows[:-1]:
            assert all(float(row[4 + i]) > 0 for i in range(len(paths)))
            assert row[4 + len(paths)] in paths and row[5 + len(paths)] in paths
        per_step = sum(int(r[3]) * float(r[4]) for r in rows[:-1])
        assert abs(float(rows[-1][4]) - per_step) <= 0.1 * len(rows)  # the sum of the rounded rows, within rounding


def test_an_unknown_model_is_one_line():
    out = subprocess.run([sys.executable, "-m", "experiments.bench_onednn_paths", "--models", "alexnet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "unknown bench row(s) ['alexnet']" in out.stderr

"""experiments.bench.recipe: the fast recipe's epoch times, cnnjax (a real experiments.train run) against its
torch twin, on synthetic CIFAR-shaped data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # about 60 s on a 2-core CPU: two whole recipe runs
def test_bench_recipe_times_every_epoch_of_both_sides_with_the_same_steps(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "recipe.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench.recipe", "--train", "700", "--test", "20",
                           "--notorch_compile", "--out", str(out), "--", "--config.batch_size=64",
                           "--config.eval_batch_size=70", "--config.whiten_init_images=100"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["side"] for r in result["rows"]] == ["cnnjax", "torch eager"] and result["complete"]
    assert "# cnnjax: epochs " in done.stdout and "# torch eager: epochs " in done.stdout
    assert all(len(r["epoch_s"]) == 2 and min(r["epoch_s"]) > 0 for r in result["rows"])
    meta = result["meta"]
    assert (meta["batch"], meta["steps_per_epoch"], meta["precision"]) == (64, 630 // 64, "fp32")  # 10% held out
    assert meta["torch_device"] == "cpu" and "| torch eager |" in done.stdout
    shown = subprocess.run([sys.executable, "-m", "experiments.bench.recipe", "--render", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip().startswith("Fast recipe on CIFAR-shaped data")
    assert shown.stdout.strip() in done.stdout  # the same table the run printed
    bad = subprocess.run([sys.executable, "-m", "experiments.bench.recipe", "--render", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --render: ")


def test_bench_recipe_refuses_a_single_epoch_in_one_line():
    done = subprocess.run([sys.executable, "-m", "experiments.bench.recipe", "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: --epochs must be >= 2 (the first includes compilation), "
                                                    "--train >= 5 and --test >= 1")

"""experiments.bench.speedrun and its PyTorch twin: the twin follows the cnnjax recipe (schedule, refusals),
the timing harness reads what the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import optax
import pytest

from cnnjax.data.splits import stratified_holdout
from experiments.bench import speedrun_lib as speedrunlib
from experiments.configs import fashion_mnist_fast
from tests.helpers import override, write_idx_dir


@pytest.mark.parametrize("schedule,optax_schedule", [
    ("onecycle", lambda total, lr: optax.cosine_onecycle_schedule(total, lr, pct_start=0.25)),
    ("cosine", lambda total, lr: optax.warmup_cosine_decay_schedule(0.0, lr, 0, total, end_value=0.0)),
    ("constant", lambda total, lr: optax.constant_schedule(lr)),
])
def test_twin_learning_rate_is_optaxs_schedule(schedule, optax_schedule):
    c = ml_collections.ConfigDict({"learning_rate": 3e-3, "schedule": schedule, "pct_start": 0.25})
    want = optax_schedule(1000, 3e-3)
    assert max(abs(float(want(s)) - speedrunlib.lr_at(c, s, 1000)) for s in range(0, 1001, 7)) < 1e-9


def test_twin_accepts_the_speed_run_config():
    speedrunlib.check_supported(override(fashion_mnist_fast.get_config(), **{"data.dir": "/some/dir"}))


@pytest.mark.parametrize("key,value,message", [
    ("data.crop_padding", 2, "does not reproduce data.crop_padding=2"),
    ("optimizer", "airbench", "supports optimizer in"),
    ("tta", 2, "supports tta in"),
    ("data.dir", "", "pass --config.data.dir="),
])
def test_twin_refuses_what_it_cannot_reproduce(key, value, message):
    c = override(fashion_mnist_fast.get_config(), **{"data.dir": "/some/dir"})
    with pytest.raises(ValueError, match=message):
        speedrunlib.check_supported(override(c, **{key: value}))


def test_final_accuracies_come_from_the_last_evaluated_epoch(tmp_path):
    rows = [{"epoch": 1, "step": 10, "train_loss": 1.0},  # rows as the training loop writes them
            {"epoch": 2, "step": 20, "val_accuracy": 0.8, "test_accuracy": 0.79},
            {"epoch": 3, "step": 30, "val_accuracy": 0.91, "test_accuracy": 0.905},
            {"epoch": 3, "step": 30, "best_epoch": 3, "final_test_accuracy": 0.905}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert speedrunlib.final_accuracies(str(tmp_path)) == {"val_accuracy": 0.91, "test_accuracy": 0.905}


@pytest.mark.skipif(not os.access(speedrunlib.TIME, os.X_OK), reason="apt-get install time")
def test_timed_gives_wall_seconds_and_output_and_names_a_failure():
    wall, out = speedrunlib.timed([sys.executable, "-c", "import time; time.sleep(0.3); print('done')"])
    assert out.strip() == "done" and 0.3 <= wall < 30
    with pytest.raises(RuntimeError, match="exited 3: boom"):
        speedrunlib.timed([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


def test_summary_is_the_median_of_each_side():
    pairs = ((30, .9), (10, .92), (20, .91))
    runs = {"cnnjax": [{"wall_s": w, "val_accuracy": a, "test_accuracy": a} for w, a in pairs]}
    medians = speedrunlib.summary(runs)
    assert medians == {"cnnjax": {"wall_s": 20, "val_accuracy": .91, "test_accuracy": .91}}
    assert "| **cnnjax** | median | **20.0** | 91.00% | **91.00%** |" in speedrunlib.markdown(runs, medians)


def test_torch_twin_trains_and_reports_on_idx_files(tmp_path):
    arrays = write_idx_dir(tmp_path / "fm", n_train=300, n_test=50)
    keep, _ = stratified_holdout(arrays["train-labels-idx1-ubyte"], 0.1, 0)
    cmd = [sys.executable, "-m", "experiments.bench.speedrun_torch",
           "--config=experiments/configs/fashion_mnist_fast.py", f"--config.data.dir={tmp_path / 'fm'}",
           "--config.data.cache_dir=", "--config.num_epochs=1", "--config.batch_size=64",
           f"--out={tmp_path / 'r.json'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == len(keep) // 64 and result["model"] == "simple_cnn"
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["train_s"] > 0
    assert json.loads(done.stdout.strip().splitlines()[-1]) == result

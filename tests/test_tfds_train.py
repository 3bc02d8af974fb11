"""The TFDS route end to end on ``tfds.testing.mock_data``: train CLI with pmap on 2 fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs experiments.train's CLI inside tfds.testing.mock_data (random examples with the real
# dataset's features), so the TFDS code path runs as a user would run it, offline.
RUNNER = """
import sys
import tensorflow_datasets as tfds
from experiments import cli, train
with tfds.testing.mock_data(num_examples=64):
    sys.exit(cli.run(train.main))
"""


@pytest.mark.parametrize("config,model", [("mnist_lenet", "lenet5"), ("cifar10_resnet20", "cifar_resnet20")])
def test_train_cli_pmap_two_devices_on_mock_tfds(tmp_path, config, model):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = ["--config", f"experiments/configs/{config}.py", "--workdir", str(tmp_path / "run"),
            "--config.parallelism=pmap", "--config.num_devices=2", "--config.batch_size=16",
            "--config.eval_batch_size=32", "--config.num_epochs=2", "--config.data.cache_dir=",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.plots=False", "--noprogress"]
    out = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pmap on 2 cpu device(s)" in out.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    epochs = [r for r in rows if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    # 64 mock training examples minus a stratified 10% validation split, batch 16: 3 steps per epoch.
    assert epochs[-1]["step"] == 2 * epochs[0]["step"] == 2 * 3
    assert json.load(open(tmp_path / "run" / "config.json"))["model"]["name"] == model
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in rows if "train_loss" in r)
    assert 0.0 <= rows[-1]["best_test_accuracy"] <= 1.0

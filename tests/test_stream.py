"""Data modes: one example order for resident and stream, stream == resident on a real exported folder,
streaming resume, streaming across processes, auto mode, and bad images in a folder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.data import load_splits
from cnnjax.data.stream import ArraySource, EpochOrder, EvalBatch, StepBatch, stream
from cnnjax.train import budget
from cnnjax.train.loop import fit
from experiments.configs.base import base_config
from tests.helpers import override, slow_clock
from tests.test_multiprocess import bit_identical, max_abs_diff, params, rows, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")


def test_epoch_order_is_a_seeded_permutation_cut_into_batches():
    order = EpochOrder(seed=3, num_examples=103, batch_size=10)
    assert order.steps_per_epoch == 10
    rows_ = order.batches(0, 10)
    assert rows_.shape == (10, 10) and len(set(rows_.ravel())) == 100
    np.testing.assert_array_equal(order.batches(12, 3), order.batches(10, 10)[2:5])
    assert not np.array_equal(order.batches(0, 1), order.batches(10, 1))  # epochs differ
    np.testing.assert_array_equal(EpochOrder(3, 103, 10).batches(25, 1), order.batches(25, 1))  # pure
    assert not np.array_equal(EpochOrder(4, 103, 10).batches(0, 1), order.batches(0, 1))
    with pytest.raises(ValueError, match="cross the end of epoch 1"):
        order.batches(8, 3)


def test_step_batches_feed_each_process_its_columns():
    images = np.arange(20 * 2 * 2 * 1, dtype=np.uint8).reshape(20, 2, 2, 1)
    source, order = ArraySource(images, np.arange(20) % 3), EpochOrder(0, 20, 8)
    halves = [StepBatch(source, order, cols)(5) for cols in (np.arange(4), np.arange(4, 8))]
    ids = np.concatenate([h["ids"] for h in halves])
    np.testing.assert_array_equal(ids, order.batches(5, 1)[0])
    np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]), images[ids])
    np.testing.assert_array_equal(halves[1]["labels"], (ids[4:] % 3))
    got = list(stream(StepBatch(source, order, np.arange(8)), 3, 6, workers=0))
    assert [list(g["ids"]) for g in got] == [list(order.batches(s, 1)[0]) for s in (3, 4, 5)]
    batches = list(stream(EvalBatch(source, 5, 12, 4), 0, 2, workers=0))
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 1, 1, 0]]
    np.testing.assert_array_equal(batches[1]["images"][:3], images[9:12])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real Fashion-MNIST as an image folder: 10 classes x 20 PNG images, 32x32 grey."""
    if not os.path.isdir(FMNIST):
        pytest.skip("apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("export") / "fmnist"
    done = subprocess.run([sys.executable, "-m", "experiments.export_folder", "--dataset", "fashion_mnist",
                           "--out", str(out), "--per_class", "20", "--size", "32", "--format", "png",
                           "--channels", "1", "--data_dir", FMNIST], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return str(out)


def folder_config(root: str, **overrides):
    c = base_config()
    c.model.name, c.num_classes = "lenet5", 10
    c.data.name, c.data.dir, c.data.image_size, c.data.channels = "folder", root, 32, 1
    c.data.cache_dir, c.data.workers = "", 2
    c.batch_size, c.num_epochs, c.eval_batch_size, c.log_every, c.plots = 28, 1, 64, 2, False
    c.optimizer, c.learning_rate = "sgd", 0.05
    return override(c, **overrides)


def test_folder_splits_70_15_15_and_auto_mode(folder):
    data = load_splits(folder_config(folder))
    assert (len(data.train), len(data.val), len(data.test)) == (140, 30, 30)
    assert not data.streamed and data.train.images.shape == (140, 32, 32, 1)
    assert [int((data.val.labels == c).sum()) for c in range(10)] == [3] * 10  # stratified
    assert data.class_names[0] == "00_T-shirt_top"
    assert load_splits(folder_config(folder, **{"data.mode": "auto", "data.resident_max_gb": 1e-6})).streamed
    assert not load_splits(folder_config(folder, **{"data.mode": "auto"})).streamed


def test_stream_equals_resident_after_one_epoch_of_lenet5(folder, tmp_path):
    fit(folder_config(folder), str(tmp_path / "resident"), progress=False)
    fit(folder_config(folder, **{"data.mode": "stream"}), str(tmp_path / "stream"), progress=False)
    diff = max_abs_diff(params(tmp_path / "resident"), params(tmp_path / "stream"))
    print(f"stream vs resident, lenet5, 1 epoch on an exported folder: params max |Δ| {diff:.3e}")
    assert diff <= 1e-5
    assert rows(tmp_path / "resident")[0]["val_loss"] == pytest.approx(rows(tmp_path / "stream")[0]["val_loss"],
                                                                       abs=1e-6)


def test_streaming_resume_is_bit_identical(folder, tmp_path):
    cfg = folder_config(folder, **{"data.mode": "stream", "num_epochs": 2})
    last = fit(cfg, str(tmp_path / "a"), progress=False)
    out = fit(cfg, str(tmp_path / "b"), progress=False, stop_after_steps=7)  # mid-epoch 2 (5 steps/epoch)
    assert out == {"interrupted": True, "epoch": 2, "step_in_epoch": 2}
    fit(cfg, str(tmp_path / "b"), progress=False)
    assert bit_identical(params(tmp_path / "a"), params(tmp_path / "b"))
    best = max(rows(tmp_path / "a"), key=lambda r: (r["val_accuracy"], r["step"]))
    assert checkpoint.find(str(tmp_path / "a"), "best") == best["step"] == last["best_step"]


def test_a_streamed_run_under_a_time_budget_equals_one_without(folder, tmp_path, capsys):
    # The plan's timed steps read from their own stream (grain workers), which the run's own stream then repeats.
    fit(folder_config(folder, **{"data.mode": "stream", "time_budget_s": 3600.0}), str(tmp_path / "budget"),
        progress=False)
    assert "-> 1 of at most 1 epochs" in capsys.readouterr().out
    fit(folder_config(folder, **{"data.mode": "stream"}), str(tmp_path / "plain"), progress=False)
    assert bit_identical(params(tmp_path / "budget"), params(tmp_path / "plain"))


def test_a_streamed_run_replanned_by_its_budget_equals_the_recorded_plan(folder, tmp_path, monkeypatch, capsys):
    # 5 steps an epoch, planned at 10 s a step: all 4 epochs fit 1100 s. From step 5 on a step takes 100 s: after
    # epoch 2 (550 s) the 2 epochs left need 1000 s of the 550 s left; one fits -> 3 epochs in all.
    times = budget.StepTimes(0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0)
    monkeypatch.setattr(budget, "time_steps", lambda *a: (times, None, None))
    slow_clock(monkeypatch, lambda s: 10.0 if s < 5 else 100.0)
    cfg = {"data.mode": "stream", "num_epochs": 4, "eval_every": 4}
    fit(folder_config(folder, **cfg, time_budget_s=1100.0), str(tmp_path / "budget"), progress=False)
    assert "-> 3 epochs in all" in capsys.readouterr().out
    monkeypatch.undo()
    cfg.update(num_epochs=3, budget_replans=((10, 20, 15),))
    fit(folder_config(folder, **cfg), str(tmp_path / "plain"), progress=False)
    assert bit_identical(params(tmp_path / "budget"), params(tmp_path / "plain"))


@needs_fmnist
def test_streaming_with_two_processes_equals_one(folder, tmp_path):
    args = (f"--config.data.dir={folder}", "--config.data.name=folder", "--config.model.name=lenet5",
            "--config.num_classes=10", "--config.data.image_size=32", "--config.data.channels=1",
            "--config.data.mode=stream", "--config.data.workers=1", "--config.batch_size=28",
            "--config.parallelism=sharded", "--config.num_epochs=1", "--config.optimizer=sgd",
            "--config.data.cache_dir=")
    train(1, 2, tmp_path / "one", *args)
    train(2, 1, tmp_path / "two", *args)
    diff = max_abs_diff(params(tmp_path / "one"), params(tmp_path / "two"))
    print(f"streaming 2 processes x 1 device vs 1 x 2: params max |Δ| {diff:.3e}")
    assert diff <= 1e-5


def test_a_truncated_image_stops_with_one_line_or_is_skipped(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    victim = sorted((root / "03_Dress").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    cmd = [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/stripes_tiny.py",
           "--workdir", str(tmp_path / "w"), "--config.data.name=folder", f"--config.data.dir={root}",
           "--config.model.name=lenet5", "--config.num_classes=10", "--config.data.image_size=32",
           "--config.data.channels=1", "--config.num_epochs=1", "--config.plots=False", "--noprogress"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(victim) in out.stderr and "--config.data.skip_bad_images=True" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run(cmd + ["--config.data.skip_bad_images=True"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data_lines = [line for line in out.stdout.splitlines() if "train /" in line]
    counts = [int(w) for w in data_lines[0].replace("/", " ").split() if w.isdigit()][:3]
    assert sum(counts) == 199  # one of the 200 images skipped


def test_predict_ranks_the_classes_of_a_folder_trained_workdir(folder, tmp_path):
    fit(folder_config(folder), str(tmp_path), progress=False)
    image = sorted(os.listdir(os.path.join(folder, "07_Sneaker")))[0]
    out = subprocess.run([sys.executable, "-m", "experiments.predict", "--checkpoint", str(tmp_path), "--top", "3",
                          os.path.join(folder, "07_Sneaker", image)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ranked = [line.split()[1] for line in out.stdout.splitlines()[1:]]
    assert len(ranked) == 3 and all(name[:2].isdigit() and "_" in name for name in ranked)
    probs = [float(line.split()[-1]) for line in out.stdout.splitlines()[1:]]
    assert probs == sorted(probs, reverse=True)
    bad = subprocess.run([sys.executable, "-m", "experiments.predict", "--checkpoint", str(tmp_path), "--top=-1",
                          os.path.join(folder, "07_Sneaker", image)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--top=-1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_tfds_streams_through_data_source_and_equals_resident(tmp_path):
    """TFDS in stream mode reads examples on access with tfds.data_source (mock data, offline); the
    validation hold-out and the batches are those of the in-memory path."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.configs import mnist_lenet

    out = {}
    with tfds.testing.mock_data(num_examples=64):
        for mode in ("resident", "stream"):
            c = mnist_lenet.get_config()
            c.plots, c.num_epochs, c.batch_size, c.eval_batch_size = False, 1, 16, 32
            c.data.cache_dir, c.data.tfds_data_dir = "", str(tmp_path / "tfds")
            c.data.mode, c.data.workers = mode, 0  # workers are other processes: the mock lives in this one
            data = load_splits(c)
            assert data.streamed == (mode == "stream") and (len(data.train), len(data.val)) == (54, 10)
            fit(c, str(tmp_path / mode), progress=False)
            out[mode] = params(tmp_path / mode)
    assert type(data.train).__name__ == "TFDSSource"
    assert bit_identical(out["resident"], out["stream"])

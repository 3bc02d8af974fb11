"""End to end: fit / resume / evaluate on the synthetic stripes task, the CLIs and their errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.errors import TrainingError
from cnnjax.train.loop import fit
from experiments.configs import stripes_tiny
from experiments.evaluate import evaluate_workdir
from tests.helpers import override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def stripes(**overrides):
    c = stripes_tiny.get_config()
    c.plots = False
    return override(c, **overrides)


def _all_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows(workdir):
    """The per-evaluation rows (without the run's closing summary row)."""
    return [r for r in _all_rows(workdir) if "train_loss" in r]


def test_stripes_reaches_100_percent_and_writes_the_workdir(tmp_path):
    t0 = time.perf_counter()
    last = fit(stripes(plots=True), str(tmp_path), progress=False)
    assert time.perf_counter() - t0 < 120
    assert last["test_accuracy"] == 1.0
    rows = _rows(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s",
                "images_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # Test is evaluated on the final weights only (and on the best checkpoint, in the summary row).
    assert [r["epoch"] for r in rows if "test_accuracy" in r] == [10]
    summary = _all_rows(tmp_path)[-1]
    assert summary["best_step"] == checkpoint.find(str(tmp_path), "best") and summary["best_test_accuracy"] == 1.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.load(open(tmp_path / "config.json"))["model"]["name"] == "tiny_cnn"
    for png in ("curves.png", "per_class.png", "confusion.png", "filters.png", "feature_maps.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert checkpoint.steps(str(tmp_path))[-1] == rows[-1]["step"]
    best = max(rows, key=lambda r: (r["val_accuracy"], r["step"]))  # ties: the later checkpoint
    assert checkpoint.find(str(tmp_path), "best") == best["step"]


def test_evaluate_reproduces_recorded_accuracy(tmp_path):
    fit(stripes(num_epochs=3, **{"optimizer": "sgd", "learning_rate": 0.01}), str(tmp_path), progress=False)
    rows = _rows(tmp_path)
    for which in ("latest", "best", str(rows[1]["step"]) if rows[1]["step"] in
                  checkpoint.steps(str(tmp_path)) else "latest"):
        ev = evaluate_workdir(str(tmp_path), which, split="val")
        assert ev["accuracy"] == pytest.approx(ev["meta"]["val_accuracy"], abs=1e-9) == ev["recorded"]
        ev = evaluate_workdir(str(tmp_path), which, split="test")
        if which in ("latest", "best"):  # test is measured on the final and the best checkpoint only
            assert ev["accuracy"] == pytest.approx(ev["recorded"], abs=1e-9)
    ev = evaluate_workdir(str(tmp_path), "latest")
    assert ev["accuracy"] == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)


def _params(workdir):
    variables, _ = checkpoint.restore_variables(workdir, "latest")
    return variables


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    cfg = stripes(num_epochs=3, log_every=3)
    fit(cfg, str(tmp_path / "a"), progress=False)
    out = fit(cfg, str(tmp_path / "b"), progress=False, stop_after_steps=14)  # mid-epoch 2
    assert out["interrupted"] and out["epoch"] == 2
    fit(cfg, str(tmp_path / "b"), progress=False)
    a, b = _params(str(tmp_path / "a")), _params(str(tmp_path / "b"))
    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert all(jax.tree_util.tree_leaves(same)), "resumed params differ from the uninterrupted run"
    # Params are bit-identical; the epoch's train-loss sum is grouped differently around the
    # interruption (chunk sums added on the host), so it matches to float rounding only.
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    for x, y in zip(ra, rb, strict=True):
        assert x["val_accuracy"] == y["val_accuracy"] and x["val_loss"] == y["val_loss"]
        assert x.get("test_loss") == y.get("test_loss")
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["step"] == y["step"]


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    cfg = stripes(num_epochs=2)
    fit(cfg, str(tmp_path / "a"), progress=False)
    fit(cfg, str(tmp_path / "b"), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in rows]
    assert strip(_rows(tmp_path / "a")) == strip(_rows(tmp_path / "b"))
    fit(stripes(num_epochs=2, seed=1), str(tmp_path / "c"), progress=False)
    assert strip(_rows(tmp_path / "a")) != strip(_rows(tmp_path / "c"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    fit(stripes(num_epochs=1), str(tmp_path), progress=False)
    good = _params(str(tmp_path))
    with pytest.raises(TrainingError, match="loss became nan.*kept the last good checkpoint"):
        fit(stripes(num_epochs=3, learning_rate=1e30), str(tmp_path), progress=False)
    after = _params(str(tmp_path))
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, good, after)))


def test_resume_with_another_optimizer_is_refused(tmp_path):
    fit(stripes(num_epochs=1), str(tmp_path), progress=False)
    with pytest.raises(TrainingError, match="keep `optimizer` as it was or use a new `workdir`"):
        fit(stripes(num_epochs=2, optimizer="sgd"), str(tmp_path), progress=False)
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path),
               "--config.num_epochs=2", "--config.optimizer=sgd", "--config.plots=False", "--noprogress")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "keep --config.optimizer as it was or use a new --workdir" in out.stderr


def test_workdir_of_another_experiment_is_refused(tmp_path):
    fit(stripes(num_epochs=1), str(tmp_path), progress=False)
    before = (tmp_path / "config.json").read_text()
    cfg = stripes(num_epochs=1)
    cfg.model.kwargs = {}
    cfg.model.name = "gap_cnn"
    with pytest.raises(TrainingError, match="holds checkpoints of another experiment.*new `workdir`"):
        fit(cfg, str(tmp_path), progress=False)
    assert (tmp_path / "config.json").read_text() == before


def test_incompatible_input_size_is_a_clear_error(tmp_path):
    cfg = stripes()
    cfg.model.name = "simple_cnn"
    with pytest.raises(ValueError, match="cannot take stripes images of shape \\(8, 8, 1\\)"):
        fit(cfg, str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def _cli(module, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def test_train_and_evaluate_cli(tmp_path):
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path),
               "--config.num_epochs=2", "--config.plots=False", "--noprogress")
    assert out.returncode == 0, out.stderr
    assert "epoch   2/2" in out.stdout
    ev = _cli("experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint", "latest")
    assert ev.returncode == 0, ev.stderr
    last = ev.stdout.strip().splitlines()[-1]
    assert last == f"test_accuracy: {_rows(tmp_path)[-1]['test_accuracy']:.4f}"
    assert "vertical" in ev.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config.no_such_key=1"], "no_such_key"),
        (["--config.model.name=resnet9"], "unknown model 'resnet9'"),
        (["--config.data.name=fashion_mnist", "--config.data.dir=/nonexistent/dir", "--config.model.name=lenet5",
          "--config.num_classes=10"], "/nonexistent/dir"),
        (["--config.parallelism=gpu"], "parallelism must be auto, jit, pmap or sharded"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, needle):
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path),
               *args)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_evaluate_cli_without_checkpoint_is_clear(tmp_path):
    out = _cli("experiments.evaluate", "--workdir", str(tmp_path))
    assert out.returncode == 2 and "config.json" in out.stderr and "Traceback" not in out.stderr


def _start_long_run(workdir) -> subprocess.Popen:
    """experiments.train on stripes for 400 epochs, logging every step (stopped by the test)."""
    cmd = [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/stripes_tiny.py",
           "--workdir", str(workdir), "--config.num_epochs=400", "--config.log_every=1", "--config.plots=False",
           "--noprogress"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, XLA_FLAGS=""))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    proc = _start_long_run(tmp_path)
    for line in proc.stdout:
        if line.startswith("epoch   2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # interrupted with a checkpoint: not finished
    assert "interrupted" in out and "signal 15" in out and "checkpoint saved" in out
    steps = checkpoint.steps(str(tmp_path))
    assert steps
    rows = _rows(tmp_path)
    resumed = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir",
                   str(tmp_path), f"--config.num_epochs={rows[-1]['epoch'] + 1}", "--config.plots=False",
                   "--noprogress")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in _rows(tmp_path)] == list(range(1, rows[-1]["epoch"] + 2))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_train_checkpoint_evaluate_round_trip(tmp_path):
    out = _cli("experiments.train", "--config", "experiments/configs/fashion_mnist_lenet.py", "--workdir",
               str(tmp_path), f"--config.data.dir={FMNIST}", f"--config.data.cache_dir={tmp_path / 'cache'}",
               "--config.num_epochs=1", "--config.plots=False", "--noprogress", timeout=600)
    assert out.returncode == 0, out.stderr
    acc = _rows(tmp_path)[-1]["test_accuracy"]
    assert acc > 0.80  # one epoch of LeNet-5 on real Fashion-MNIST
    ev = _cli("experiments.evaluate", "--workdir", str(tmp_path), timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout.strip().splitlines()[-1] == f"test_accuracy: {acc:.4f}"


CONFIG_NAMES = sorted(p.stem for p in __import__("pathlib").Path(ROOT, "experiments", "configs").glob("*.py")
                      if p.stem not in ("__init__", "base"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_passes_checks_and_builds_its_model(name):
    import importlib

    from cnnjax import models
    from cnnjax.train.checks import check_config

    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    check_config(config)
    assert config.model.name in models.available()
    models.create(config.model.name, num_classes=config.num_classes or 5, **config.model.kwargs.to_dict())


@pytest.mark.parametrize("override,message", [
    ("--config.tta=3", "--config.tta must be 0 (off), 1 (mirror) or 2 (mirror + translate)"),
    ("--config.data.flip_mode=sometimes", "--config.data.flip_mode must be random or alternate"),
    ("--config.data.pad_mode=wrap", "--config.data.pad_mode must be constant or reflect"),
])
def test_fast_recipe_options_fail_with_one_line(tmp_path, override, message):
    out = _cli("experiments.train", "--config", "experiments/configs/cifar10_fast.py", "--workdir", str(tmp_path),
               override)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_write_plots_feeds_the_model_its_resized_input(tmp_path):
    """28x28 images resized on the device to lenet5's 32x32: the feature-map plot must resize too."""
    import optax

    from cnnjax import models
    from cnnjax.data import Dataset
    from cnnjax.train.plots import write_plots
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec

    model = models.create("lenet5")
    state = create_train_state(model, optax.sgd(0.1), (32, 32, 1), jax.random.PRNGKey(0))
    images = np.zeros((2, 28, 28, 1), np.uint8)
    ds = Dataset("fashion_mnist", images, np.zeros(2, np.int32), images, np.zeros(2, np.int32),
                 tuple(str(i) for i in range(10)))
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5}]
    ev = {"per_class_accuracy": np.zeros(10), "confusion": np.zeros((10, 10))}
    write_plots(str(tmp_path), model, state, ds.class_names, ds.test_images[0], history,
                StepSpec(10, (0.5,), (0.25,), resize_to=32), ev)
    assert os.path.getsize(tmp_path / "feature_maps.png") > 0


def test_conv_outputs_follow_call_order():
    from cnnjax import models
    from cnnjax.train.plots import conv_outputs

    model, x = models.create("fast_cnn"), jax.numpy.zeros((1, 32, 32, 3))
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x))()  # jit returns sorted keys
    assert list(variables["params"])[0] == "block1"
    convs = conv_outputs(model, variables, x)
    assert [path for path, _ in convs[:3]] == ["whiten", "block1/conv1", "block1/conv2"]
    assert [out.shape for _, out in convs[:2]] == [(1, 31, 31, 24), (1, 31, 31, 64)]
    assert conv_outputs(models.create("tiny_cnn"), models.create("tiny_cnn").init(
        jax.random.PRNGKey(0), jax.numpy.zeros((1, 8, 8, 1))), jax.numpy.zeros((1, 8, 8, 1)))[0][0] == "conv1"


def test_second_run_in_a_busy_workdir_is_refused_in_one_line(tmp_path):
    first = _start_long_run(tmp_path)
    try:
        for line in first.stdout:
            if line.startswith("epoch   1/"):
                break
        second = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir",
                      str(tmp_path), "--config.num_epochs=400", "--config.plots=False", "--noprogress")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert f"is in use by another run (pid {first.pid})" in second.stderr and "--workdir" in second.stderr
        assert first.poll() is None  # the first run is untouched and goes on
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
        assert first.returncode == 75
    finally:
        first.kill()
    rows = _rows(tmp_path)
    assert rows and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one writer only


@pytest.mark.parametrize("override,message", [
    ("--config.eval_batch_size=0", "--config.eval_batch_size must be >= 1"),
    ("--config.learning_rate=-0.1", "--config.learning_rate must be a finite number > 0"),
    ("--config.learning_rate=nan", "--config.learning_rate must be a finite number > 0"),
    ("--config.label_smoothing=5", "--config.label_smoothing must be in [0, 1)"),
    ("--config.num_devices=-1", "--config.num_devices must be >= 0"),
    ("--config.data.val_fraction=1.5", "--config.data.val_fraction must be in (0, 1)"),
    ("--config.time_budget_s=-5", "--config.time_budget_s must be a finite number of seconds >= 0"),
])
def test_bad_values_are_refused_before_anything_is_loaded_or_written(tmp_path, override, message):
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir",
               str(tmp_path / "w"), override)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing written, not even the workdir


def test_classes_out_of_range_and_a_workdir_that_is_a_file(tmp_path):
    out = _cli("experiments.train", "--config", "experiments/configs/fashion_mnist_lenet.py", "--workdir",
               str(tmp_path / "w"), "--config.data.classes=(3,10)", "--config.num_classes=2")
    assert out.returncode == 2 and "--config.data.classes must be distinct class indices in 0..9" in out.stderr
    (tmp_path / "f").write_text("x")
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path / "f"))
    assert out.returncode == 2 and "is a file; pass a directory" in out.stderr and "Traceback" not in out.stderr


def test_corrupt_newest_checkpoint_evaluate_names_it_and_resume_falls_back(tmp_path):
    from tests.test_checkpoint import _damage

    fit(stripes(num_epochs=2), str(tmp_path), progress=False)
    steps = checkpoint.steps(str(tmp_path))
    _damage(str(tmp_path), steps[-1], "flip")
    ev = _cli("experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint", "latest")
    assert ev.returncode == 2 and len(ev.stderr.strip().splitlines()) == 1 and "Traceback" not in ev.stderr
    assert f"checkpoint {steps[-1]}" in ev.stderr and f"intact checkpoints: [{steps[0]}]" in ev.stderr
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path),
               "--config.num_epochs=3", "--config.plots=False", "--noprogress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is damaged" in out.stderr and "resuming from an older one" in out.stderr
    assert [r["epoch"] for r in _rows(tmp_path)] == [1, 2, 3]
    ev = _cli("experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint", "latest")
    assert ev.returncode == 0 and ev.stdout.strip().splitlines()[-1] == \
        f"test_accuracy: {_rows(tmp_path)[-1]['test_accuracy']:.4f}"


@pytest.mark.parametrize("make,needle", [
    (lambda d: str(d / "missing.py"), "does not exist"),
    (lambda d: str(d), "is a directory"),
    (lambda d: (d / "bad.py").write_text("x = (\n") and str(d / "bad.py"), "syntax error at line 1"),
    (lambda d: (d / "none.py").write_text("X = 1\n") and str(d / "none.py"), "defines no get_config()"),
])
def test_config_file_problems_are_one_line(tmp_path, make, needle):
    out = _cli("experiments.train", "--config", make(tmp_path), "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_run_refused_after_taking_the_lock_leaves_no_workdir(tmp_path):
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir",
               str(tmp_path / "w"), "--config.model.name=simple_cnn")
    assert out.returncode == 2 and "cannot take stripes images" in out.stderr
    assert not (tmp_path / "w").exists()

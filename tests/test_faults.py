"""Fault injection for the CLIs and the library: full and read-only file systems, torn and damaged
run files, unreadable data, bad images, signals during start-up and within a chunk, and the CLI's
error mapping (the project's errors are one line; anything else keeps its traceback)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.errors import CheckpointError, MissingFileError
from cnnjax.train.loop import fit
from tests.test_experiments import FMNIST, ROOT, _cli, _rows, stripes

STRIPES = ("--config", "experiments/configs/stripes_tiny.py", "--config.plots=False", "--noprogress")


def _one_line_error(out: subprocess.CompletedProcess, needle: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr[-2000:]


@contextlib.contextmanager
def _tmpfs(path, size="8m"):
    """A fresh tmpfs at ``path`` (root only); skips the test where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(mount) -> None:
    """Leave 4 KiB free on the file system at ``mount``."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - 4096, 0))


# --- file systems --------------------------------------------------------------------------------


def test_full_file_system_refuses_the_save_in_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "fs") as fs:
        workdir = str(fs / "w")
        assert _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=1").returncode == 0
        _fill(fs)
        out = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=3")
        _one_line_error(out, "cannot save checkpoint 18")
        assert "the earlier checkpoints are intact" in out.stderr
        assert checkpoint.steps(workdir) == [9]
        assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
        os.unlink(fs / "filler")
        resumed = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=3")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3]


# orbax's writer threads of the failed save may still call back into its asyncio loop after orbax closed it
# ("RuntimeError: Event loop is closed", raised in a thread and ignored there): orbax's own clean-up, not
# cnnjax's, and what this test checks is asserted below.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_that_orbax_cannot_finish_raises_checkpoint_error_and_leaves_no_partial(tmp_path, monkeypatch):
    """The space check is skipped (as when another writer fills the disk mid-save): orbax fails inside."""
    with _tmpfs(tmp_path / "fs") as fs:
        workdir = str(fs / "w")
        fit(stripes(num_epochs=1), workdir, progress=False)
        _fill(fs)
        monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1 << 40)
        with pytest.raises(CheckpointError, match="No space left on device; the earlier checkpoints are intact"):
            fit(stripes(num_epochs=2), workdir, progress=False)
        # The partial save is never taken for a checkpoint, and the earlier one restores. (The save removes
        # its partial directory, but in this process orbax's failed writer threads can recreate it for a
        # moment; a CLI run exits, and the rerun's store removes any left.)
        assert checkpoint.steps(workdir) == [9]
        variables, meta = checkpoint.restore_variables(workdir, "latest")
        assert meta["step"] == 9 and jax.tree_util.tree_leaves(variables)
        os.unlink(fs / "filler")
        fit(stripes(num_epochs=2), workdir, progress=False)  # the rerun finishes from step 9
        assert checkpoint.steps(workdir)[-1] == 18
        assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


def test_read_only_workdir_refuses_training_in_one_line_and_still_evaluates(tmp_path):
    with _tmpfs(tmp_path / "fs") as fs:
        workdir = str(fs / "w")
        assert _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=1").returncode == 0
        before = sorted(os.listdir(workdir))
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        out = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=2")
        _one_line_error(out, "Read-only file system")
        assert sorted(os.listdir(workdir)) == before
        ev = _cli("experiments.evaluate", "--workdir", workdir, "--checkpoint", "latest")
        assert ev.returncode == 0, ev.stderr[-2000:]
        assert ev.stdout.strip().splitlines()[-1] == f"test_accuracy: {_rows(workdir)[-1]['test_accuracy']:.4f}"


# --- damaged run files ---------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    workdir = str(tmp_path)
    fit(stripes(num_epochs=1), workdir, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 18, "train_lo')  # killed while appending
    out = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["epoch"] for r in _rows(workdir)] == [1, 2]


def test_a_damaged_metrics_line_and_a_damaged_config_are_named_in_one_line(tmp_path):
    workdir = str(tmp_path)
    fit(stripes(num_epochs=1), workdir, progress=False)
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(["{garbage", *metrics]) + "\n")
    out = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=2")
    _one_line_error(out, f"{tmp_path / 'metrics.jsonl'} line 1 is damaged")
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config[: len(config) // 2])
    out = _cli("experiments.train", *STRIPES, "--workdir", workdir, "--config.num_epochs=2")
    _one_line_error(out, f"{tmp_path / 'config.json'} is damaged")
    assert (tmp_path / "config.json").read_text() == config[: len(config) // 2]  # left as it was
    _one_line_error(_cli("experiments.evaluate", "--workdir", workdir), "config.json is damaged")
    assert checkpoint.steps(workdir) == [9]


def test_an_unreadable_data_directory_is_not_reported_as_missing(tmp_path, monkeypatch):
    from cnnjax.data import folder, sources

    (tmp_path / "data" / "cat").mkdir(parents=True)
    real_listdir = os.listdir

    def listdir(path="."):
        if os.fspath(path).startswith(str(tmp_path / "data")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    for load in (lambda: sources.load("fashion_mnist", str(tmp_path / "data")),
                 lambda: folder.scan_folder(str(tmp_path / "data"))):
        with pytest.raises(MissingFileError, match="cannot read .*data given as `data.dir` \\(Permission denied\\); "
                                                   "make it readable"):
            load()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory; the monkeypatched test covers root")
def test_an_unreadable_data_directory_for_a_real_user(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    os.chmod(tmp_path / "data", 0)
    try:
        out = _cli("experiments.train", *STRIPES, "--workdir", str(tmp_path / "w"), "--config.data.name=folder",
                   f"--config.data.dir={tmp_path / 'data'}")
        _one_line_error(out, "Permission denied")
    finally:
        os.chmod(tmp_path / "data", 0o755)


# --- predict's images and summary's shapes -------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_images(tmp_path) -> dict[str, str]:
    from PIL import Image

    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 300, 3)).astype(np.uint8)).save(good)
    raw = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "text.png").write_text("not an image")
    # A 50000 x 50000 PNG header: 2.5 G pixels, far past Pillow's decompression-bomb limit.
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)) + \
        _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "adir").mkdir()
    return {"truncated": str(tmp_path / "truncated.jpg"), "not an image": str(tmp_path / "text.png"),
            "bomb": str(tmp_path / "bomb.png"), "directory": str(tmp_path / "adir"),
            "missing": str(tmp_path / "nope.jpg")}


def test_predict_names_each_unreadable_image_in_one_line_before_loading_weights(tmp_path):
    ck = tmp_path / "ck"  # config only: images are read before the weights, so none are needed
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model": {"name": "resnet18", "kwargs": {}}, "num_classes": 1000}))
    for what, path in _bad_images(tmp_path).items():
        out = _cli("experiments.predict", "--checkpoint", str(ck), path)
        _one_line_error(out, f"cannot read image {path}")
        assert "pass an image file" in out.stderr, what
    (ck / "config.json").write_text("{}")
    _one_line_error(_cli("experiments.predict", "--checkpoint", str(ck), str(tmp_path / "good.jpg")),
                    "is not a cnnjax config")


def test_summary_of_an_input_too_large_to_allocate_is_computed_from_shapes():
    out = subprocess.run([sys.executable, "-m", "cnnjax.summary", "resnet18", "--input", "100000,100000,3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "Total params: 11,689,512"
    assert "(1, 1000)" in out.stdout or "1, 1000" in out.stdout


# --- the CLI's error mapping ---------------------------------------------------------------------


def _run_main(main, capsys):
    from absl import flags

    from experiments import cli

    flags.FLAGS.unparse_flags()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prog"])
        code = cli.run(main)
    return code, capsys.readouterr().err


def test_cli_maps_project_errors_and_file_systems_to_one_line_and_shows_bugs(capsys):
    from cnnjax.errors import ConfigError

    def config_error(argv):
        raise ConfigError("learning_rate", "must be > 0")

    def disk_full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/w/metrics.jsonl")

    code, err = _run_main(config_error, capsys)
    assert code == 2 and err == "error: --config.learning_rate must be > 0\n"
    code, err = _run_main(disk_full, capsys)
    assert code == 2 and err.startswith("error: No space left on device (/data/w/metrics.jsonl); free some space")
    for bug in (KeyError("dtype"), ValueError("101"), ImportError("no module"), OSError(errno.EIO, "I/O error")):
        def buggy(argv, bug=bug):
            raise bug

        with pytest.raises(type(bug)):
            _run_main(buggy, capsys)


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, 2.0, 4.0])
def test_a_signal_during_start_up_or_compilation_is_one_line_and_exit_75(tmp_path, delay):
    workdir = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *STRIPES, "--workdir", str(workdir),
                             "--config.num_epochs=400"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, XLA_FLAGS=""))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, (proc.returncode, err[-2000:])  # never a traceback, never a segfault
    assert "Traceback" not in err and "Fatal Python error" not in err
    assert "interrupted" in err + out
    if "before" in err:  # stopped before training: nothing of the run is left behind
        assert not workdir.exists() or not checkpoint.steps(str(workdir))
    else:  # stopped during training: a checkpoint, and the same command resumes
        assert checkpoint.steps(str(workdir))


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler (``KeyboardInterrupt``) for the test, whatever ran before it; put back after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _start_up_agreement(monkeypatch, signal_when: str | None = None, others: bool = False) -> list:
    """Replace the collective with which the processes leave start-up (``distributed.any_process``, its first
    call in ``fit``) by one that sends this process Ctrl-C ``before`` its flag is taken (the signal came while it
    waited for the others) or ``after`` (the others had agreed to go on; this process left the collective late),
    and, with ``others``, answers as if another process had got a signal. Returns the flags this process gave
    at that first call."""
    from cnnjax.train import loop

    given, real = [], loop.distributed.any_process

    def agree(flag):
        if given:  # the training loop's own stop checks
            return real(flag)
        if signal_when == "before":
            # raise_signal signals this thread, and Python runs the handler before it returns.
            signal.raise_signal(signal.SIGINT)
            flag = True  # as fit would have passed, had the handler run before the call
        given.append(flag)
        if signal_when == "after":
            signal.raise_signal(signal.SIGINT)
        return real(flag) or others

    monkeypatch.setattr(loop.distributed, "any_process", agree)
    return given


def test_a_signal_while_waiting_for_the_other_processes_aborts_the_start_up(tmp_path, monkeypatch, python_ctrl_c):
    """The processes leave start-up through one collective. A signal that comes while this process waits there
    (another may still be starting, and will abort) aborts every process, before anything is written."""
    given = _start_up_agreement(monkeypatch, "before")
    workdir = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        fit(stripes(num_epochs=1), str(workdir), progress=False)
    assert given == [True]
    # Nothing of the run is written: no checkpoint, no config.json, no metrics.
    left = sorted(p.name for p in workdir.rglob("*")) if workdir.exists() else []
    assert not checkpoint.steps(str(workdir)) and not {"config.json", "metrics.jsonl"} & set(left), left


def test_a_signal_as_a_process_leaves_start_up_late_stops_after_the_first_step(tmp_path, monkeypatch,
                                                                               python_ctrl_c):
    """The race of a 2-process CI run: the others have agreed to go on (and are compiling the first step) when
    the signal reaches a process that has not yet left the collective. It must not abort alone; it steps on,
    and the run stops after the first step with a checkpoint, in every process (the loop's stop checks)."""
    given = _start_up_agreement(monkeypatch, "after")
    workdir = tmp_path / "w"
    out = fit(stripes(num_epochs=1), str(workdir), progress=False)
    assert given == [False]
    assert out == {"interrupted": True, "epoch": 1, "step_in_epoch": 1}
    assert checkpoint.steps(str(workdir)) == [1]


def test_a_signal_that_reached_only_another_process_aborts_this_one_as_sigterm(tmp_path, monkeypatch):
    """A scheduler may signal one process of a run. The others learn of it at the start-up collective and abort
    too, as SIGTERM would stop them (here a handler that records the signal), before anything is written."""
    class Stopped(Exception):
        pass

    def stopped(signum, frame):
        raise Stopped(signum)

    before = signal.signal(signal.SIGTERM, stopped)
    try:
        given = _start_up_agreement(monkeypatch, others=True)
        workdir = tmp_path / "w"
        with pytest.raises(Stopped) as stop:
            fit(stripes(num_epochs=1), str(workdir), progress=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert given == [False] and stop.value.args == (signal.SIGTERM,)
    left = sorted(p.name for p in workdir.rglob("*")) if workdir.exists() else []
    assert not checkpoint.steps(str(workdir)) and not {"config.json", "metrics.jsonl"} & set(left), left


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_sigterm_is_acted_on_within_one_step_not_one_chunk(tmp_path):
    """log_every far above the epoch: a chunk is the whole epoch, yet the host loop (the CPU path, forced here so
    that the test means the same on any machine) stops right after the step that was running when the signal
    came. (A ``lax.scan`` chunk runs to its end: tests/test_scan_path.py.)"""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config",
                             "experiments/configs/fashion_mnist_lenet.py", "--workdir", str(tmp_path / "w"),
                             f"--config.data.dir={FMNIST}", f"--config.data.cache_dir={tmp_path / 'cache'}",
                             "--config.log_every=100000", "--config.loop.scan=off", "--config.plots=False",
                             "--noprogress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, XLA_FLAGS=""))
    for line in proc.stdout:
        if line.startswith("epoch   1/"):
            time.sleep(1.0)  # well inside epoch 2's single chunk
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    took = time.perf_counter() - sent
    assert proc.returncode == 75, err[-2000:]
    step_in_epoch = int(out.split("interrupted (signal 15) at epoch 2, step ")[1].split(":")[0])
    spe = 54000 // 128
    assert 0 < step_in_epoch < spe  # mid-chunk: not at the chunk's end
    assert took < 20, took  # one step, a checkpoint save and the exit
    meta = checkpoint.restore_variables(str(tmp_path / "w"), "latest")[1]
    assert meta["step"] == spe + step_in_epoch and meta["partial"]["count"] == step_in_epoch * 128


def test_runner_stop_ends_a_chunk_after_the_step_it_names():
    from cnnjax import models
    from cnnjax.train.runner import Runner
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec
    from tests.test_train_steps import _data, _opt

    spec = StepSpec(num_classes=10, mean=(0.5,), std=(0.25,))

    model = models.create("tiny_cnn", num_classes=10)
    images, labels = _data(64)
    images = images[:, :8, :8, :1]
    idx = np.arange(64, dtype=np.int32).reshape(8, 8)

    def run(chunk, stop=None):
        state = create_train_state(model, _opt(), (8, 8, 1), jax.random.PRNGKey(0))
        runner = Runner(spec, model.apply, "jit", scan=False)
        img_d, lab_d = runner.put_data(images, labels)
        return runner.train(runner.put_state(state), img_d, lab_d, chunk, stop)

    asked = []
    stopped, m = run(idx, stop=lambda: asked.append(1) or len(asked) == 3)
    assert m["steps"] == 3 and int(m["count"]) == 3 * 8 and len(asked) == 3
    three, m3 = run(idx[:3])
    assert m3["steps"] == 3
    for a, b in zip(jax.tree_util.tree_leaves(stopped.params), jax.tree_util.tree_leaves(three.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m["loss_sum"]) == float(m3["loss_sum"])


def test_ctrl_c_while_fit_loads_data_in_python_raises_keyboard_interrupt_and_leaves_no_workdir(tmp_path, monkeypatch,
                                                                                               python_ctrl_c):
    """Library use (a notebook): start-up keeps Python's own Ctrl-C behaviour; the process lives on."""
    from cnnjax.train import loop

    real_load = loop.load_splits

    def interrupted_load(config):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the data loads (handled before this returns)
        return real_load(config)

    monkeypatch.setattr(loop, "load_splits", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        fit(stripes(num_epochs=1), str(tmp_path / "w"), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert not (tmp_path / "w").exists()

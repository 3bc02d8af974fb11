"""Multi-process training through experiments.launch: processes x devices invariance, SIGTERM and exact
resume, elastic resume, evaluation of a multi-process workdir, and a process killed with SIGKILL.

Each run is a real launch of N processes on this machine (coordinator on 127.0.0.1, gloo collectives on
the CPU). Every subprocess call is bounded by a timeout, and the launcher stops its children by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/stripes_tiny.py"
TIMEOUT = 240


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
                JAX_PLATFORMS="cpu")


def _train_cmd(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", CONFIG, "--workdir", str(workdir),
            "--config.plots=False", "--noprogress", "--heartbeat_timeout_s=10", *overrides]


def launch(processes: int, devices: int, command: list[str], timeout: float = TIMEOUT):
    """Run ``command`` in ``processes`` processes of ``devices`` CPU devices each; CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "experiments.launch", f"--num_processes={processes}", "--",
                           *command], cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)


def train(processes, devices, workdir, *overrides, status: int = 0):
    out = launch(processes, devices, _train_cmd(workdir, *overrides))
    assert out.returncode == status, out.stderr[-3000:]
    return out


def rows(workdir) -> list[dict]:
    """Per-evaluation rows (the closing summary row left out)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train_loss" in r]


def params(workdir):
    variables, _ = checkpoint.restore_variables(str(workdir), "latest")
    return variables


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def bit_identical(a, b) -> bool:
    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return all(jax.tree_util.tree_leaves(same))


NUMERIC = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "per_class_accuracy")


def assert_rows_close(ra, rb, tol=1e-5):
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert ("test_accuracy" in x) == ("test_accuracy" in y)
        for key in NUMERIC + (("test_loss", "test_accuracy") if "test_accuracy" in x else ()):
            np.testing.assert_allclose(x[key], y[key], atol=tol, rtol=0, err_msg=f"epoch {x['epoch']} {key}")


# pmap across processes and the resume from two processes to one run with -m slow (the default suite keeps the
# sharded step and the resume from one process to two).
@pytest.mark.parametrize("mode", ["sharded", pytest.param("pmap", marks=pytest.mark.slow)])
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, mode):
    overrides = (f"--config.parallelism={mode}", "--config.num_epochs=3", "--config.optimizer=sgd",
                 "--config.learning_rate=0.05")
    one = train(1, 4, tmp_path / "one", *overrides)
    two = train(2, 2, tmp_path / "two", *overrides)
    assert "4 cpu device(s) in 1 process(es)" in one.stdout
    assert "4 cpu device(s) in 2 process(es)" in two.stdout
    assert not [line for line in two.stdout.splitlines() if line.startswith("[p1]")], "only process 0 prints"
    assert len(rows(tmp_path / "two")) == 3
    assert_rows_close(rows(tmp_path / "one"), rows(tmp_path / "two"))
    diff = max_abs_diff(params(tmp_path / "one"), params(tmp_path / "two"))
    print(f"{mode}: 2x2 vs 1x4 params max |Δ| {diff:.3e}")
    assert diff <= 1e-5
    assert max_abs_diff(params(tmp_path / "one"), jax.tree_util.tree_map(np.zeros_like, params(tmp_path / "one"))) > 0


def test_two_processes_agree_on_one_time_budget_plan(tmp_path):
    out = train(2, 1, tmp_path / "w", "--config.parallelism=sharded", "--config.num_epochs=2",
                "--config.time_budget_s=3600")
    plan = [line for line in out.stdout.splitlines() if "time budget" in line]
    assert len(plan) == 1 and "-> 2 of at most 2 epochs" in plan[0], out.stdout[-2000:]
    assert [r["epoch"] for r in rows(tmp_path / "w")] == [1, 2]


def test_sigterm_mid_epoch_then_relaunch_is_bit_identical(tmp_path):
    overrides = ("--config.parallelism=sharded", "--config.num_epochs=3", "--config.log_every=3")
    train(2, 2, tmp_path / "ref", *overrides)
    cmd = [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--",
           *_train_cmd(tmp_path / "run", *overrides)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the header comes before the first step is compiled: stop after step 1
            if line.startswith("[p0] tiny_cnn on stripes"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]  # every process stopped with a checkpoint: not finished
    match = re.search(r"interrupted \(signal 15\) at epoch (\d+), step (\d+)", out)
    assert match and match.groups() == ("1", "1"), out  # after one step, not at the chunk's end (step 3)
    assert checkpoint.steps(str(tmp_path / "run")) == [1]
    train(2, 2, tmp_path / "run", *overrides)
    assert bit_identical(params(tmp_path / "ref"), params(tmp_path / "run"))
    ra, rb = rows(tmp_path / "ref"), rows(tmp_path / "run")
    for x, y in zip(ra, rb, strict=True):
        assert (x["step"], x["val_loss"], x["val_accuracy"]) == (y["step"], y["val_loss"], y["val_accuracy"])
        assert x.get("test_loss") == y.get("test_loss")
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)  # partial sums regrouped


@pytest.mark.parametrize("first,second", [pytest.param((2, 2), (1, 1), marks=pytest.mark.slow), ((1, 1), (2, 2))],
                         ids=["2x2_to_1x1", "1x1_to_2x2"])
def test_elastic_resume_continues_the_same_global_batches(tmp_path, first, second):
    overrides = ("--config.parallelism=sharded", "--config.num_epochs=2", "--config.optimizer=sgd",
                 "--config.learning_rate=0.05")
    train(*first, tmp_path / "ref", *overrides)
    out = train(*first, tmp_path / "run", *overrides, "--stop_after_steps=13", status=75)
    assert "interrupted (stop_after_steps) at epoch 2, step 4" in out.stdout  # 9 steps per epoch
    out = train(*second, tmp_path / "run", *overrides)
    assert f"in {second[0]} process(es)" in out.stdout
    diff = max_abs_diff(params(tmp_path / "ref"), params(tmp_path / "run"))
    print(f"elastic {first} -> {second}: params max |Δ| {diff:.3e}")
    assert diff <= 1e-5
    assert_rows_close(rows(tmp_path / "ref"), rows(tmp_path / "run"))


@pytest.mark.slow
def test_evaluate_in_one_process_reads_a_two_process_workdir(tmp_path):
    train(2, 2, tmp_path, "--config.parallelism=pmap", "--config.num_epochs=2", "--config.optimizer=sgd",
          "--config.learning_rate=0.01")
    ev = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint",
                         "latest"], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stdout.strip().splitlines()[-1] == f"test_accuracy: {rows(tmp_path)[-1]['test_accuracy']:.4f}"
    # evaluate joins a multi-process run too; only process 0 prints.
    ev2 = launch(2, 1, [sys.executable, "-m", "experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint",
                        "latest"])
    assert ev2.returncode == 0, ev2.stderr[-3000:]
    lines = [line for line in ev2.stdout.splitlines() if line.startswith("[p")]
    assert lines[-1] == f"[p0] test_accuracy: {rows(tmp_path)[-1]['test_accuracy']:.4f}"
    assert not [line for line in lines if line.startswith("[p1]")]


def _wait_for(proc, needle: str, timeout: float) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line or time.monotonic() > deadline:
            break
    return seen


def test_kill_9_of_one_process_fails_the_run_and_a_relaunch_finishes(tmp_path):
    overrides = ("--config.parallelism=sharded", "--config.num_epochs=30", "--config.log_every=1")
    cmd = [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--",
           *_train_cmd(tmp_path, *overrides)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for(proc, "epoch   2/30", TIMEOUT)
        assert any("epoch   2/30" in line for line in seen), "".join(seen)
        pids = {}
        while len(pids) < 2:  # the launcher logs its children's pids on stderr first
            m = re.match(r"\[launch\] p(\d): pid (\d+)", proc.stderr.readline())
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.communicate()
    print(f"launcher exited {proc.returncode} {elapsed:.1f} s after kill -9 of p1")
    assert proc.returncode != 0 and elapsed < 60
    for pid in pids.values():  # no child is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    done = checkpoint.steps(str(tmp_path))
    assert done and all(s % 9 == 0 for s in done)  # complete end-of-epoch checkpoints only (9 steps/epoch)
    variables, meta = checkpoint.restore_variables(str(tmp_path), "latest")
    assert meta["step"] == done[-1] and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
    out = train(2, 2, tmp_path, *overrides)
    assert [r["epoch"] for r in rows(tmp_path)] == list(range(1, 31)), out.stdout[-2000:]


def test_a_process_killed_outside_the_launcher_fails_the_others_by_heartbeat(tmp_path):
    """Without the launcher (as under SLURM) the coordination service's heartbeat stops the survivors."""
    from experiments.launch import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = _env(2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                         "JAX_PROCESS_ID": str(rank)}
        cmd = _train_cmd(tmp_path, "--config.parallelism=sharded", "--config.num_epochs=300",
                         "--config.log_every=1")
        cmd[cmd.index("--heartbeat_timeout_s=10")] = "--heartbeat_timeout_s=5"
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True))
    try:
        seen = _wait_for(procs[0], "epoch   2/300", TIMEOUT)
        assert any("epoch   2/300" in line for line in seen), "".join(seen)
        t0 = time.monotonic()
        procs[1].kill()
        procs[0].wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    print(f"survivor exited {procs[0].returncode} {elapsed:.1f} s after kill -9 of its peer")
    assert procs[0].returncode != 0 and elapsed < 60

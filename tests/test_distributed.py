"""Cluster specs, the launcher's plumbing and CLI error mapping (single process; the multi-process runs
are in test_multiprocess.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnnjax import distributed
from cnnjax.errors import ConfigError
from experiments import launch
from experiments.cli import as_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_needs_nothing_and_initialize_is_a_no_op():
    spec = distributed.ClusterSpec()
    assert not spec.explicit
    assert distributed.initialize(spec) is False
    assert distributed.is_primary()
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.barrier("alone") is None  # returns at once: nobody to wait for
    tree = {"a": 1.5}
    assert distributed.sum_over_processes(tree) is tree


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "needs all of coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "must be below num_processes"),
    ({"auto": True, "num_processes": 2}, "either auto-detection or"),
    ({"heartbeat_timeout_s": 0}, "heartbeat_timeout_s must be >= 1"),
])
def test_incomplete_cluster_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.ClusterSpec(**kwargs).validate()


def test_spec_from_env_reads_the_launcher_variables(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:999")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "3")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    spec = distributed.spec_from_env(heartbeat_timeout_s=7)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.heartbeat_timeout_s) == (
        "127.0.0.1:999", 3, 2, 7)
    spec.validate()


def test_library_messages_become_flag_names():
    err = ConfigError("data.pad_to", "is 20, smaller than the images (28x28)")
    assert str(err) == "`data.pad_to` is 20, smaller than the images (28x28)"
    assert as_flags(str(err)) == "--config.data.pad_to is 20, smaller than the images (28x28)"
    assert as_flags("use a new `workdir`") == "use a new --workdir"


def _launch(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_launcher_prefixes_output_and_passes_the_rank():
    code = "import os; print('rank', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'])"
    out = _launch("--num_processes=3", "--", sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["[p0] rank 0 of 3", "[p1] rank 1 of 3", "[p2] rank 2 of 3"]
    assert out.stderr.count("[launch] p") == 3
    assert "127.0.0.1:" in _launch("--num_processes=1", "--", sys.executable, "-c",
                                   "import os; print(os.environ['JAX_COORDINATOR_ADDRESS'])").stdout


def test_launcher_stops_the_others_when_one_fails():
    code = ("import os, sys, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(120)")
    out = _launch("--num_processes=2", "--grace_s=2", "--", sys.executable, "-c", code, timeout=60)
    assert out.returncode == 3
    assert "a process exited with status 3; stopping the others" in out.stderr


def test_launcher_without_a_command_is_one_line():
    out = _launch("--num_processes=2")
    assert out.returncode == 2 and "give the command after --" in out.stderr
    assert launch.exit_status(-9) == 137 and launch.exit_status(4) == 4

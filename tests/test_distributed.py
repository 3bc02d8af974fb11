"""Cluster specs, the launcher's plumbing and CLI error mapping (single process; the multi-process runs
are in test_multiprocess.py)."""

from __future__ import annotations

import os
import signal
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
    """The launcher as on a host without GPUs (``JAX_PLATFORMS=cpu``: no process gets GPUs of this machine)."""
    return subprocess.run([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


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


# Devices per process: the launcher's environments (pure functions), its one-line refusals, and real launches.

GPUS4 = ["0", "1", "2", "3"]


def test_child_env_gives_each_rank_its_own_gpus():
    base = {"PATH": "/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = [launch.child_env(r, 4, 1, base, GPUS4, "127.0.0.1:7") for r in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in one] == ["0", "1", "2", "3"]
    assert {e[distributed.ENV_LOCAL_DEVICE_IDS] for e in one} == {"0"}
    assert [e[distributed.ENV_PROCESS_ID] for e in one] == ["0", "1", "2", "3"]
    assert {(e[distributed.ENV_COORDINATOR], e[distributed.ENV_NUM_PROCESSES]) for e in one} == {("127.0.0.1:7", "4")}
    assert one[2]["XLA_FLAGS"] == base["XLA_FLAGS"] and one[2]["PATH"] == "/bin"  # GPU hosts: XLA_FLAGS untouched
    two = [launch.child_env(r, 2, 2, base, GPUS4) for r in range(2)]
    assert [(e["CUDA_VISIBLE_DEVICES"], e[distributed.ENV_LOCAL_DEVICE_IDS]) for e in two] == [("0,1", "0,1"),
                                                                                              ("2,3", "0,1")]
    assert base == {"PATH": "/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # the input unchanged
    shared = launch.child_env(1, 2, 0, {"CUDA_VISIBLE_DEVICES": "0,1"}, ["0", "1"])  # K=0: inherited as it is
    assert shared["CUDA_VISIBLE_DEVICES"] == "0,1" and distributed.ENV_LOCAL_DEVICE_IDS not in shared
    with pytest.raises(ValueError, match="needs 6 GPUs and this host has 4"):
        launch.child_env(2, 3, 2, base, GPUS4)


def test_an_inherited_cuda_visible_devices_is_subdivided_not_replaced(monkeypatch):
    monkeypatch.setattr(launch, "count_nvidia_gpus", lambda: pytest.fail("nvidia-smi asked despite the list"))
    gpus = launch.host_gpus({"CUDA_VISIBLE_DEVICES": "4, 6,GPU-5e1a,7"})
    assert gpus == ["4", "6", "GPU-5e1a", "7"]
    assert [launch.child_env(r, 2, 2, {}, gpus)["CUDA_VISIBLE_DEVICES"] for r in range(2)] == ["4,6", "GPU-5e1a,7"]
    assert [launch.child_env(r, 3, 1, {}, gpus)["CUDA_VISIBLE_DEVICES"] for r in range(3)] == ["4", "6", "GPU-5e1a"]
    assert launch.host_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert launch.host_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at an invalid entry
    assert launch.host_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "JAX_PLATFORMS": "cpu"}) == []
    assert launch.host_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "JAX_PLATFORMS": "cuda,cpu"}) == ["0", "1"]
    monkeypatch.setattr(launch, "count_nvidia_gpus", lambda: 3)
    assert launch.host_gpus({}) == ["0", "1", "2"]


def test_cpu_devices_per_process_replace_the_inherited_host_device_count():
    base = {"XLA_FLAGS": "--xla_cpu_a=1 --xla_force_host_platform_device_count=4  --xla_cpu_b"}
    env = launch.child_env(0, 2, 2, base, [])
    assert env["XLA_FLAGS"] == "--xla_cpu_a=1 --xla_cpu_b --xla_force_host_platform_device_count=2"
    assert "CUDA_VISIBLE_DEVICES" not in env and distributed.ENV_LOCAL_DEVICE_IDS not in env
    assert launch.child_env(0, 1, 3, {}, [])["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    assert launch.child_env(1, 2, 0, base, [])["XLA_FLAGS"] == base["XLA_FLAGS"]  # K=0: inherited
    assert "XLA_FLAGS" not in launch.child_env(1, 2, 0, {}, [])


@pytest.mark.parametrize("num,k,gpus,expected", [
    ("auto", None, GPUS4, (4, 1)),  # default on a GPU host: one process per GPU
    ("auto", 2, GPUS4, (2, 2)),
    ("auto", 0, GPUS4, (1, 0)),  # one process with all the GPUs
    ("2", None, GPUS4, (2, 1)),
    ("3", None, [], (3, 0)),  # default without GPUs: inherit
    ("2", 2, [], (2, 2)),
])
def test_plan_defaults_and_auto(num, k, gpus, expected):
    assert launch.plan(num, k, gpus) == expected


@pytest.mark.parametrize("cuda,argv,message", [
    ("0,1", ["--num_processes=3"], "--num_processes=3 x --devices_per_process=1 needs 3 GPUs and this host has 2: "
                                   "lower --num_processes or --devices_per_process"),
    ("0,1", ["--num_processes=1", "--devices_per_process=4"], "needs 4 GPUs and this host has 2"),
    ("0,1,2", ["--num_processes=auto", "--devices_per_process=2"],
     "the host's 3 GPUs are not a multiple of --devices_per_process=2; pass a K that divides 3"),
    ("", ["--num_processes=auto"], "--num_processes=auto counts GPUs and this host has none"),
    ("", ["--num_processes=two"], "--num_processes=two must be a number or auto"),
    ("", ["--num_processes=2", "--devices_per_process=-1"], "--devices_per_process=-1 must be >= 0"),
    ("0", ["--num_processes=0"], "--num_processes must be >= 1"),
])
def test_launcher_refuses_devices_it_cannot_give_in_one_line(monkeypatch, capsys, cuda, argv, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launch.main([*argv, "--", sys.executable, "-c", "pass"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "[launch] p" not in err  # nothing started
    assert message in err.splitlines()[-1] and err.splitlines()[-1].startswith("python -m experiments.launch: error:")


def _launch_bounded(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """``experiments.launch ARGS`` to completion; past ``timeout`` the launcher gets SIGTERM by its pid (passed
    on to its children by theirs), then SIGKILL, and the test fails."""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the launch took more than {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_launcher_splits_an_inherited_gpu_list_among_auto_processes():
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['JAX_LOCAL_DEVICE_IDS'])"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"CUDA_VISIBLE_DEVICES": "3,5,7,9"}
    out = _launch_bounded(["--num_processes=auto", "--devices_per_process=2", "--", sys.executable, "-c", code], env,
                          timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["[p0] 3,5 0,1", "[p1] 7,9 0,1"]
    assert "p1: pid" in out.stderr and "CUDA_VISIBLE_DEVICES=7,9" in out.stderr


def test_two_cpu_processes_of_two_devices_each_join_one_run():
    code = ("import jax\n"
            "from cnnjax import distributed\n"
            "distributed.initialize(distributed.spec_from_env(heartbeat_timeout_s=10, initialization_timeout_s=60))\n"
            "print('devices', jax.process_index(), jax.local_device_count(), jax.device_count(), flush=True)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONUNBUFFERED="1")
    out = _launch_bounded(["--num_processes=2", "--devices_per_process=2", "--", sys.executable, "-c", code], env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = sorted(line for line in out.stdout.splitlines() if " devices " in line)
    assert rows == ["[p0] devices 0 2 4", "[p1] devices 1 2 4"]  # 2 local devices each (not the inherited 4)
    assert out.stderr.count("2 CPU devices") == 2


def test_the_installed_jax_reads_the_local_device_ids_the_launcher_sets():
    """The launcher relies on jax.distributed.initialize reading JAX_LOCAL_DEVICE_IDS before its Slurm / Open MPI
    detection; a jax without it would need cnnjax.distributed.initialize to pass ``local_device_ids`` itself."""
    import inspect

    from jax._src import distributed as jax_distributed

    source = inspect.getsource(jax_distributed.State.initialize)
    assert f"os.environ.get('{distributed.ENV_LOCAL_DEVICE_IDS}')" in source
    assert source.index(distributed.ENV_LOCAL_DEVICE_IDS) < source.index("auto_detect_unset_distributed_params")

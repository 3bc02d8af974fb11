"""JAX's persistent compilation cache: where it lives, the switch, and a second process loading what the first
compiled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import pytest

from cnnjax import compile_cache
from cnnjax.train import checks
from tests.test_experiments import ROOT

# A process that compiles a small program with the cache on (every program cached, however quick) and prints the
# cache directory and how many of its compilations were cache hits (JAX's monitoring events).
_PROBE = """
import jax, jax.numpy as jnp
from cnnjax import compile_cache
print("dir", compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
f = lambda x, k: jnp.tanh(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))).sum()
jax.jit(jax.grad(f)).lower(jnp.ones((8, 32, 32, 16)), jnp.ones((3, 3, 16, 16))).compile()
print("hits", sum(e.endswith("/cache_hits") for e in events))
print("misses", sum(e.endswith("/cache_misses") for e in events))
"""


def test_cache_dir_defaults_to_the_user_cache_and_one_switch_turns_it_off(tmp_path):
    assert compile_cache.cache_dir({"HOME": "/h"}).endswith(os.path.join(".cache", "cnnjax", "jax-compilation"))
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/cnnjax/jax-compilation"
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "c")}) == str(tmp_path / "c")
    for off in ("0", "off", "OFF", "false"):
        assert compile_cache.cache_dir({compile_cache.ENV: off}) is None
    assert compile_cache.enable({compile_cache.ENV: "0"}) is None


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    env = dict(os.environ, **{compile_cache.ENV: str(tmp_path / "cache")})

    def probe() -> dict:
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())

    first = probe()
    assert first["dir"] == str(tmp_path / "cache") and os.listdir(tmp_path / "cache")  # written
    assert first["hits"] == "0" and int(first["misses"]) > 0, first
    second = probe()
    assert int(second["hits"]) == int(first["misses"]) and second["misses"] == "0", second
    env[compile_cache.ENV] = "0"
    assert probe() == {"dir": "None", "hits": "0", "misses": "0"}  # off: not even looked up


def test_deterministic_gpu_ops_are_one_flag_added_once_and_checked_on_the_gpu_only():
    flags = checks.with_deterministic_flag("--xla_gpu_deterministic_ops=false --xla_foo=1")
    assert flags.split() == ["--xla_foo=1", checks.DETERMINISTIC_FLAG]
    from tests.test_experiments import stripes

    config = stripes(deterministic=True)
    checks.check_deterministic(config, "cpu", "")  # nothing to do off the GPU
    checks.check_deterministic(config, "gpu", flags)
    try:
        checks.check_deterministic(config, "gpu", "")
    except checks.ConfigError as err:
        assert "deterministic" in str(err) and checks.DETERMINISTIC_FLAG in str(err)
    else:
        raise AssertionError("a GPU run without the flag must be refused")


@pytest.mark.slow  # two 2-process runs; the hang it guards against needs jax 0.12 (the Python 3.12 venv)
def test_a_second_multi_process_cpu_run_on_one_cache_does_not_hang(tmp_path):
    """jax 0.10 loads the first run's programs; from 0.11 on the runs compile without the cache (0.12 would hang)."""
    assert not compile_cache.leave_for_cluster()  # one process: the cache stays as it is
    uncached = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= compile_cache.CLUSTER_CPU_UNCACHED_FROM
    cache = tmp_path / "cache"
    env = dict(os.environ, **{compile_cache.ENV: str(cache)}, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for run in ("first", "second"):  # the second would load the first's programs, were they cached
        cmd = [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--", sys.executable, "-m",
               "experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path / run),
               "--config.plots=False", "--noprogress", "--config.parallelism=sharded", "--config.num_epochs=1"]
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)  # its own process group: stopped with its children
        try:
            _, err = launcher.communicate(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
        assert launcher.returncode == 0, err[-2000:]
    written = cache.exists() and any(cache.iterdir())
    assert written != uncached

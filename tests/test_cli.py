"""experiments.cli and the entry points: importing them changes nothing; running one applies the process settings
(cnnjax.cpu.process) once, keeping the user's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from cnnjax.cpu import process, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_point_settings(env: dict) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "experiments.cli"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_an_entry_point_restarts_itself_with_its_settings_once_and_keeps_the_users():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", process.MALLOC_CHOICE)}
    want = process.allocator_env(env, *process.machine_facts(), process.find_tcmalloc()) or {}
    got = _entry_point_settings(env)
    assert got["GLIBC_TUNABLES"] == want.get("GLIBC_TUNABLES", "")
    assert got["LD_PRELOAD"] == want.get("LD_PRELOAD", "")
    assert xla_flags.ENTRY_POINT_FLAG in got["XLA_FLAGS"] or xla_flags.YNN_FUSION_OPTION in env.get("XLA_FLAGS", "") \
        or not xla_flags.on_measured_line(process.jaxlib_version() or "")
    assert "kernels" in got  # what the CPU backend runs, for logs
    opted_out = _entry_point_settings({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                       process.MALLOC_CHOICE: "glibc"})
    assert (opted_out["GLIBC_TUNABLES"], opted_out["LD_PRELOAD"]) == ("glibc.malloc.arena_max=2", "")


_IMPORT_PROBE = """
import json, os, signal, sys
sys.argv[0] = "-m"  # as while `python -m experiments.NAME` imports the package
print("started", flush=True)
env = dict(os.environ)
handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
import experiments, experiments.cli, experiments.train, experiments.startup
import experiments.bench.cpu, experiments.bench.convs, experiments.bench.lib, experiments.bench.profile
import experiments.bench.recipe, experiments.bench.speedrun, experiments.bench.throughput
print(json.dumps({"environ": dict(os.environ) == env, "handlers": [signal.getsignal(s) for s in
                  (signal.SIGINT, signal.SIGTERM)] == handlers, "mask": signal.pthread_sigmask(signal.SIG_BLOCK, [])
                  == mask, "restarted": "cnnjax_restarted" in sys._xoptions, "jax": "jax" in sys.modules}))
"""


def test_importing_the_entry_points_and_benchmarks_changes_nothing_in_the_process():
    """No environment change (XLA_FLAGS, TF_CPP_MIN_LOG_LEVEL, ...), no signal handler, no restart: a program does
    those in its own __main__."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see test_faults)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "TF_CPP_MIN_LOG_LEVEL")}
        done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    finally:
        signal.signal(signal.SIGINT, before)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines.count("started") == 1  # not run again by a restart
    assert json.loads(lines[-1]) == {"environ": True, "handlers": True, "mask": True, "restarted": False,
                                     "jax": False}

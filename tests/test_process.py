"""cnnjax.cpu.process and cnnjax.cpu.xla_flags: the process settings a program applies with one call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnnjax.cpu import process, xla_flags
from cnnjax.train.runner import eval_compiler_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THP_MADVISE = "always [madvise] never\n"
TCM = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


@pytest.mark.parametrize("environ,glibc,thp,want", [
    ({}, "glibc 2.36", THP_MADVISE, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc 2.39", THP_MADVISE,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", THP_MADVISE, None),  # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc 2.36", THP_MADVISE, None),  # already restarted
    ({}, "glibc 2.31", THP_MADVISE, None),  # no such tunable before glibc 2.35
    ({}, "glibc 2.36", "[always] madvise never\n", None),  # the kernel backs large blocks anyway
    ({}, "glibc 2.36", "always madvise [never]\n", None),
    ({}, None, THP_MADVISE, None),  # not glibc
    ({}, "glibc 2.36", None, None),  # no transparent huge pages
])
def test_huge_page_tunables(environ, glibc, thp, want):
    assert process.huge_page_tunables(environ, glibc, thp) == want


@pytest.mark.parametrize("environ,tcmalloc,want", [
    ({}, TCM, {"LD_PRELOAD": TCM, **QUIET}),
    ({"LD_PRELOAD": "/opt/libfoo.so"}, TCM, {"LD_PRELOAD": f"/opt/libfoo.so:{TCM}", **QUIET}),
    ({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "10"}, TCM, {"LD_PRELOAD": TCM}),  # the user's threshold stays
    ({}, None, None),  # not installed
    ({"LD_PRELOAD": TCM}, TCM, None),  # already restarted
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, TCM, None),  # an allocator of the user's
])
def test_tcmalloc_preload(environ, tcmalloc, want):
    assert process.tcmalloc_preload(environ, tcmalloc) == want


def test_allocator_env_joins_huge_pages_and_tcmalloc_and_has_an_off_switch(tmp_path):
    assert process.allocator_env({}, "glibc 2.36", THP_MADVISE, TCM) == {
        "LD_PRELOAD": TCM, **QUIET, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert process.allocator_env({}, "glibc 2.31", THP_MADVISE, TCM) == {"LD_PRELOAD": TCM, **QUIET}
    settled = {"LD_PRELOAD": TCM, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert process.allocator_env(settled, "glibc 2.36", THP_MADVISE, TCM) is None
    assert process.allocator_env({}, None, THP_MADVISE, TCM) is None  # not glibc
    assert process.allocator_env({process.MALLOC_CHOICE: "glibc"}, "glibc 2.36", THP_MADVISE, TCM) is None
    assert process.find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / process.TCMALLOC).write_bytes(b"")
    assert process.find_tcmalloc(("/nonexistent", str(tmp_path))) == str(tmp_path / process.TCMALLOC)


def test_without_allocator_takes_out_what_the_restart_adds_and_keeps_the_rest():
    env = {"LD_PRELOAD": f"/opt/libfoo.so:{TCM}", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
           "XLA_FLAGS": xla_flags.ENTRY_POINT_FLAG, "HOME": "/root"}
    assert process.without_allocator(env) == {
        "LD_PRELOAD": "/opt/libfoo.so", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
        "XLA_FLAGS": xla_flags.ENTRY_POINT_FLAG, "HOME": "/root", process.MALLOC_CHOICE: "glibc"}
    bare = process.without_allocator({"LD_PRELOAD": TCM, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert bare == {process.MALLOC_CHOICE: "glibc"}
    assert process.allocator_env(bare, "glibc 2.36", THP_MADVISE, TCM) is None  # a program then runs as is


def test_the_xla_flag_only_on_the_measured_line_and_never_over_a_users_own():
    flag = xla_flags.ENTRY_POINT_FLAG
    assert xla_flags.with_entry_point_flag("", "0.10.2") == flag
    assert xla_flags.with_entry_point_flag("--xla_dump_to=/tmp/x", "0.10.0") == f"--xla_dump_to=/tmp/x {flag}"
    assert xla_flags.with_entry_point_flag("", "0.11.0") is None  # an unknown flag would abort the process
    assert xla_flags.with_entry_point_flag("", None) is None  # no jaxlib
    assert xla_flags.with_entry_point_flag(flag, "0.10.2") is None  # set already
    assert xla_flags.with_entry_point_flag("--xla_cpu_experimental_ynn_fusion_type=", "0.10.2") is None
    assert xla_flags.sets_own_ynn_types("--xla_cpu_experimental_ynn_fusion_type=") and \
        not xla_flags.sets_own_ynn_types(f"--xla_force_host_platform_device_count=2 {flag}")


def test_eval_compiler_options_by_the_devices_platform_with_jax_0_10_and_never_over_a_users_own_ynn_setting():
    want = {"xla_cpu_experimental_ynn_fusion_type": xla_flags.EVAL_YNN_FUSION_TYPES}
    assert eval_compiler_options("cpu", "0.10.2", "") == want
    assert eval_compiler_options("cpu", "0.10.2", f"--xla_force_host_platform_device_count=2 "
                                                  f"{xla_flags.ENTRY_POINT_FLAG}") == want
    assert eval_compiler_options("gpu", "0.10.2", "") is None
    assert eval_compiler_options("cpu", "0.11.2", "") is None  # option values read from 0.10 only
    assert eval_compiler_options("cpu", "0.10.2", "--xla_cpu_experimental_ynn_fusion_type=") is None


_CONFIGURE_PROBE = """
import json, os, signal, sys
print("started", flush=True)
from cnnjax.cpu import process
process.configure()
blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
print(json.dumps({**process.settings(), "restarted": process.RESTARTED in sys._xoptions,
                  "stop_signals_blocked": sorted(int(s) for s in process.STOP_SIGNALS & set(blocked))}))
"""


def _configure(env: dict) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-c", _CONFIGURE_PROBE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    return lines.count("started"), json.loads(lines[-1])


def test_configure_restarts_once_with_the_allocator_and_unblocks_the_stop_signals():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", process.MALLOC_CHOICE)}
    want = process.allocator_env(env, *process.machine_facts(), process.find_tcmalloc())
    starts, got = _configure(env)
    assert starts == (2 if want else 1)  # the program's code ran again after the restart (same command line)
    assert got["restarted"] == bool(want) and got["stop_signals_blocked"] == []
    assert got["LD_PRELOAD"] == (want or {}).get("LD_PRELOAD", "")
    assert got["GLIBC_TUNABLES"] == (want or {}).get("GLIBC_TUNABLES", "")
    if xla_flags.on_measured_line(process.jaxlib_version() or ""):
        assert got["XLA_FLAGS"].split()[-1] == xla_flags.ENTRY_POINT_FLAG
    own = "--xla_force_host_platform_device_count=2"
    starts, off = _configure({**env, process.MALLOC_CHOICE: "glibc", "XLA_FLAGS": own})
    assert starts == 1 and not off["restarted"] and (off["LD_PRELOAD"], off["GLIBC_TUNABLES"]) == ("", "")
    assert off["XLA_FLAGS"].startswith(own)  # the user's flags stay, first


_FAULTS_PROBE = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sort(x) + 1.0)  # a fresh 64 MB result per call
x = jnp.arange(1 << 24, dtype=jnp.float32)[::-1]
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # about 45 s on a 2-core CPU: two processes each allocating 5 x 64 MB under XLA
@pytest.mark.skipif(process.find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed")
def test_tcmalloc_keeps_xlas_blocks_in_the_process():
    """Preloaded tcmalloc gives XLA's per-call buffers back from the process: few page faults after warm-up;
    glibc's malloc maps (and faults in) each call's 64 MB afresh."""
    def faults(preload: str) -> int:
        env = {**os.environ, "LD_PRELOAD": preload, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
        out = subprocess.run([sys.executable, "-c", _FAULTS_PROBE], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return int(out.split()[-1])

    glibc, tcmalloc = faults(""), faults(process.find_tcmalloc())
    assert glibc > 5 * (64 << 20) // 4096 // 2, glibc  # at least half of the 5 x 64 MB in 4 KiB faults
    # Under a whole suite's load tcmalloc may hand some free spans back: a quarter still tells reuse from none.
    assert tcmalloc < glibc // 4, (tcmalloc, glibc)

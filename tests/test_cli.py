"""experiments.cli: the process settings every entry point starts with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from experiments import cli

THP_MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ,glibc,thp,want", [
    ({}, "glibc 2.36", THP_MADVISE, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc 2.39", THP_MADVISE,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", THP_MADVISE, None),  # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc 2.36", THP_MADVISE, None),  # already re-executed
    ({}, "glibc 2.31", THP_MADVISE, None),  # no such tunable before glibc 2.35
    ({}, "glibc 2.36", "[always] madvise never\n", None),  # the kernel backs large blocks anyway
    ({}, "glibc 2.36", "always madvise [never]\n", None),
    ({}, None, THP_MADVISE, None),  # not glibc
    ({}, "glibc 2.36", None, None),  # no transparent huge pages
])
def test_huge_page_tunables(environ, glibc, thp, want):
    assert cli.huge_page_tunables(environ, glibc, thp) == want


TCM = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


@pytest.mark.parametrize("environ,tcmalloc,want", [
    ({}, TCM, {"LD_PRELOAD": TCM, **QUIET}),
    ({"LD_PRELOAD": "/opt/libfoo.so"}, TCM, {"LD_PRELOAD": f"/opt/libfoo.so:{TCM}", **QUIET}),
    ({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "10"}, TCM, {"LD_PRELOAD": TCM}),  # the user's threshold stays
    ({}, None, None),  # not installed
    ({"CNNJAX_MALLOC": "glibc"}, TCM, None),  # the user's choice
    ({"LD_PRELOAD": TCM}, TCM, None),  # already re-executed
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, TCM, None),  # an allocator of the user's
])
def test_tcmalloc_preload(environ, tcmalloc, want):
    assert cli.tcmalloc_preload(environ, tcmalloc) == want


def test_process_env_joins_huge_pages_and_tcmalloc(tmp_path):
    assert cli.process_env({}, "glibc 2.36", THP_MADVISE, TCM) == {
        "LD_PRELOAD": TCM, **QUIET, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert cli.process_env({}, "glibc 2.31", THP_MADVISE, TCM) == {"LD_PRELOAD": TCM, **QUIET}
    settled = {"LD_PRELOAD": TCM, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert cli.process_env(settled, "glibc 2.36", THP_MADVISE, TCM) is None
    assert cli.process_env({}, None, THP_MADVISE, TCM) is None  # not glibc
    assert cli.find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / cli.TCMALLOC).write_bytes(b"")
    assert cli.find_tcmalloc(("/nonexistent", str(tmp_path))) == str(tmp_path / cli.TCMALLOC)


def _entry_point_settings(env: dict) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "experiments.cli"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_an_entry_point_restarts_itself_with_its_settings_once_and_keeps_the_users():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", cli.MALLOC_CHOICE)}
    want = cli.process_env({}, *cli.machine_facts(), cli.find_tcmalloc()) or {}
    got = _entry_point_settings(env)
    assert got["GLIBC_TUNABLES"] == want.get("GLIBC_TUNABLES", "")
    assert got["LD_PRELOAD"] == want.get("LD_PRELOAD", "")
    assert cli.CPU_XLA_FLAG in got["XLA_FLAGS"] or "xla_cpu_experimental_ynn_fusion_type" in env.get("XLA_FLAGS", "")
    assert {"cpu_convolutions", "cpu_float32_conv_paths", "cpu_max_pools"} <= set(got)  # what the CPU runs, for logs
    opted_out = _entry_point_settings({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", cli.MALLOC_CHOICE: "glibc"})
    assert (opted_out["GLIBC_TUNABLES"], opted_out["LD_PRELOAD"]) == ("glibc.malloc.hugetlb=0", "")


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
@pytest.mark.skipif(cli.find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed")
def test_tcmalloc_keeps_xlas_blocks_in_the_process():
    """Preloaded tcmalloc gives XLA's per-call buffers back from the process: few page faults after warm-up;
    glibc's malloc maps (and faults in) each call's 64 MB afresh."""
    def faults(preload: str) -> int:
        env = {**os.environ, "LD_PRELOAD": preload, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
        out = subprocess.run([sys.executable, "-c", _FAULTS_PROBE], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return int(out.split()[-1])

    glibc, tcmalloc = faults(""), faults(cli.find_tcmalloc())
    assert glibc > 5 * (64 << 20) // 4096 // 2, glibc  # at least half of the 5 x 64 MB in 4 KiB faults
    # Alone tcmalloc faults about one page; under the whole suite's load it once faulted 65539 against
    # glibc's 409618 (tcmalloc handing some free spans back): a quarter still tells reuse from none.
    assert tcmalloc < glibc // 4, (tcmalloc, glibc)


def test_the_package_installs_the_start_up_handler_before_the_entry_points_own_code():
    """`python -m experiments.NAME` imports the package while argv[0] is still '-m': the one-line, status-75
    handler is in place before NAME's module is read (a CI run once got Ctrl-C there, 0.3 s after start)."""
    probe = ("import signal, sys; sys.argv[0] = {argv!r}; import experiments; "
             "print(getattr(signal.getsignal(signal.SIGINT), '__name__', 'default'))")
    for argv, want in (("-m", "interrupt_at_start"), ("script.py", "default_int_handler")):
        # SIGINT at its default in the child, as in a terminal: a job started in the background (`cmd &` in a
        # script) inherits it ignored, and Python then installs no handler of its own. A handler here (not an
        # ignore) is reset to the default by exec.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            done = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], capture_output=True, text=True,
                                  timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        finally:
            signal.signal(signal.SIGINT, before)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == want

"""experiments.cli: the process settings every entry point starts with."""

from __future__ import annotations

import os
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


def _entry_point_settings(env: dict) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "experiments.cli"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def _this_machine_wants_huge_pages() -> bool:
    try:
        with open(cli.THP_SETTING) as f:
            thp = f.read()
        return cli.huge_page_tunables({}, os.confstr("CS_GNU_LIBC_VERSION"), thp) is not None
    except (AttributeError, ValueError, OSError):
        return False


def test_an_entry_point_restarts_itself_with_huge_pages_once_and_keeps_the_users_setting():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    got = _entry_point_settings(env)
    assert got["GLIBC_TUNABLES"] == ("glibc.malloc.hugetlb=1" if _this_machine_wants_huge_pages() else "")
    assert cli.CPU_XLA_FLAG in got["XLA_FLAGS"] or "xla_cpu_experimental_ynn_fusion_type" in env.get("XLA_FLAGS", "")
    opted_out = _entry_point_settings({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert opted_out["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_the_package_installs_the_start_up_handler_before_the_entry_points_own_code():
    """`python -m experiments.NAME` imports the package while argv[0] is still '-m': the one-line, status-75
    handler is in place before NAME's module is read (a CI run once got Ctrl-C there, 0.3 s after start)."""
    probe = ("import signal, sys; sys.argv[0] = {argv!r}; import experiments; "
             "print(getattr(signal.getsignal(signal.SIGINT), '__name__', 'default'))")
    for argv, want in (("-m", "interrupt_at_start"), ("script.py", "default_int_handler")):
        done = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], capture_output=True, text=True,
                              timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == want

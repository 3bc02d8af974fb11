"""Process settings for programs that run JAX on a CPU, applied by one explicit call: :func:`configure`.

Contract. A program (every ``experiments`` entry point that runs JAX, and the benchmarks) calls :func:`configure`
first thing in its ``__main__``, after installing its signal handlers and before jax initialises a backend.
Importing this module changes nothing; a library user (a notebook, a script of one's own) gets these settings only
by calling it, and not from an interactive interpreter (it may restart the process). It does two things:

1. **XLA flag.** It adds :data:`cnnjax.cpu.xla_flags.ENTRY_POINT_FLAG` to ``XLA_FLAGS``, only where the installed
   jaxlib is of the line the flag is known on (an unknown XLA flag aborts the process) and never over YNN fusion
   types the user set.
2. **Allocator.** It re-executes the process once (same process id, same command line) with

   * tcmalloc preloaded (Debian's ``libtcmalloc-minimal4``, appended to the user's ``LD_PRELOAD``): XLA:CPU
     allocates a step's buffers afresh on every call, and glibc maps and faults in the large ones again each
     time; tcmalloc keeps freed blocks for the next step;
   * glibc's huge pages (the ``glibc.malloc.hugetlb=1`` tunable, glibc >= 2.35, transparent huge pages in
     ``madvise`` mode), which glibc reads at process start only.

   Each is left out where it cannot apply or the user chose: a tcmalloc or jemalloc preloaded already, a
   ``glibc.malloc.hugetlb`` tunable set already. ``CNNJAX_MALLOC=glibc`` switches the restart off: glibc's
   malloc as it is.

SIGTERM and SIGINT stay blocked across the restart (a blocked signal stays pending), and the new image's
:func:`configure` unblocks them once the program's handlers are in place again, so a signal during the restart is
handled like one at any other time. The new image knows it is the restarted one from the interpreter option
``-X cnnjax_restarted`` (:data:`RESTARTED`), which no child process inherits.

``python -m experiments.bench.cpu --sides backend,glibc`` measures what the allocator settings buy (the same
train steps with and without them); ``python -m experiments.cli`` prints the settings a program runs with.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from cnnjax.cpu import xla_flags

MALLOC_CHOICE = "CNNJAX_MALLOC"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
TCMALLOC = "libtcmalloc_minimal.so.4"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# tcmalloc reports every allocation over 1 GiB on stderr by default; a resident dataset may be larger.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
RESTARTED = "cnnjax_restarted"
# The variables the settings live in, for logs and diagnostics.
SETTINGS_VARIABLES = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD")


def huge_page_tunables(environ: dict, glibc_version: str | None, thp_setting: str | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to restart with, or None to run as is.

    ``glibc_version`` is ``os.confstr('CS_GNU_LIBC_VERSION')`` (``'glibc 2.36'``; None elsewhere) and
    ``thp_setting`` the kernel's ``always [madvise] never`` line. Only ``madvise`` needs the tunable
    (``always`` backs large blocks anyway, ``never`` has none to give), and a tunable the user already set
    is left alone."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE in tunables or not glibc_version or not thp_setting:
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+)\S*", glibc_version.strip())
    if match is None or (int(match.group(1)), int(match.group(2))) < (2, 35) or "[madvise]" not in thp_setting:
        return None
    return f"{tunables}:{HUGE_PAGES_TUNABLE}=1" if tunables else f"{HUGE_PAGES_TUNABLE}=1"


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The path of :data:`TCMALLOC` in the first of ``dirs`` that has it, or None."""
    return next((path for d in dirs if os.path.isfile(path := os.path.join(d, TCMALLOC))), None)


def tcmalloc_preload(environ: dict, tcmalloc: str | None) -> dict[str, str] | None:
    """The variables to add to ``environ`` to run with ``tcmalloc`` (a library path; None: not installed)
    preloaded, or None to run as is: not installed, or an allocator already preloaded."""
    preload = environ.get("LD_PRELOAD", "")
    if tcmalloc is None or any(name in preload for name in ("tcmalloc", "jemalloc")):
        return None
    quiet = {k: v for k, v in _TCMALLOC_QUIET.items() if k not in environ}
    return {"LD_PRELOAD": f"{preload}:{tcmalloc}" if preload else tcmalloc, **quiet}


def machine_facts() -> tuple[str | None, str | None]:
    """``(glibc_version, thp_setting)`` of this machine, for :func:`allocator_env`: ``'glibc 2.36'`` (None without
    glibc) and the kernel's ``always [madvise] never`` line (None without transparent huge pages)."""
    try:
        glibc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # not Linux / glibc
        glibc_version = None
    try:
        with open(THP_SETTING) as f:
            thp_setting = f.read()
    except OSError:
        thp_setting = None
    return glibc_version, thp_setting


def allocator_env(environ: dict, glibc_version: str | None, thp_setting: str | None,
                  tcmalloc: str | None) -> dict[str, str] | None:
    """The variables a program restarts itself with (tcmalloc, huge pages), or None to run as is: without glibc,
    with ``CNNJAX_MALLOC=glibc``, or with nothing left to add."""
    if not glibc_version or environ.get(MALLOC_CHOICE, "") == "glibc":
        return None
    changes = tcmalloc_preload(environ, tcmalloc) or {}
    tunables = huge_page_tunables(environ, glibc_version, thp_setting)
    if tunables is not None:
        changes["GLIBC_TUNABLES"] = tunables
    return changes or None


def without_allocator(environ: dict) -> dict[str, str]:
    """``environ`` as a program with ``CNNJAX_MALLOC=glibc`` runs: tcmalloc and the huge-page tunable taken out
    (the XLA flag kept). The benchmarks start such processes to measure what the allocator settings buy."""
    env = dict(environ)
    preloads = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and TCMALLOC not in p]
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(HUGE_PAGES_TUNABLE)]
    for name, parts in (("LD_PRELOAD", preloads), ("GLIBC_TUNABLES", tunables)):
        if parts:
            env[name] = ":".join(parts)
        else:
            env.pop(name, None)
    env[MALLOC_CHOICE] = "glibc"
    return env


def jaxlib_version() -> str | None:
    """The installed jaxlib's version, read without importing it (None: not installed)."""
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def configure() -> None:
    """Apply the process settings of the module's contract: the XLA flag in ``os.environ``, then (once) the restart
    with the allocator settings. Call it before jax initialises a backend, with the program's SIGTERM / SIGINT
    handlers installed."""
    flags = xla_flags.with_entry_point_flag(os.environ.get("XLA_FLAGS", ""), jaxlib_version())
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags
    if RESTARTED in getattr(sys, "_xoptions", {}):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a signal that came during the restart lands now
        return
    _restart(allocator_env(dict(os.environ), *machine_facts(), find_tcmalloc()))


def _restart(changes: dict[str, str] | None) -> None:
    argv = getattr(sys, "orig_argv", None)
    if changes is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.execve(sys.executable, [sys.executable, "-X", RESTARTED, *argv[1:]], {**os.environ, **changes})
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # run on without


def settings(environ: dict | None = None) -> dict[str, str]:
    """``{variable: value}`` of :data:`SETTINGS_VARIABLES` in ``environ`` (default this process's)."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, "") for name in SETTINGS_VARIABLES}

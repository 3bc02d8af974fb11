"""Shared CLI plumbing: XLA flags for users, joining a multi-process run, and user errors as one
``error:`` line (exit 2) with config fields written as the flags that set them."""

from __future__ import annotations

import os
import re
import signal
import sys

from cnnjax import xla_cpu
from experiments.startup import EXIT_INTERRUPTED  # noqa: F401  (cli.EXIT_INTERRUPTED for the entry points)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA:CPU flag set before jax is imported, only for the jax line it was measured on (an unknown XLA flag aborts
# the process), and never over a user's own (cnnjax.xla_cpu).
CPU_XLA_FLAG = xla_cpu.ENTRY_POINT_FLAG
# Names in backticks in library messages that are command-line flags of their own, not config fields.
TOP_LEVEL_FLAGS = ("workdir", "checkpoint", "data_dir", "split")


def _add_cpu_xla_flag() -> None:
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if xla_cpu.on_measured_line(version) and xla_cpu.YNN_FUSION_OPTION not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_add_cpu_xla_flag()


def _running_an_experiment() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("experiments.")


# Transparent huge pages for the heap. XLA:CPU allocates a step's buffers afresh on every call (for cifar_resnet20
# at batch 128, a 318 MB block and 75 MB im2col buffers of the weight-gradient convolutions), and glibc hands
# blocks that large out as new mappings: on 4 KiB pages, 78,000 page faults and 190 ms of kernel time per step
# (2 cores; ``python -m experiments.bench_cpu --variants="+overlapping strided-view max-pool,+huge pages"``
# measures the whole step). glibc (>= 2.35) backs its blocks with huge pages under the ``glibc.malloc.hugetlb=1``
# tunable, which it reads at process start only, so an entry point re-executes itself once with it (same process
# id). Set ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` to run without.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
# tcmalloc for the whole process, where Debian's libtcmalloc-minimal4 is installed. Even on huge pages, glibc maps
# each step's largest block afresh (XLA runs the step on a thread of its own, whose glibc arena maps every block
# over 64 MB and unmaps it on free): for cifar_resnet20 at batch 128, a 288 MB mapping, 600 page faults and 50-100
# ms of kernel time per step on the 2-core Xeon (2026-12-03). tcmalloc keeps freed blocks for the next step: no
# page faults after the first step. ``python -m experiments.bench_cpu --variants="+oneDNN max-pool,+tcmalloc"``
# measures it. The entry points re-execute with it in ``LD_PRELOAD`` (appended to a user's own preloads), unless
# ``CNNJAX_MALLOC=glibc`` is set or a tcmalloc / jemalloc is preloaded already.
TCMALLOC = "libtcmalloc_minimal.so.4"
MALLOC_CHOICE = "CNNJAX_MALLOC"
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# tcmalloc reports every allocation over 1 GiB on stderr by default; a resident dataset may be larger.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_UNBLOCK_AFTER_REEXEC = "CNNJAX_UNBLOCK_STOP_SIGNALS"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_tunables(environ: dict, glibc_version: str | None, thp_setting: str | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None to run as is.

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


def find_tcmalloc(dirs: tuple[str, ...] = _LIBRARY_DIRS) -> str | None:
    """The path of :data:`TCMALLOC` in the first of ``dirs`` that has it, or None."""
    return next((path for d in dirs if os.path.isfile(path := os.path.join(d, TCMALLOC))), None)


def tcmalloc_preload(environ: dict, tcmalloc: str | None) -> dict[str, str] | None:
    """The variables to add to ``environ`` to run with ``tcmalloc`` (a library path; None: not installed)
    preloaded, or None to run as is: not installed, ``CNNJAX_MALLOC=glibc``, or an allocator already preloaded."""
    preload = environ.get("LD_PRELOAD", "")
    if (tcmalloc is None or environ.get(MALLOC_CHOICE, "") == "glibc"
            or any(name in preload for name in ("tcmalloc", "jemalloc"))):
        return None
    quiet = {k: v for k, v in _TCMALLOC_QUIET.items() if k not in environ}
    return {"LD_PRELOAD": f"{preload}:{tcmalloc}" if preload else tcmalloc, **quiet}


def machine_facts() -> tuple[str | None, str | None]:
    """``(glibc_version, thp_setting)`` of this machine, for :func:`process_env`: ``'glibc 2.36'`` (None without
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


def process_env(environ: dict, glibc_version: str | None, thp_setting: str | None,
                tcmalloc: str | None) -> dict[str, str] | None:
    """The variables an entry point re-executes itself with (huge pages, tcmalloc), or None to run as is
    (always without glibc)."""
    if not glibc_version:
        return None
    changes = tcmalloc_preload(environ, tcmalloc) or {}
    tunables = huge_page_tunables(environ, glibc_version, thp_setting)
    if tunables is not None:
        changes["GLIBC_TUNABLES"] = tunables
    return changes or None


def _reexec_with_process_env() -> None:
    changes = process_env(dict(os.environ), *machine_facts(), find_tcmalloc())
    argv = getattr(sys, "orig_argv", None)
    if changes is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # SIGTERM / Ctrl-C stay blocked across the exec (a blocked signal stays pending), until the new image has
    # its handlers: a signal during the restart is then one line and status 75 too, not a traceback.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **changes, _UNBLOCK_AFTER_REEXEC: "1"})
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # run on without


# A command's SIGTERM / Ctrl-C (during start-up, or at any time for evaluate / predict / port) is one line
# and the interrupted status, not a traceback: experiments/__init__.py installed that handler when `python -m`
# imported the package (experiments.startup); a training run replaces it with its own.
if _running_an_experiment():
    _reexec_with_process_env()
    if os.environ.pop(_UNBLOCK_AFTER_REEXEC, None):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a signal that came during the restart lands now


def define_distributed_flags() -> None:
    """--coordinator_address / --num_processes / --process_id (defaults from experiments.launch's
    environment), --distributed_auto, --heartbeat_timeout_s."""
    from absl import flags

    from cnnjax import distributed as d

    flags.DEFINE_string("coordinator_address", os.environ.get(d.ENV_COORDINATOR, ""),
                        "host:port of process 0 of a multi-process run ('' : single process)")
    flags.DEFINE_integer("num_processes", int(os.environ.get(d.ENV_NUM_PROCESSES, "0")),
                         "number of processes in the run")
    flags.DEFINE_integer("process_id", int(os.environ.get(d.ENV_PROCESS_ID, "-1")), "this process's index")
    flags.DEFINE_bool("distributed_auto", False, "join a multi-process run detected by JAX (SLURM, TPU, Kubernetes)")
    flags.DEFINE_integer("heartbeat_timeout_s", 30, "a process silent this long fails the whole run")


def join_cluster() -> bool:
    """Join the multi-process run the distributed flags describe (no-op for a single process).

    In a multi-process run, stdout keeps only Python's own output: native libraries' chatter on
    file descriptor 1 (gloo prints a line per connection) goes to /dev/null, and processes other
    than 0 print nothing on stdout at all (their errors still reach stderr)."""
    from absl import flags

    from cnnjax import distributed

    f = flags.FLAGS
    spec = distributed.ClusterSpec(f.coordinator_address, f.num_processes, f.process_id, f.distributed_auto,
                                   f.heartbeat_timeout_s)
    multi = distributed.initialize(spec)
    if multi:
        _silence_native_stdout(keep_python=distributed.is_primary())
    return multi


def _silence_native_stdout(keep_python: bool) -> None:
    sys.stdout.flush()
    if keep_python:
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def as_flags(message: str) -> str:
    """A library message with `field` references rewritten as ``--config.field`` / ``--workdir``."""
    return re.sub(r"`([A-Za-z_][\w.]*)`",
                  lambda m: f"--{m.group(1)}" if m.group(1) in TOP_LEVEL_FLAGS else f"--config.{m.group(1)}", message)


def config_file_problem(argv: list[str]) -> str | None:
    """What is wrong with the ``--config FILE`` in ``argv`` (missing, a directory, a syntax error, no
    ``get_config``), as one line naming the file and the fix; None if it looks loadable."""
    import ast

    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return None
    if not os.path.exists(path):
        return f"config file {path} does not exist; pass --config experiments/configs/NAME.py"
    if os.path.isdir(path):
        return f"config {path} is a directory; pass --config experiments/configs/NAME.py"
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as err:
        return f"config file {path} has a syntax error at line {err.lineno}: {err.msg}; fix the file"
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot read config file {path} ({err}); pass a readable Python file"
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
        return f"config file {path} defines no get_config(); it must return an ml_collections.ConfigDict"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (an unknown config key raises AttributeError there)."""
    from absl import flags

    problem = config_file_problem(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        key = str(err).strip("\"'")
        message = f"unknown config key {key!r}; see experiments/configs/base.py for the keys"
    except (flags.Error, ValueError, TypeError) as err:
        message = str(err).splitlines()[0]
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fs_problem(err: BaseException) -> str | None:
    """One line for a full / read-only / forbidden file system anywhere in ``err``'s chain, else None."""
    from cnnjax.io import fs_condition

    condition = fs_condition(err)
    if condition is None:
        return None
    where = next((f" ({e.filename})" for e in (err, err.__cause__, err.__context__)
                  if isinstance(e, OSError) and e.filename), "")
    return f"{condition[0]}{where}; {condition[1]}, then run the same command again"


def run(main) -> int:
    """``absl.app.run(main)`` with the project's own errors (:class:`cnnjax.errors.CnnjaxError`) and file-system
    conditions reported on one ``error:`` line (exit 2); any other
    exception is a bug and shows its traceback."""
    from absl import app, logging

    from cnnjax.errors import CnnjaxError

    def quiet_main(argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        return main(argv)

    try:
        app.run(quiet_main, flags_parser=parse_flags)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except CnnjaxError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        problem = fs_problem(err)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m experiments.cli: the process settings the entry points run with
    for name in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD"):
        print(f"{name}={os.environ.get(name, '')}")
    from cnnjax import conv, layers
    from cnnjax.native import onednn

    print(f"cpu_convolutions={onednn.describe()}")
    print(f"cpu_float32_conv_paths={conv.describe_onednn_float32_paths()}")
    print(f"cpu_max_pools={layers.describe_max_pools()}")

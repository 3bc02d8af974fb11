"""Shared CLI plumbing: joining a multi-process run, and user errors as one ``error:`` line (exit 2) with config
fields written as the flags that set them. Importing it changes nothing in the process; each entry point sets its
process up in its own ``__main__`` (:mod:`experiments.startup`, :func:`cnnjax.cpu.process.configure`).

``python -m experiments.cli`` prints the process settings the entry points run with and what the CPU backend runs.
"""

from __future__ import annotations

import os
import re
import sys

from experiments.startup import EXIT_INTERRUPTED  # noqa: F401  (cli.EXIT_INTERRUPTED for the entry points)

# Names in backticks in library messages that are command-line flags of their own, not config fields.
TOP_LEVEL_FLAGS = ("workdir", "checkpoint", "data_dir", "split")


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
    than 0 print nothing on stdout at all (their errors still reach stderr). A multi-process CPU run compiles
    without JAX's persistent cache (:func:`cnnjax.compile_cache.leave_for_cluster`)."""
    from absl import flags

    from cnnjax import distributed

    f = flags.FLAGS
    spec = distributed.ClusterSpec(f.coordinator_address, f.num_processes, f.process_id, f.distributed_auto,
                                   f.heartbeat_timeout_s)
    multi = distributed.initialize(spec)
    if multi:
        _silence_native_stdout(keep_python=distributed.is_primary())
        from cnnjax import compile_cache

        compile_cache.leave_for_cluster()
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
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines (TFDS), if it loads
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


if __name__ == "__main__":  # python -m experiments.cli: the settings an entry point runs with
    from cnnjax.cpu import process
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)
    for name, value in process.settings().items():
        print(f"{name}={value}")
    from cnnjax import kernels

    print(f"kernels={kernels.describe()}")

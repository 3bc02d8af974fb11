"""What a program does on SIGTERM / Ctrl-C from its first line until a run installs its own handlers.

Each entry point calls :func:`begin` (or :func:`install` alone, where it runs no JAX) first thing in its
``__main__`` block, at the top of its module, before its other imports (absl, ml_collections). :func:`begin`
installs the handler before :func:`cnnjax.cpu.process.configure`, whose restart keeps the stop signals blocked
until the new image has this handler again. Importing this module installs nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

# Exit status of a run stopped by SIGTERM / Ctrl-C / --stop_after_steps after saving its checkpoint
# (EX_TEMPFAIL: not finished, run the same command again to resume). Errors exit 2, success 0.
EXIT_INTERRUPTED = 75


def stop_now(signum: int, state: str) -> None:
    """End the process at once: ``interrupted by signal N {state}; run the same command again`` on stderr and
    status 75. ``os._exit``, not an exception: an exception raised by a signal handler can land inside a library
    callback (and be swallowed) or tear down native threads (a segfault at exit)."""
    os.write(2, f"interrupted by signal {signum} {state}; run the same command again\n".encode())
    os._exit(EXIT_INTERRUPTED)


def interrupt_at_start(signum, frame) -> None:
    """The handler for a phase where nothing needs saving."""
    stop_now(signum, "before anything was saved")


def install(handler: Callable = interrupt_at_start) -> None:
    """SIGTERM and SIGINT end the process through ``handler`` (default :func:`interrupt_at_start`)."""
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def begin(configure_process: bool = True, compile_cache: bool = True) -> None:
    """An entry point's first step: :func:`install`, then, for a program that runs JAX,
    :func:`cnnjax.cpu.process.configure` (the XLA:CPU flag; one restart with tcmalloc and huge pages, off with
    ``CNNJAX_MALLOC=glibc``) and, with ``compile_cache``, JAX's persistent compilation cache
    (:mod:`cnnjax.compile_cache`; off with ``CNNJAX_COMPILATION_CACHE=0``). Benchmarks that time compilation
    pass ``compile_cache=False``."""
    install()
    if configure_process:
        from cnnjax.cpu import process

        process.configure()
        if compile_cache:
            from cnnjax import compile_cache as cache

            cache.enable()


def install_rows_saved(path: str) -> None:
    """From here on a stop says that the rows finished so far are in ``path``, a result file rewritten whole
    after each row (``"complete": false`` until the run ends): the benchmarks with ``--out``."""
    def interrupt_with_rows_saved(signum, frame) -> None:
        stop_now(signum, f'with the rows finished so far in {path} ("complete": false)')

    install(interrupt_with_rows_saved)

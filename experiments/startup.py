"""What an entry point does on SIGTERM / Ctrl-C from its first line until a run installs its own handlers.

``experiments/__init__.py`` installs this as soon as ``python -m experiments.NAME`` imports the package, before
NAME's own code is read and its imports (absl, ml_collections: a few hundred ms on a busy 2-core machine) run;
the huge-page restart of ``experiments.cli`` imports the package afresh, so the new image has it too.
"""

from __future__ import annotations

import os
import signal

# Exit status of a run stopped by SIGTERM / Ctrl-C / --stop_after_steps after saving its checkpoint
# (EX_TEMPFAIL: not finished, run the same command again to resume). Errors exit 2, success 0.
EXIT_INTERRUPTED = 75


def interrupt_at_start(signum, frame) -> None:
    """End the process at once, in a phase where nothing needs saving: one line on stderr and status 75.
    ``os._exit``, not an exception: an exception raised by a signal handler can land inside a library
    callback (and be swallowed) or tear down native threads (a segfault at exit)."""
    os.write(2, f"interrupted by signal {signum} before anything was saved; run the same command again\n".encode())
    os._exit(EXIT_INTERRUPTED)


def install() -> None:
    """SIGTERM and SIGINT end the process with one line and status 75 (:func:`interrupt_at_start`)."""
    signal.signal(signal.SIGTERM, interrupt_at_start)
    signal.signal(signal.SIGINT, interrupt_at_start)

"""Shared CLI plumbing: XLA flags for users, and bad input -> one ``error:`` line and exit code 2."""

from __future__ import annotations

import os
import sys

# Set before jax is imported by the entry points (see issue on CPU performance).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main) -> int:
    """``absl.app.run(main)`` with user errors reported on one line instead of a traceback."""
    from absl import app

    from cnnjax.train.loop import TrainingError

    try:
        app.run(main)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except (ValueError, FileNotFoundError, KeyError, TrainingError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

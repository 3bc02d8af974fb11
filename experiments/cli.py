"""Shared CLI plumbing: XLA flags for users, and bad input -> one ``error:`` line and exit code 2."""

from __future__ import annotations

import os
import sys

# Set before jax is imported by the entry points (see issue on CPU performance).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (an unknown config key raises AttributeError there)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        key = str(err).strip("\"'")
        message = f"unknown config key {key!r}; see experiments/configs/base.py for the keys"
    except (flags.Error, ValueError, TypeError) as err:
        message = str(err).splitlines()[0]
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(main) -> int:
    """``absl.app.run(main)`` with user errors reported on one line instead of a traceback."""
    from absl import app, logging

    from cnnjax.train.loop import TrainingError

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
    except (ValueError, FileNotFoundError, KeyError, TrainingError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

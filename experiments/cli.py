"""Shared CLI plumbing: XLA flags for users, and bad input -> one ``error:`` line and exit code 2."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA:CPU flag measured on jaxlib 0.10.2 (2 cores): ImprovedCNN train step 276 -> 487 img/s
# (`python -m experiments.bench_cpu`, columns baseline -> +ynn flag). Set before jax is imported, only for
# the jaxlib line it was measured on (an unknown XLA flag aborts the process), and never over a user's own.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _add_cpu_xla_flag() -> None:
    from importlib import metadata

    try:
        major_minor = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if major_minor == (0, 10) and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_add_cpu_xla_flag()


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

"""Command-line entry points, run from the repository root as ``python -m experiments.NAME``."""

import sys

# `python -m experiments.NAME` imports this package before it reads NAME (CPython's argv[0] is '-m' until then):
# from here on a signal is one line and status 75, not a KeyboardInterrupt traceback (experiments.startup).
if sys.argv[:1] == ["-m"]:
    from experiments import startup

    startup.install()

"""Command-line entry points, run from the repository root as ``python -m experiments.NAME``; benchmarks and
profiling as ``python -m experiments.bench.NAME``. Importing any of them changes nothing in the process: each
program sets up its process in its own ``__main__`` (:mod:`experiments.startup`, :mod:`cnnjax.cpu.process`)."""

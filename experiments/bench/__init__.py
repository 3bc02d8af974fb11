"""Benchmarks and profiling: ``python -m experiments.bench.NAME``; the PyTorch twins of the zoo
(:mod:`experiments.bench.torch_twins`), which the parity tests import too."""

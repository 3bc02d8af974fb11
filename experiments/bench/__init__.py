"""Benchmarks and profiling, each ``python -m experiments.bench.NAME`` (results: experiments/bench/RESULTS.md).

* ``cpu``: the CPU table, train-step images/s with the CPU backend, on plain XLA and in PyTorch eager;
* ``throughput``: the table on any device (the GPU table), against PyTorch eager and ``torch.compile``;
* ``convs``: each conv and max-pool of the bench models alone, CPU backend against plain XLA and PyTorch;
* ``profile``: where a train step spends its time, op by op, cnnjax and PyTorch side by side;
* ``speedrun`` (with ``speedrun_torch``, the twin's run): a speed-run config end to end against its PyTorch twin;
* ``recipe``: the fast recipe's epoch time against the same per-step work in PyTorch.

:mod:`experiments.bench.lib` holds what they share; :mod:`experiments.bench.torch_twins` the PyTorch twins of the
zoo, which the parity tests import too. Importing any of these modules changes nothing in the process.
"""

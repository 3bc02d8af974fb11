"""Joining JAX's multi-controller runtime: one process per host (or per local accelerator group).

Every process runs the same program. ``initialize`` connects it to the coordinator
(``jax.distributed.initialize``); afterwards ``jax.devices()`` lists the devices of all processes
and ``jax.local_devices()`` this process's own. On the CPU, cross-process collectives use gloo.

Devices: a process uses the devices it sees. ``experiments.launch`` gives each child its own GPUs through
``CUDA_VISIBLE_DEVICES`` (the child sees them as local devices 0..K-1, which JAX uses by default) and also sets
``JAX_LOCAL_DEVICE_IDS=0,...,K-1``, which ``jax.distributed.initialize`` reads itself: without it, where the
launcher runs as a Slurm or Open MPI task (its environment inherited by the children), JAX's cluster detection
would narrow every child to the one GPU numbered by the launcher's local rank. ``initialize`` passes no
``local_device_ids``; under ``auto`` JAX picks them (one GPU per Slurm / Open MPI task).

A process that dies stops sending heartbeats; after ``heartbeat_timeout_s`` the coordination
service fails every other process (they exit non-zero instead of waiting forever in a collective).
"""

from __future__ import annotations

import dataclasses
import os

from cnnjax.errors import UsageError

# jax and numpy are imported by the functions that use them: the launcher and the entry points' flag definitions
# read this module's names without starting jax.

# Environment variables that `experiments.launch` sets for each child, by JAX's own names (jax.distributed reads
# JAX_COORDINATOR_ADDRESS itself); the CLIs read them as defaults of their --coordinator_address / --num_processes /
# --process_id flags.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Which of the devices this process sees are its own, as "0,1,...": `experiments.launch` sets it for each child
# that it gives GPUs through CUDA_VISIBLE_DEVICES; jax.distributed.initialize reads it itself (jax 0.10.2, 0.12.1;
# tests/test_distributed.py checks the installed jax).
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How to join a run. ``auto``: let JAX detect the cluster (SLURM, TPU pods, Kubernetes);
    otherwise all three of ``coordinator_address`` (host:port of process 0), ``num_processes`` and
    ``process_id`` are given; nothing set at all means a single process."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    auto: bool = False
    heartbeat_timeout_s: int = 30
    initialization_timeout_s: int = 120

    @property
    def explicit(self) -> bool:
        return bool(self.coordinator_address) or self.num_processes > 0 or self.process_id >= 0

    def validate(self) -> None:
        if self.auto and self.explicit:
            raise UsageError("pass either auto-detection or coordinator_address / num_processes / process_id, "
                             "not both")
        if self.explicit:
            if not (self.coordinator_address and self.num_processes > 0 and self.process_id >= 0):
                raise UsageError("a multi-process run needs all of coordinator_address (host:port), num_processes "
                                 "and process_id")
            if self.process_id >= self.num_processes:
                raise UsageError(f"process_id {self.process_id} must be below num_processes {self.num_processes}")
        if self.heartbeat_timeout_s < 1:
            raise UsageError("heartbeat_timeout_s must be >= 1")


def spec_from_env(**overrides) -> ClusterSpec:
    """A :class:`ClusterSpec` from the launcher's environment variables, then ``overrides``."""
    env = {}
    if os.environ.get(ENV_COORDINATOR):
        env = {"coordinator_address": os.environ[ENV_COORDINATOR],
               "num_processes": int(os.environ.get(ENV_NUM_PROCESSES, "0")),
               "process_id": int(os.environ.get(ENV_PROCESS_ID, "-1"))}
    return ClusterSpec(**(env | overrides))


def initialize(spec: ClusterSpec) -> bool:
    """Join the run described by ``spec``; return whether this is a multi-process run.

    Must be called before anything touches a device. A single process (nothing set) is a no-op.
    """
    import jax

    spec.validate()
    if not (spec.auto or spec.explicit):
        return False
    # Cross-process collectives between CPU devices (tests, CPU clusters); accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"heartbeat_timeout_seconds": spec.heartbeat_timeout_s,
              "initialization_timeout": spec.initialization_timeout_s}
    if spec.explicit:
        kwargs |= {"coordinator_address": spec.coordinator_address, "num_processes": spec.num_processes,
                   "process_id": spec.process_id}
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0 writes the metrics, config.json, plots and progress output."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Return on each process once every process has called ``barrier(name)`` (a no-op in one process)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective: every process must call it)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([bool(flag)]))).any())


def mean_over_processes(value: float) -> float:
    """The mean of a per-process number over all processes (a collective; ``value`` itself for one
    process), for decisions every process must take alike, such as a time budget's plan."""
    import jax
    import numpy as np

    return float(sum_over_processes(np.array([value], np.float64))[0]) / jax.process_count()


def sum_over_processes(tree):
    """Element-wise sum of a numpy tree over all processes (a collective; identity for one process)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(tree)  # each leaf gains a leading process axis
    return jax.tree_util.tree_map(lambda x: np.asarray(x).sum(axis=0), gathered)

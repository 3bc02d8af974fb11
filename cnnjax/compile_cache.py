"""JAX's persistent compilation cache for the experiments' programs.

A program compiled once (a train chunk, an evaluation, an init) is written to a cache directory and loaded,
instead of compiled, by the next process that needs the same program on the same kind of device with the same
jax / jaxlib. The entry points (:func:`experiments.startup.begin`) turn it on; nothing here runs on import.

``CNNJAX_COMPILATION_CACHE``: unset or empty, the cache lives in ``$XDG_CACHE_HOME/cnnjax/jax-compilation``
(``~/.cache/...``); a path puts it there; ``0`` (or ``off``) turns it off. Programs that compile in under
:data:`MIN_COMPILE_S` seconds are not written (they would cost more to look up than to compile).
``python -m experiments.bench.accelerator_check compile_cache`` measures a second run against the first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "CNNJAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
MIN_COMPILE_S = 0.1


def cache_dir(env: Mapping[str, str] = os.environ) -> str | None:
    """The cache directory ``env`` asks for (see the module docstring), or None when it turns the cache off."""
    value = env.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnnjax", "jax-compilation")


def enable(env: Mapping[str, str] = os.environ) -> str | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (created if missing); returns the directory,
    or None when the cache is off or the directory cannot be created (then JAX compiles as without a cache)."""
    import jax

    path = cache_dir(env)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# jax releases from this one on: a multi-process CPU run compiles without the cache (see leave_for_cluster).
CLUSTER_CPU_UNCACHED_FROM = (0, 11)


def leave_for_cluster() -> bool:
    """In a multi-process run on CPUs with jax >= :data:`CLUSTER_CPU_UNCACHED_FROM`, turn the cache off (before
    anything is compiled); returns whether it did. With jax 0.12.1 a CPU program with cross-process collectives
    loaded from the cache never completes its first collective (the two-process test in
    tests/test_compile_cache.py hangs without this); jax 0.10.2 runs it, and 0.11 is not measured. Accelerator
    runs keep the cache (JAX writes it from process 0 and every process reads it)."""
    import jax

    version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    if version < CLUSTER_CPU_UNCACHED_FROM or jax.process_count() == 1 or jax.devices()[0].platform != "cpu":
        return False
    jax.config.update("jax_compilation_cache_dir", None)
    return True


# JAX's monitoring events (seconds) that make up a program's way to the device, in the order they happen.
STAGES = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "xla_compile": "/jax/core/compile/backend_compile_duration",
          "cache_load": "/jax/compilation_cache/cache_retrieval_time_sec",
          "saved": "/jax/compilation_cache/compile_time_saved_sec"}


def record_stages() -> dict[str, float]:
    """From now on, add the seconds of each of :data:`STAGES` (every program of this process) to the dict returned.
    Registers a JAX monitoring listener for the rest of the process (``experiments.train --compile_stats``)."""
    import jax

    totals = dict.fromkeys(STAGES, 0.0)
    names = {event: stage for stage, event in STAGES.items()}

    def listen(event: str, seconds: float, **_) -> None:
        if event in names:
            totals[names[event]] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return totals


def describe_stages(totals: dict[str, float]) -> str:
    """One line: ``compilation: trace T s, lower L s, XLA compile C s, cache load R s (saved S s)``."""
    return (f"compilation: trace {totals['trace']:.2f} s, lower {totals['lower']:.2f} s, XLA compile "
            f"{totals['xla_compile']:.2f} s, cache load {totals['cache_load']:.2f} s (saved {totals['saved']:.2f} s)")

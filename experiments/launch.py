"""Start a multi-process run on one machine: ``python -m experiments.launch --num_processes=N -- COMMAND ...``.

Starts N copies of COMMAND (e.g. ``python -m experiments.train --config ... --workdir ...``), each told
through its environment (JAX's names: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) to join a coordinator on 127.0.0.1 and a free port. Their output lines are
prefixed ``[p0]``, ``[p1]``, ... . SIGTERM / SIGINT to the launcher are passed to every child (a
training run checkpoints and stops). When a child fails, the others are stopped by their process ids
(SIGTERM, then SIGKILL after ``--grace_s``) and the launcher exits with the failing child's status
(128 + signal number for a signal); a child that exits 75 (stopped with a checkpoint) gives the others
``--grace_s`` to stop on their own first, and the launcher exits 75.

Devices per process (``--devices_per_process=K``):

* **NVIDIA GPUs.** The host's GPUs are the inherited ``CUDA_VISIBLE_DEVICES`` list if it is set (entries up to
  the first empty or negative one, as CUDA reads it; an empty value means none), else the GPUs ``nvidia-smi -L``
  lists; none when ``JAX_PLATFORMS`` is set and names neither ``cuda`` nor ``gpu``. Process r gets GPUs
  ``[r*K, (r+1)*K)`` of that list as its ``CUDA_VISIBLE_DEVICES`` (a subdivision of an inherited list, never a
  replacement) and sees them as its local devices 0..K-1; ``JAX_LOCAL_DEVICE_IDS=0,...,K-1`` says so to
  ``jax.distributed`` (see :mod:`cnnjax.distributed`). The default K is 1: one process per GPU, each
  preallocating memory on its own GPU only. ``--num_processes=auto`` starts GPUs / K processes;
  ``--devices_per_process=0 --num_processes=auto`` is one process with all the host's GPUs. N * K more than the
  host's GPUs is refused; fewer leaves the rest idle. K = 0 with N > 1 makes every process see (and preallocate
  memory on) every GPU: the launcher says so on stderr.
* **No GPU** (or ``JAX_PLATFORMS=cpu``): K > 0 gives each process K CPU devices, through
  ``--xla_force_host_platform_device_count=K`` in its ``XLA_FLAGS`` (any inherited value of that flag
  replaced, the other flags kept). The default K is 0: the children inherit ``XLA_FLAGS`` as they are.
  ``--num_processes=auto`` is refused: give a number.

Device assignment is for NVIDIA GPUs (CUDA) only: the launcher sets no TPU or ROCm variables (on a TPU host,
keep the default K = 0, or use the entry points' ``--distributed_auto`` on a pod).
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first step below comes before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.install()

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from cnnjax.distributed import ENV_COORDINATOR, ENV_LOCAL_DEVICE_IDS, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from cnnjax.errors import UsageError

INTERRUPTED = 75  # experiments.train's status for a run stopped with a checkpoint (see experiments/cli.py)
ENV_CUDA_DEVICES = "CUDA_VISIBLE_DEVICES"
HOST_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
NVIDIA_SMI_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_cuda_devices(value: str) -> list[str]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value makes visible, as its entries (indices or ``GPU-``/``MIG-``
    UUIDs), in order: CUDA stops at the first empty or negative entry, so ``""`` and ``"-1"`` are no GPUs."""
    gpus = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def count_nvidia_gpus() -> int:
    """How many GPUs ``nvidia-smi -L`` lists (lines ``GPU i: ...``; MIG lines not counted); 0 when there is
    no ``nvidia-smi``, it fails, or it takes more than ``NVIDIA_SMI_TIMEOUT_S``."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def host_gpus(env: Mapping[str, str]) -> list[str]:
    """This host's NVIDIA GPUs as ``CUDA_VISIBLE_DEVICES`` entries, found without importing JAX: ``[]`` when
    ``env`` sets ``JAX_PLATFORMS`` without ``cuda`` or ``gpu`` in it (JAX will not use them), else the inherited
    ``CUDA_VISIBLE_DEVICES`` list if ``env`` sets it, else ``["0", ..., "n-1"]`` for the n GPUs of
    :func:`count_nvidia_gpus` (``[]`` on a host without NVIDIA GPUs)."""
    platforms = env.get("JAX_PLATFORMS", "").lower().replace(" ", "").split(",")
    if platforms != [""] and not {"cuda", "gpu"} & set(platforms):
        return []
    if ENV_CUDA_DEVICES in env:
        return parse_cuda_devices(env[ENV_CUDA_DEVICES])
    return [str(i) for i in range(count_nvidia_gpus())]


def plan(num_processes: str, devices_per_process: int | None, gpus: Sequence[str]) -> tuple[int, int]:
    """``(N, K)``: the number of processes and the devices per process (0: each inherits all) from the flags'
    values (``num_processes`` a number or ``"auto"``, ``devices_per_process`` None for the default) and the
    host's GPUs. Defaults: K = 1 with GPUs, else 0; ``auto`` = GPUs / K (1 when K = 0). Raises
    :class:`UsageError` (one line naming the flag to change) for values that cannot work."""
    k = devices_per_process if devices_per_process is not None else (1 if gpus else 0)
    if k < 0:
        raise UsageError(f"--devices_per_process={k} must be >= 0 (0: every process sees all devices)")
    if num_processes == "auto":
        if not gpus:
            raise UsageError("--num_processes=auto counts GPUs and this host has none (per nvidia-smi and "
                             "CUDA_VISIBLE_DEVICES): give a number, e.g. --num_processes=2")
        if k and len(gpus) % k:
            raise UsageError(f"--num_processes=auto: the host's {len(gpus)} GPUs are not a multiple of "
                             f"--devices_per_process={k}; pass a K that divides {len(gpus)}, or a number of processes")
        n = len(gpus) // k if k else 1
    else:
        try:
            n = int(num_processes)
        except ValueError:
            raise UsageError(f"--num_processes={num_processes} must be a number or auto") from None
        if n < 1:
            raise UsageError("--num_processes must be >= 1")
    if gpus and n * k > len(gpus):
        raise UsageError(f"--num_processes={n} x --devices_per_process={k} needs {n * k} GPUs and this host has "
                         f"{len(gpus)}: lower --num_processes or --devices_per_process")
    return n, k


def with_host_device_count(xla_flags: str, count: int) -> str:
    """``xla_flags`` (whitespace-separated ``XLA_FLAGS``) with ``--xla_force_host_platform_device_count=count``
    in place of any value of that flag it had, after the other flags in their order."""
    kept = [f for f in xla_flags.split() if f.split("=", 1)[0] != HOST_DEVICE_COUNT_FLAG]
    return " ".join([*kept, f"{HOST_DEVICE_COUNT_FLAG}={count}"])


def child_env(rank: int, num_processes: int, devices_per_process: int, base_env: Mapping[str, str],
              gpus: Sequence[str], coordinator: str = "127.0.0.1:0") -> dict[str, str]:
    """The environment of process ``rank`` of ``num_processes``: a copy of ``base_env`` (left unchanged) with
    JAX's coordinator, process count and process id, and its devices for ``devices_per_process`` = K:
    with ``gpus`` (the host's, from :func:`host_gpus`) and K > 0, ``CUDA_VISIBLE_DEVICES`` = ``gpus[rank*K :
    (rank+1)*K]`` and ``JAX_LOCAL_DEVICE_IDS`` = ``0,...,K-1``; without GPUs and K > 0, ``XLA_FLAGS`` with K host
    devices (:func:`with_host_device_count`); K = 0 leaves the devices as inherited. Expects :func:`plan`'s
    values (``num_processes * K <= len(gpus)`` when there are GPUs)."""
    env = dict(base_env)
    env |= {ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(rank)}
    k = devices_per_process
    if k and gpus:
        own = gpus[rank * k:(rank + 1) * k]
        if len(own) != k:
            raise UsageError(f"--num_processes={num_processes} x --devices_per_process={k} needs "
                             f"{num_processes * k} GPUs and this host has {len(gpus)}")
        env[ENV_CUDA_DEVICES] = ",".join(own)
        env[ENV_LOCAL_DEVICE_IDS] = ",".join(str(i) for i in range(k))
    elif k:
        env["XLA_FLAGS"] = with_host_device_count(base_env.get("XLA_FLAGS", ""), k)
    return env


def describe_devices(env: Mapping[str, str], devices_per_process: int, gpus: Sequence[str]) -> str:
    """What a child's devices are, for the launcher's ``pid`` line."""
    if not devices_per_process:
        return "devices as inherited"
    if gpus:
        return f"{ENV_CUDA_DEVICES}={env[ENV_CUDA_DEVICES]}"
    return f"{devices_per_process} CPU devices"


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
        out.flush()
    stream.close()


def exit_status(returncode: int) -> int:
    """A child's ``Popen.returncode`` as a shell exit status (``-9`` -> 137)."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    """Children of one command, one per environment (process ``rank`` gets ``envs[rank]``), their output
    pumps, and a way to stop them all. ``notes[rank]`` is added to the ``[launch] p{rank}: pid P`` line."""

    def __init__(self, command: list[str], envs: Sequence[Mapping[str, str]], notes: Sequence[str] = ()):
        self.children: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for rank, env in enumerate(envs):
            child = subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
            self.children.append(child)
            note = f", {notes[rank]}" if rank < len(notes) else ""
            print(f"[launch] p{rank}: pid {child.pid}{note}", file=sys.stderr, flush=True)
            for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                pump = threading.Thread(target=_pump, args=(stream, out, f"[p{rank}]"), daemon=True)
                pump.start()
                self.pumps.append(pump)

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                os.kill(child.pid, signum)

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM every running child, SIGKILL those still running after ``grace_s``."""
        self.signal_all(signal.SIGTERM)
        self._wait_all(grace_s)
        self.signal_all(signal.SIGKILL)
        for child in self.children:
            child.wait()

    def _wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(c.poll() is None for c in self.children):
            time.sleep(0.05)

    def wait(self, grace_s: float) -> int:
        """Exit status of the run: 0 if every child succeeded, else the first failure's."""
        while True:
            codes = [c.poll() for c in self.children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                if failed[0] == INTERRUPTED:  # a checkpointed stop: the others are stopping at the same step
                    self._wait_all(grace_s)
                else:
                    print(f"[launch] a process exited with status {exit_status(failed[0])}; stopping the others",
                          file=sys.stderr, flush=True)
                self.stop_all(grace_s)
                status = exit_status(failed[0])
                break
            if all(code == 0 for code in codes):
                status = 0
                break
            time.sleep(0.05)
        for pump in self.pumps:
            pump.join(timeout=5)
        return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", required=True,
                        help="how many copies of COMMAND to start; auto: one per --devices_per_process GPUs")
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="GPUs (or, without GPUs, CPU devices) per process; 0: each sees all devices as "
                             "inherited (default: 1 on a GPU host, else 0)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--grace_s", type=float, default=20.0,
                        help="after a failure, seconds the others get to stop before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m experiments.train --config ... --workdir ...")
    gpus = host_gpus(os.environ)
    try:
        n, k = plan(args.num_processes, args.devices_per_process, gpus)
    except UsageError as err:
        parser.error(str(err))
    if gpus and not k and n > 1:
        print(f"[launch] --devices_per_process=0: all {n} processes see all {len(gpus)} GPUs and share them",
              file=sys.stderr, flush=True)
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    envs = [child_env(rank, n, k, os.environ, gpus, coordinator) for rank in range(n)]
    launcher = Launcher(command, envs, [describe_devices(env, k, gpus) for env in envs])
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: launcher.signal_all(s))
    return launcher.wait(args.grace_s)


if __name__ == "__main__":
    sys.exit(main())

"""Start a multi-process run on one machine: ``python -m experiments.launch --num_processes=N -- COMMAND ...``.

Starts N copies of COMMAND (e.g. ``python -m experiments.train --config ... --workdir ...``), each told
through its environment (JAX's names: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) to join a coordinator on 127.0.0.1 and a free port. Their output lines are
prefixed ``[p0]``, ``[p1]``, ... . SIGTERM / SIGINT to the launcher are passed to every child (a
training run checkpoints and stops). When a child fails, the others are stopped by their process ids
(SIGTERM, then SIGKILL after ``--grace_s``) and the launcher exits with the failing child's status
(128 + signal number for a signal); a child that exits 75 (stopped with a checkpoint) gives the others
``--grace_s`` to stop on their own first, and the launcher exits 75. Devices per process on the CPU follow the inherited
``XLA_FLAGS=--xla_force_host_platform_device_count=K``.
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

from cnnjax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

INTERRUPTED = 75  # experiments.train's status for a run stopped with a checkpoint (see experiments/cli.py)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
        out.flush()
    stream.close()


def exit_status(returncode: int) -> int:
    """A child's ``Popen.returncode`` as a shell exit status (``-9`` -> 137)."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    """N children of one command, their output pumps, and a way to stop them all."""

    def __init__(self, command: list[str], num_processes: int, port: int):
        self.children: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for rank in range(num_processes):
            env = dict(os.environ, **{ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                                      ENV_PROCESS_ID: str(rank)})
            child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1)
            self.children.append(child)
            print(f"[launch] p{rank}: pid {child.pid}", file=sys.stderr, flush=True)
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
    parser.add_argument("--num_processes", type=int, required=True, help="how many copies of COMMAND to start")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--grace_s", type=float, default=20.0,
                        help="after a failure, seconds the others get to stop before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m experiments.train --config ... --workdir ...")
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    launcher = Launcher(command, args.num_processes, args.port or free_port())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: launcher.signal_all(s))
    return launcher.wait(args.grace_s)


if __name__ == "__main__":
    sys.exit(main())

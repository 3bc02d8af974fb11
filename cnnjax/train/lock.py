"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/.lock`` held for the whole run.

The operating system drops the lock when the holding process exits, however it exits (kill -9
included), so a stale lock never blocks a relaunch. In a multi-process run only process 0 takes it.
"""

from __future__ import annotations

import fcntl
import os

from cnnjax.errors import TrainingError

LOCK_NAME = ".lock"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` — raises :class:`TrainingError` if another run holds it."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path, self.enabled, self._fd, self._created = os.path.join(workdir, LOCK_NAME), enabled, None, False

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        workdir = os.path.dirname(self.path) or "."
        self._created = not os.path.exists(workdir)
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TrainingError(f"workdir {os.path.dirname(self.path)} is in use by another run (pid {holder}); wait "
                                "for it to finish or use another `workdir`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def remove_if_unused(self) -> None:
        """Remove the workdir if this run created it and wrote nothing but the lock into it."""
        workdir = os.path.dirname(self.path) or "."
        if self._fd is not None and self._created and os.listdir(workdir) == [LOCK_NAME]:
            os.unlink(self.path)
            os.rmdir(workdir)
            self._created = False  # removed once: the lock's exit must not try again

    def __exit__(self, exc_type, *exc) -> None:
        if self._fd is None:
            return
        if exc_type is not None:
            self.remove_if_unused()  # a run refused before writing anything leaves no empty workdir behind
        os.close(self._fd)  # closing releases the lock
        self._fd = None

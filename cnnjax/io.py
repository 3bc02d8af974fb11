"""Atomic file writes: a file is either its old content or its complete new content, never half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from typing import IO, Any

from cnnjax.errors import CorruptFileError, MissingFileError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` 'w' or 'wb'); on a clean exit it is
    flushed, fsynced and renamed over ``path``; on any exception it is removed and ``path`` is untouched.

    The temporary file is created with mode 0o666 so the umask decides the final permissions.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON at ``path``, atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON document at ``path``; a file that is not JSON (torn, edited, binary) raises
    :class:`cnnjax.errors.CorruptFileError` naming it and ``fix`` (what the user should do)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise CorruptFileError(f"{os.fspath(path)} is damaged (not JSON: {str(err).splitlines()[0][:80]}); {fix}") \
            from None


def check_readable_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise :class:`cnnjax.errors.MissingFileError` if ``path`` exists but cannot be listed (permissions),
    naming ``flag`` (e.g. ``data.dir``); a missing path is left to the caller, which knows what belongs there."""
    try:
        os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError as err:
        raise MissingFileError(f"cannot read {os.fspath(path)} given as `{flag}` ({err.strerror}); make it readable "
                               "by this user (chmod / chown) or copy the data elsewhere") from None


# errno values that mean "the file system will not take this write" (not a bug), with what the user can do.
_FS_FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "use a writable directory",
             errno.EACCES: "fix its permissions", errno.EPERM: "fix its permissions"}


def fs_condition(err: BaseException) -> tuple[str, str] | None:
    """``(strerror, fix)`` for a full / read-only / forbidden file system found in ``err`` or its chain (as an
    ``OSError`` or as tensorstore's ``[os_error_code='28']``); None for anything else."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = err.errno if isinstance(err, OSError) else None
        if code is None:
            match = re.search(r"os_error_code='(\d+)'", str(err))
            code = int(match.group(1)) if match else None
        if code in _FS_FIXES:
            return os.strerror(code), _FS_FIXES[code]
        err = err.__cause__ or err.__context__
    return None

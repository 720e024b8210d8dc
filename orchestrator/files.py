"""File I/O every part shares: a write that readers never see torn, and a lock that a killed
holder cannot leave behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import ConflictError
from orchestrator.waits import Deadline, wait_for


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(
    path: Path, what: str, *, timeout: float | None = None, hint: str | None = None
) -> Iterator[None]:
    """flock a file. The kernel drops the lock when its holder dies, even by SIGKILL, so a killed
    command never leaves anything locked. Without a timeout a held lock is an error at once;
    with one, the wait is bounded and says what it waited for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:

        def attempt() -> bool | None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return None
            return True

        if attempt() is None:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            if timeout is None:
                raise ConflictError(
                    f"{what} is busy: pid {holder} is working on it",
                    hint or "wait for that command to finish, or stop it, then try again",
                )
            wait_for(attempt, Deadline(timeout, f"{what} (held by pid {holder})", hint))
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)

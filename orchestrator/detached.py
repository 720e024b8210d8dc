"""The host's own helper processes that outlive the CLI (the sinkhole, the wildcard resolver):
`python -m MODULE`, started in a session of their own by `up`, their pids kept in the sandbox's
state and stopped by `destroy` (found by their command lines too: hostprocs.py). A pid from an old
state file may be another process by now, so one is only ever signalled when its command line
runs that module."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.errors import SandboxError
from orchestrator.waits import Deadline, wait_for


def runs_module(pid: int, module: str) -> bool:
    """Whether process `pid` is `python -m module` (its argv names the module)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return module.encode() in argv


def stop(pid: int, module: str, what: str, *, timeout: float = 5.0) -> bool:
    """SIGTERM to `pid` if it runs `module`, SIGKILL if it has not gone within `timeout`;
    False if it was gone already. `what` names it in the wait."""
    return terminate(pid, lambda: runs_module(pid, module), what, timeout=timeout)


def terminate(pid: int, meant: Callable[[], bool], what: str, *, timeout: float) -> bool:
    """SIGTERM to `pid` while `meant()` says it is still the process meant (not gone, not a
    reused pid), SIGKILL if it is within `timeout`; False if it was gone already."""
    if not meant():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool | None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return True if not meant() else None

    try:
        wait_for(gone, Deadline(timeout, f"{what} (pid {pid}) to stop"), interval=0.05)
    except SandboxError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def start(
    module: str,
    args: Sequence[str],
    *,
    pass_fds: Sequence[int],
    errors_file: Path,
    ready: str,
    what: str,
    error: type[SandboxError],
    timeout: float,
) -> int:
    """Start `python -m module ARGS` in a session of its own (it outlives `up`), its stderr in
    `errors_file` (written anew), and return its pid once that file says `ready`. If it exits
    first, or the wait ends, it is stopped and `error` says why."""
    with errors_file.open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )

    def serving() -> bool | None:
        text = errors_file.read_text(errors="replace")
        if proc.poll() is not None:
            raise error(
                f"{what} stopped at once: {text.strip()[-300:] or proc.returncode}",
                f"see {errors_file}",
            )
        return True if ready in text else None

    try:
        wait_for(serving, Deadline(timeout, f"{what} to serve"), interval=0.05)
    except BaseException:
        stop(proc.pid, module, what)
        raise
    return proc.pid

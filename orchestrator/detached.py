"""The host's own helper processes that outlive the CLI (the sinkhole, the wildcard resolver):
`python -m MODULE`, started in a session of their own by `up`, their pids kept in the sandbox's
state and stopped by `destroy`. A pid from an old state file may be another process by now, so
one is only ever signalled when its command line runs that module."""

from __future__ import annotations

import contextlib
import os
import signal
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
    if not runs_module(pid, module):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool | None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return True if not runs_module(pid, module) else None

    try:
        wait_for(gone, Deadline(timeout, f"{what} (pid {pid}) to stop"), interval=0.05)
    except SandboxError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True

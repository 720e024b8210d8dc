"""`sandbox run --rm`: a sandbox made for one run and destroyed after it (like `docker run
--rm`), warm when a warm VM is there. Its logs stay under its generated name."""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from orchestrator.egress.policy import EgressPolicy
from orchestrator.lifecycle import build, teardown
from orchestrator.lifecycle.access import RunOutcome, run_target
from orchestrator.lifecycle.context import Context
from orchestrator.run import target as runs
from orchestrator.run import xdebug

# One-shot sandboxes are named run-XXXXXX: `sandbox logs --name run-XXXXXX` finds their logs.
NAME_PREFIX = "run-"


@dataclass(frozen=True)
class OneShotOutcome:
    name: str
    outcome: RunOutcome | None  # None: the sandbox could not be made (the error was raised)
    destroyed: teardown.DestroyReport


def new_name(ctx: Context) -> str:
    existing = set(ctx.store.names())
    while True:
        name = NAME_PREFIX + secrets.token_hex(3)
        if name not in existing:
            return name


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ctrl-C while the sandbox is being destroyed would leave it behind: the first Ctrl-C
    stopped the run; destroying takes a second or two and ignores further ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_once(
    ctx: Context,
    request: runs.RunRequest,
    *,
    policy: EgressPolicy,
    image: str | None = None,
    capture: bool = False,
    xdebug_mode: xdebug.XdebugMode = xdebug.XdebugMode.TRACE,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    on_warning: Callable[[str], None],
    on_ready: Callable[[str], None] = lambda name: None,
) -> OneShotOutcome:
    """Up, run, collect, destroy: whatever happened (a failed run, a failed `up`, Ctrl-C), the
    sandbox is paused and being removed when this returns or raises, and its logs are kept.
    `capture`: `up --pcap` (the packet capture is kept with the logs, like the records)."""
    runs.plan(request)  # refuse bad local files before anything boots
    name = new_name(ctx)
    outcome: RunOutcome | None = None
    try:
        build.up(ctx, name, image=image, policy=policy, capture=capture, xdebug_mode=xdebug_mode)
        on_ready(name)
        # No collection after the run: destroy's final one, right after, holds nothing back
        # and brings every record home in one go.
        outcome = run_target(
            ctx, name, request, stdout=stdout, stderr=stderr, on_warning=on_warning, collect=False
        )
    finally:
        with _uninterruptible():
            # Detached like the CLI's destroy: the records are home when it returns, the VM is
            # paused, and a child of its own session removes the rest (a later destroy or up
            # of the name finishes it if that child is killed).
            destroyed = teardown.destroy(ctx, name, detach=True)
    return OneShotOutcome(name=name, outcome=outcome, destroyed=destroyed)

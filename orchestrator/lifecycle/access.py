"""Into a running sandbox: `exec`, `run` (with collections while it runs), `ssh`, sockets."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import paths
from orchestrator.capture import logview, monitor
from orchestrator.errors import GuestError, UsageError
from orchestrator.lifecycle.collection import CollectReport, collect_quietly
from orchestrator.lifecycle.context import (
    Context,
    expected_rules,
    logs_dir,
    open_guest,
    ready_state,
    runnable_state,
)
from orchestrator.run import target as runs
from orchestrator.run import xdebug
from orchestrator.state import SandboxState

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    from orchestrator.vm.guest import Guest


def exec_command(
    ctx: Context,
    name: str,
    argv: Sequence[str],
    *,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    timeout: float | None = None,
    on_warning: Callable[[str], None],
) -> int:
    """Run a command in the guest as root, then bring its connection records home over the same
    SSH connection. A failed collection is a warning: it must not change the exit code."""
    if not argv:
        raise UsageError("no command given", "usage: sandbox exec -- CMD [ARGS...]")
    with open_guest(ctx, name) as guest:
        with collecting_meanwhile(ctx, name, on_warning, guest):
            code = guest.run(list(argv), stdout=stdout, stderr=stderr, timeout=timeout)
        collect_quietly(ctx, name, on_warning, guest=guest)
    return code


@contextlib.contextmanager
def collecting_meanwhile(
    ctx: Context, name: str, on_warning: Callable[[str], None], guest: Guest
) -> Iterator[None]:
    """Collections every `collect_every` seconds while the body runs, each on a channel of its
    own on the same SSH connection: a long run's records reach the host as it goes, and they
    never pile up past what the guest's capture buffer holds. The body's own end
    waits for a collection under way (they take turns with every other one on the lock)."""
    every = ctx.settings.collect_every
    if every <= 0:
        yield
        return
    stop = threading.Event()

    def collect_until_stopped() -> None:
        while not stop.wait(every):
            collect_quietly(ctx, name, on_warning, guest=guest)

    thread = threading.Thread(target=collect_until_stopped, name=f"collect {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(monitor.COLLECT_TIMEOUT)


@dataclass(frozen=True)
class RunOutcome:
    result: runs.RunResult
    collected: CollectReport | None  # None when it failed (a warning said why)


def run_target(
    ctx: Context,
    name: str,
    request: runs.RunRequest,
    *,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    on_warning: Callable[[str], None],
    collect: bool = True,
) -> RunOutcome:
    """`sandbox run`: the target software in the guest, then its records brought home and tied
    to it. Local files are checked before anything is sent to the guest. `collect=False`: the
    caller destroys the sandbox next, whose final collection brings everything home at once
    (without waiting out the settle window first)."""
    runs.plan(request)
    state = runnable_state(ctx, name)
    with open_guest(ctx, name) as guest:
        return _execute_and_collect(
            ctx, state, guest, request, stdout, stderr, on_warning, collect=collect
        )


def _execute_and_collect(
    ctx: Context,
    state: SandboxState,
    guest: Guest,
    request: runs.RunRequest,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    on_warning: Callable[[str], None],
    *,
    collect: bool = True,
) -> RunOutcome:
    name = state.name
    with collecting_meanwhile(ctx, name, on_warning, guest):
        result = runs.execute(
            guest,
            request,
            logs=logs_dir(ctx, name),
            expected_rules=expected_rules(state),
            default_mode=state.xdebug,
            stdout=stdout,
            stderr=stderr,
            on_warning=on_warning,
            limits=ctx.settings.limits,
            policy=state.policy,
        )
    if not collect:
        return RunOutcome(result, None)
    # The run's last records are complete once the settle window has passed since its end
    # (younger halves wait for the next collection): wait out the rest of it, so that
    # `sandbox logs` right after `run` shows everything the run did.
    time.sleep(max(0.0, monitor.SETTLE_SECONDS - (time.monotonic() - result.finished)))
    collected = collect_quietly(ctx, name, on_warning, guest=guest, after_run=True)
    return RunOutcome(result, collected)


# The guest port PHP's built-in server listens on: on the guest's loopback only, reached through
# the management connection. Picked at random so that two serves of one sandbox do not collide.
_SERVE_PORTS = (20000, 60000)
# PHP's built-in server says it started in its first line; what comes later is not looked at.
_SERVE_BANNER_BYTES = 4096


@dataclass(frozen=True)
class ServeOutcome:
    run: RunOutcome
    requests: tuple[str, ...]  # the HTTP requests served, in order ("GET /path")


def serve_target(
    ctx: Context,
    name: str,
    workdir: Path,
    *,
    port: int,
    docroot: str = ".",
    router: str | None = None,
    env: tuple[tuple[str, str], ...] = (),
    mode: xdebug.XdebugMode | None = None,
    on_ready: Callable[[str], None],
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    on_warning: Callable[[str], None],
) -> ServeOutcome:
    """`sandbox serve`: a PHP web application run by PHP's built-in server in the guest, reached
    from this machine's 127.0.0.1:`port` through the management SSH connection (ingress only:
    the guest's egress rules stay as they are). Runs until Ctrl-C; then like `sandbox run`: the
    outputs fetched, the records collected, each attempt tied to its request and PHP line.
    `on_ready` gets the URL once the server has started."""
    guest_port = _SERVE_PORTS[0] + secrets.randbelow(_SERVE_PORTS[1] - _SERVE_PORTS[0])
    request = runs.serve_request(
        workdir, guest_port=guest_port, docroot=docroot, router=router, env=env, mode=mode
    )
    runs.plan(request)
    state = runnable_state(ctx, name)
    with (
        open_guest(ctx, name) as guest,
        guest.local_forward("127.0.0.1", port, guest_port) as bound,
    ):
        url = f"http://127.0.0.1:{bound}/"
        # Ready when the server says so: asking by connecting would add a connection to the
        # records at every try.
        started = f"Development Server (http://127.0.0.1:{guest_port}) started".encode()
        seen = bytearray()

        def watch(data: bytes) -> None:
            if len(seen) < _SERVE_BANNER_BYTES:
                seen.extend(data[:_SERVE_BANNER_BYTES])
                if started in seen:
                    seen.extend(b"\0" * _SERVE_BANNER_BYTES)  # said once
                    on_ready(url)
            stderr(data)

        outcome = _execute_and_collect(ctx, state, guest, request, stdout, watch, on_warning)
    return ServeOutcome(outcome, _served(outcome.result, ctx.settings.limits.decompressed))


def _served(result: runs.RunResult, limit: int) -> tuple[str, ...]:
    """The requests the fetched traces name, in the order they started."""
    named: list[tuple[float, str]] = []
    for path in result.fetched:
        if not xdebug.is_trace_name(path.name):
            continue
        try:
            trace = xdebug.parse_trace(path.read_bytes(), path.name, limit=limit)
        except (OSError, xdebug.TraceError):
            continue
        request = xdebug.request_of(trace)
        if request is not None:
            named.append((trace.start, request))
    return tuple(request for _start, request in sorted(named))


def ssh_argv(ctx: Context, name: str, command: Sequence[str]) -> list[str]:
    """An OpenSSH command line that trusts only the pinned host key and gives the guest nothing
    of the user's: no ssh config (-F /dev/null: no ProxyCommand, LocalCommand, forwardings or
    control sockets from ~/.ssh/config), no agent (-a, and IdentityAgent none), no X11 (-x).
    A guest of a remote libvirt host is reached through that host: the ProxyCommand's own ssh
    logs in to it as the user does, with the user's config and known_hosts."""
    from orchestrator.vm.remoteuri import proxy_command

    state = ready_state(ctx, name)
    store = ctx.store
    known_hosts: Path = store.file(name, paths.KNOWN_HOSTS)
    proxy = proxy_command(state.uri)
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-a",
        "-x",
        "-o",
        "ForwardAgent=no",
        "-o",
        "IdentityAgent=none",
        "-o",
        "ForwardX11=no",
        "-o",
        "ClearAllForwardings=yes",
        "-o",
        "PermitLocalCommand=no",
        "-o",
        "ControlPath=none",
        "-o",
        "Tunnel=no",
        "-i",
        str(store.file(name, paths.CLIENT_KEY)),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        *(["-o", f"ProxyCommand={proxy}"] if proxy else []),
        "-p",
        str(state.ssh_port),
        f"{state.user}@{state.ip}",
        *command,
    ]


def sockets(ctx: Context, name: str) -> list[logview.Socket]:
    """The guest's current sockets, like the recipe's `lsof -i -nP`."""
    with open_guest(ctx, name) as guest:
        out: list[bytes] = []
        code = guest.run(logview.sockets_command(), stdout=out.append, timeout=30)
    text = b"".join(out).decode(errors="replace")
    if code not in (0, 1):
        raise GuestError(f"lsof in the guest failed (exit {code})", "check `sandbox status`")
    return logview.parse_sockets(text)

"""`sandbox destroy`: the final collection (bounded: the guest may be hostile or hung), then
everything the sandbox owns but its logs.

The final collection reads the guest's records from the host's copy of them (the capture's
virtio-serial port, monitor.Stream) when the guest keeps it going, else over SSH. With
`detach` (the CLI), the guest is paused once collected and the rest (domain, filter, volumes,
network, state and keys) is removed by a child process of its own, after `destroy` returned:
the state says `destroying` until the child is done. If the child dies before (killed, the
machine stopped), the next `destroy` of the sandbox, or `up` of its name, finishes the work:
every resource name derives from the sandbox name, and the removal is idempotent."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import libvirt

from orchestrator import hostprocs, names, paths
from orchestrator.capture import monitor
from orchestrator.config import Settings
from orchestrator.egress import hostfilter
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import (
    SandboxError,
)
from orchestrator.lifecycle import hosts
from orchestrator.lifecycle.context import (
    Context,
    guards_remote_host,
    logs_dir,
)
from orchestrator.lifecycle.resources import remove_network, remove_volumes
from orchestrator.state import (
    Phase,
    SandboxState,
    StateStore,
    validate_name,
)
from orchestrator.vm import hypervisor as hv

if TYPE_CHECKING:
    from orchestrator.lifecycle.collection import CollectReport
    from orchestrator.vm.hostfiles import HostFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DestroyReport:
    name: str
    removed: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    failed: str | None = None  # destroy_all: why this one could not be destroyed

    @property
    def existed(self) -> bool:
        return bool(self.removed)


# The most `destroy` waits for its final collection: a guest that hangs its sshd, stalls the
# channel or floods it must not hold the host's cleanup (the host-side records are kept anyway).
FINAL_COLLECT_SECONDS = 30.0
# The guest's copy completes a round every 100 ms (sbx-capture.c STREAM_MS): the most `destroy`
# waits for two more (the second begun after the request: it drained every record made
# before). A guest that stopped its copy, or an image without one, is collected over SSH.
STREAM_WAIT_SECONDS = 1.5
# The most a detached removal, or a command after it, waits for the sandbox's lock.
TEARDOWN_LOCK_SECONDS = 600.0


T = TypeVar("T")


def _within(seconds: float, work: Callable[[], T]) -> tuple[T | None, str]:
    """Run `work` on a daemon thread for at most `seconds`: (its result, "") or (None, why not).
    Any exception counts as a failure: what the guest sent must never stop the caller."""
    result: list[T] = []
    failure: list[str] = []

    def run() -> None:
        try:
            result.append(work())
        except SandboxError as exc:
            failure.append(exc.message)
        except Exception as exc:  # garbage from a hostile guest can raise anything
            failure.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=run, name="final-collection", daemon=True)
    thread.start()
    thread.join(seconds)
    if result:
        return result[0], ""
    if failure:
        return None, failure[0]
    return None, (
        f"it did not finish within {seconds:g} s (the guest may be hung, or hostile); "
        "destroyed without it"
    )


def lock_wait(store: StateStore, name: str) -> float | None:
    """How long a command waits for the sandbox's lock: a while if a detached removal may hold
    it (the state says `destroying`), else not at all."""
    state = store.load(name)
    return TEARDOWN_LOCK_SECONDS if state is not None and state.phase is Phase.DESTROYING else None


def _caught_up(path: str, files: HostFiles, seconds: float = STREAM_WAIT_SECONDS) -> bool:
    """Whether the guest's copy completed two rounds more within `seconds`, the last with all
    of the guest's file copied (a burst of records takes it rounds)."""
    first = monitor.stream_round(path, files)
    if first is None:
        return False
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        last = monitor.stream_round(path, files)
        if last is not None and last[0] >= first[0] + 2 and last[1] == 0:
            return True
        time.sleep(0.02)
    return False


def _pause(dom: libvirt.virDomain) -> bool:
    with contextlib.suppress(libvirt.libvirtError):
        dom.suspend()
        return True
    return False


def _collect_from_stream(ctx: Context, state: SandboxState) -> CollectReport | None:
    """The final collection from the host's copy of the guest's records, the guest paused once
    the copy caught up; None (the guest running) where it cannot be had so."""
    from orchestrator.lifecycle.collection import collect_locked
    from orchestrator.vm import hostfiles

    # The copy is a file on the hypervisor's host: read here, or over SFTP from a remote one.
    with (
        contextlib.suppress(SandboxError),
        hv.connection(state.uri) as conn,
        hostfiles.on_host(state.uri) as files,
    ):
        pool = hv.active_pool(conn, state.pool)
        dom = hv.lookup_domain(conn, state.domain)
        if pool is None or dom is None:
            return None
        capture = names.SandboxVolumes.for_domain(state.domain).capture
        path = posixpath.join(hv.pool_path(pool), capture)
        if not _caught_up(path, files) or not _pause(dom):
            log.info("final collection over SSH: the guest's copy of its records is not going")
            return None
        collected, problem = _within(
            FINAL_COLLECT_SECONDS,
            lambda: collect_locked(
                ctx, state, final=True, stream=monitor.read_stream(path, files=files)
            ),
        )
        if collected is None:
            log.info("final collection over SSH: %s", problem)
            with contextlib.suppress(libvirt.libvirtError):
                dom.resume()
        return collected
    return None


def _final_collection(ctx: Context, state: SandboxState) -> tuple[list[str], list[str]]:
    """What `destroy` says of its final collection: (what it did, warnings)."""
    # Here, not at the top: `up` imports this module (rollback), and needs no collection.
    from orchestrator.lifecycle.collection import collect_locked

    done: list[str] = []
    warnings: list[str] = []
    collected = _collect_from_stream(ctx, state)
    problem, how = "", "from the host's copy"
    if collected is None:
        # The guest may be hostile or hung: whatever it does, destroy goes on.
        collected, problem = _within(
            FINAL_COLLECT_SECONDS, lambda: collect_locked(ctx, state, final=True)
        )
        how = "over SSH"
    if collected is not None:
        done.append(
            f"collected {collected.new_attempts} attempts, {collected.new_dns} DNS queries ({how})"
        )
        warnings.extend(collected.warnings)
    else:
        warnings.append(f"could not collect the last connection records: {problem}")
    return done, warnings


def destroy(ctx: Context, name: str, *, detach: bool = False) -> DestroyReport:
    """Remove everything a sandbox owns but its logs. Idempotent; works from any half-built
    state, because every resource name derives from the sandbox name. `detach`: pause the VM
    and leave the removal to a child process (see the module's docstring)."""
    validate_name(name)
    store = ctx.store
    removed: list[str] = []
    warnings: list[str] = []
    with store.lock(name, timeout=lock_wait(store, name)):
        state = store.load(name)
        if state is not None and state.phase is Phase.READY:
            # Destroy collects first: the guest's records exist only in the guest until now.
            done, warned = _final_collection(ctx, state)
            removed += done
            warnings += warned
        if detach and state is not None:
            state = dataclasses.replace(state, phase=Phase.DESTROYING)
            store.save(state)
            pid = _detach(ctx, state)
            if pid is not None:
                _pause_domain(state)
                removed.append(
                    f"VM stopped; its domain, disks, network, state and keys are being removed "
                    f"(pid {pid})"
                )
                return DestroyReport(name=name, removed=tuple(removed), warnings=tuple(warnings))
        if state is not None:
            removed += teardown_locked(ctx, name, state)
        else:
            done, warned = _teardown_orphan(ctx, name)
            removed += done
            warnings += warned
    with contextlib.suppress(FileNotFoundError):
        store.file(name, paths.LOCK_FILE).unlink()
    return DestroyReport(name=name, removed=tuple(removed), warnings=tuple(warnings))


def _teardown_orphan(ctx: Context, name: str) -> tuple[list[str], list[str]]:
    """A sandbox without state (`up` killed before it wrote one, or its state lost): removed
    from every configured host that holds a domain of it, else from `connect` (what is left
    there besides a domain, every name derived from NAME). (removed, warnings)."""
    if len(ctx.settings.all_hosts) == 1:
        return teardown_locked(ctx, name, None), []
    where = hosts.locate(ctx, name)
    warnings = [f"could not search {p.describe()}" for p in where.down]
    # This machine's helpers first, said as this machine's (each host's teardown below would
    # find them under its own URI).
    removed = [helper.describe() for helper in hostprocs.stop_all(logs_dir(ctx, name), None)]
    for uri in where.found or [ctx.settings.connect]:
        try:
            done = teardown_locked(ctx, name, None, uri=uri)
        except SandboxError as exc:
            warnings.append(f"could not remove it from {uri}: {exc.message}")
            continue
        removed += [f"{what} (on {uri})" for what in done]
    return removed, warnings


def _domain_of(conn: libvirt.virConnect, name: str, state: SandboxState | None) -> str:
    """The sandbox's domain: as recorded, else (no state: `up` was killed early) the one whose
    metadata names it (a warm VM it took keeps its own name), else the name `up` would give."""
    if state is not None:
        return state.domain
    return hv.sandbox_domains(conn).get(name, names.domain(name))


def _pause_domain(state: SandboxState) -> None:
    """Stop the guest at once (its removal follows in the child): nothing it does from now on
    can matter."""
    with contextlib.suppress(SandboxError), hv.connection(state.uri) as conn:
        dom = hv.lookup_domain(conn, state.domain)
        if dom is not None and hv.domain_running(dom):
            _pause(dom)


def teardown_locked(
    ctx: Context, name: str, state: SandboxState | None, *, uri: str | None = None
) -> list[str]:
    """Everything the sandbox owns but its logs, removed (the sandbox's lock held): what was
    there. On its state's host; without state, on `uri` (default: the settings' `connect`)."""
    store = ctx.store
    removed: list[str] = []
    uri = state.uri if state else (uri or ctx.settings.connect)
    pool_name = state.pool if state else ctx.settings.pool.name
    network = state.network if state else names.network(name)
    # This machine's captures, sinkhole and resolver, found by their command lines (they name
    # the sandbox's logs directory): recorded or not (a killed `up`, a lost state), and never a
    # recorded pid that is another process by now.
    stopped = hostprocs.stop_all(logs_dir(ctx, name), state.sinkhole_pid if state else None)
    removed += [helper.describe() for helper in stopped]
    if guards_remote_host(uri) and (state is None or state.remote_dir):
        removed += _remove_remote_records(ctx, name, state, uri)
    with hv.connection(uri) as conn:
        dom_name = _domain_of(conn, name, state)
        if hv.destroy_domain(conn, dom_name):
            removed.append(f"domain {dom_name}")
        if hostfilter.remove_filter(conn, name):
            removed.append(f"filter {names.nwfilter(name)}")
        pool = hv.active_pool(conn, pool_name)
        if pool is not None:
            vols = names.SandboxVolumes.for_domain(dom_name)
            gone = remove_volumes(conn, pool, vols, store, name)
            removed += [f"volume {vol}" for vol in gone]
        if remove_network(ctx, conn, network):
            removed.append(f"network {network}")
    secrets_dir = store.dir(name)
    present = [f for f in (*paths.SECRET_FILES, paths.STATE_FILE) if (secrets_dir / f).exists()]
    store.remove_secrets(name)
    if present:
        removed.append("state and keys")
    return removed


def _remove_remote_records(
    ctx: Context, name: str, state: SandboxState | None, uri: str
) -> list[str]:
    """The host-side records on a remote libvirt host (capture/remotecapture.py), its sinkhole
    (egress/remotesinkhole.py) and its wildcard relay (egress/remoterelay.py) there: tcpdump,
    the sinkhole and the relay stopped, their last files brought to the logs, their directory
    removed; what was there. Without state (a killed `up`), the directory its name derives
    from."""
    from orchestrator.capture import remotecapture as remote
    from orchestrator.egress import remoterelay, remotesinkhole
    from orchestrator.vm import hostfiles

    where = state.remote_dir if state and state.remote_dir else remote.directory(name)
    pids = [p for p in (state.remote_flows_pid, state.remote_pcap_pid) if p] if state else []
    logs = logs_dir(ctx, name)
    with hostfiles.on_host(uri) as host:
        # Any sinkhole running there, recorded or not (a killed `up` may have started one).
        sunk = remotesinkhole.stop(host, where) if _may_run(state, "sinkhole") else []
        relayed = remoterelay.stop(host, where) if _may_run(state, "wildcards") else []
        stopped = remote.stop(host, where, pids)
        gone = [
            *(f"sinkhole {p} on {host.where}" for p in sunk),
            *(f"wildcard relay {p} on {host.where}" for p in relayed),
            *(f"tcpdump {p} on {host.where}" for p in stopped),
        ]
        if host.stat(where) is None:
            return gone
        # Without state (a killed `up`), whatever it may have started.
        rings = remote.rings_of(state.remote_pcap_pid) if state else remote.RINGS
        fetched = remote.fetch(host, where, logs, rings)
        warnings = list(fetched.warnings)
        if state is not None and state.remote_sinkhole_pid:
            # Its last records (after the final collection's: kept, not attached to attempts).
            key = remotesinkhole.fetch_key(state.created, state.remote_sinkhole_pid)
            try:
                warnings += remotesinkhole.fetch(host, where, logs, key, final=True).warnings
            except (SandboxError, OSError) as exc:
                message = exc.message if isinstance(exc, SandboxError) else str(exc)
                warnings.append(f"the sinkhole's last records not brought back: {message}")
        remote.remove(host, where)
    done = f"host-side records {where} on {host.where} ({fetched.copied} bytes brought back"
    done += f"; {'; '.join(warnings)})" if warnings else ")"
    return [*gone, done]


def _may_run(state: SandboxState | None, what: Literal["sinkhole", "wildcards"]) -> bool:
    """Whether a sandbox may have a sinkhole (sinkhole mode) or a wildcard relay (wildcard
    entries) on its remote host: its policy says so, or there is no state to tell. Pure."""
    if state is None:
        return True
    policy = EgressPolicy.from_dict(state.policy)
    return policy.sinkhole if what == "sinkhole" else bool(policy.wildcards)


_CHILD = (
    "import sys; from orchestrator.lifecycle import teardown; "
    "sys.exit(teardown.finish_detached(sys.argv[1:]))"
)


def _detach(ctx: Context, state: SandboxState) -> int | None:
    """Start the child that removes the sandbox once this process lets go of its lock; its pid,
    or None if it could not start (the caller then removes it itself)."""
    dirs = ctx.dirs
    argv = [sys.executable, "-c", _CHILD, state.name, state.created]
    argv += [str(dirs.data), str(dirs.state), str(dirs.config)]
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or a closed terminal must not stop it halfway
        )
    except OSError:
        return None
    return child.pid


def finish_detached(argv: list[str]) -> int:
    """The child of a detached `destroy`: NAME CREATED DATA_DIR STATE_DIR CONFIG_DIR. Removes
    the sandbox created at CREATED if it is still `destroying` when its lock comes free."""
    name, created, data, state_dir, config = argv
    dirs = paths.Dirs(data=Path(data), state=Path(state_dir), config=Path(config))
    ctx = Context(settings=Settings(), dirs=dirs)
    with ctx.store.lock(name, timeout=TEARDOWN_LOCK_SECONDS):
        state = ctx.store.load(name)
        if state is None or state.phase is not Phase.DESTROYING or state.created != created:
            return 0  # another command finished it, or a new sandbox took the name
        teardown_locked(ctx, name, state)
    with contextlib.suppress(FileNotFoundError):
        ctx.store.file(name, paths.LOCK_FILE).unlink()
    return 0


def known_names(ctx: Context) -> list[str]:
    """Sandboxes with state on disk, plus our domains that have none (orphans)."""
    names = set(ctx.store.names())
    if len(ctx.settings.all_hosts) == 1:
        with contextlib.suppress(SandboxError), hv.connection(ctx.settings.connect) as conn:
            names.update(hv.sandbox_domains(conn))
        return sorted(names)
    for probe in hosts.probe(ctx.settings.all_hosts):  # a host down: its orphans are not known
        names.update(probe.sandboxes)
    return sorted(names)


def destroy_all(ctx: Context) -> list[DestroyReport]:
    """Destroy every sandbox; one that fails is reported and the others still go."""
    reports = []
    for name in known_names(ctx):
        try:
            reports.append(destroy(ctx, name))
        except SandboxError as exc:
            reports.append(DestroyReport(name=name, removed=(), failed=exc.message))
    return reports

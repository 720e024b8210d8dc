"""`sandbox destroy`: the final collection (bounded: the guest may be hostile or hung), then
everything the sandbox owns but its logs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import libvirt

from orchestrator import names, paths
from orchestrator.capture import pcap
from orchestrator.egress import hostfilter, sinkhole
from orchestrator.errors import (
    SandboxError,
)
from orchestrator.lifecycle.collection import collect_locked
from orchestrator.lifecycle.context import (
    Context,
)
from orchestrator.lifecycle.resources import remove_network, remove_volumes
from orchestrator.state import (
    Phase,
    SandboxState,
    validate_name,
)
from orchestrator.vm import hypervisor as hv

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    pass


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


def destroy(ctx: Context, name: str) -> DestroyReport:
    """Remove everything a sandbox owns but its logs. Idempotent; works from any half-built
    state, because every resource name derives from the sandbox name."""
    validate_name(name)
    store = ctx.store
    removed: list[str] = []
    warnings: list[str] = []
    with store.lock(name):
        state = store.load(name)
        uri = state.uri if state else ctx.settings.connect
        pool_name = state.pool if state else ctx.settings.pool.name
        network = state.network if state else names.network(name)
        if state is not None and state.phase is Phase.READY:
            # Destroy collects first: the guest's records exist only in the guest until now.
            # But the guest may be hostile or hung: whatever it does, destroy goes on.
            collected, problem = _within(
                FINAL_COLLECT_SECONDS, lambda: collect_locked(ctx, state, final=True)
            )
            if collected is not None:
                if collected.new_attempts or collected.new_dns:
                    removed.append(
                        f"collected {collected.new_attempts} attempts, "
                        f"{collected.new_dns} DNS queries"
                    )
                warnings.extend(collected.warnings)
            else:
                warnings.append(f"could not collect the last connection records: {problem}")
        if state is not None and state.pcap_pid:
            pcap.stop_pcap(state.pcap_pid)
        if state is not None and state.flows_pid:
            pcap.stop_pcap(state.flows_pid)
        if state is not None and state.sinkhole_pid:
            sinkhole.stop(state.sinkhole_pid)
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
    with contextlib.suppress(FileNotFoundError):
        store.file(name, paths.LOCK_FILE).unlink()
    return DestroyReport(name=name, removed=tuple(removed), warnings=tuple(warnings))


def _domain_of(conn: libvirt.virConnect, name: str, state: SandboxState | None) -> str:
    """The sandbox's domain: as recorded, else (no state: `up` was killed early) the one whose
    metadata names it (a warm VM it took keeps its own name), else the name `up` would give."""
    if state is not None:
        return state.domain
    return hv.sandbox_domains(conn).get(name, names.domain(name))


def known_names(ctx: Context) -> list[str]:
    """Sandboxes with state on disk, plus our domains that have none (orphans)."""
    names = set(ctx.store.names())
    with contextlib.suppress(SandboxError), hv.connection(ctx.settings.connect) as conn:
        names.update(hv.sandbox_domains(conn))
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

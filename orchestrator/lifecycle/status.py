"""`sandbox status`, `list` and `policy show`: derived from what exists, problems collected
rather than raised."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import libvirt

from orchestrator import names, paths
from orchestrator.egress import firewall, hostfilter, hostguard
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import (
    SandboxError,
)
from orchestrator.lifecycle.context import (
    Context,
    guards_host,
    open_guest,
    ready_state,
)
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
class Status:
    name: str
    state: SandboxState | None
    domain: str  # running / stopped / missing / unknown
    problems: tuple[str, ...]

    @property
    def summary(self) -> str:
        if self.state is None:
            return "orphan" if self.domain != "missing" else "absent"
        if self.state.phase is Phase.READY and self.domain == "running" and not self.problems:
            return "ready"
        if self.state.phase is Phase.CREATING and self.domain == "running":
            return "creating"
        if self.state.phase is Phase.DESTROYING:
            # A detached destroy's child is removing it (or died: `destroy` again finishes it).
            return "destroying"
        return "broken"


def inspect(ctx: Context, name: str, conn: libvirt.virConnect | None = None) -> Status:
    """Status derived from what exists; problems are collected, not raised (Lima's Inspect)."""
    validate_name(name)
    state = ctx.store.load(name)
    problems: list[str] = []
    domain = "unknown"
    with ExitStack() as stack:
        if conn is None:
            try:
                conn = stack.enter_context(
                    hv.connection(state.uri if state else ctx.settings.connect)
                )
            except SandboxError as exc:
                if state is None:
                    # Without state and without libvirt there is nothing to report.
                    raise
                problems.append(exc.message)
        if conn is not None:
            dom = hv.lookup_domain(conn, state.domain if state else names.domain(name))
            domain = (
                "missing" if dom is None else ("running" if hv.domain_running(dom) else "stopped")
            )
    if state is not None:
        if domain == "missing":
            problems.append("its VM is gone")
        if not ctx.store.file(name, paths.CLIENT_KEY).exists():
            problems.append("its SSH key is missing")
        if state.phase is Phase.CREATING and domain != "running":
            problems.append("`sandbox up` did not finish")
    return Status(name=name, state=state, domain=domain, problems=tuple(problems))


def list_status(ctx: Context) -> list[Status]:
    try:
        with hv.connection(ctx.settings.connect) as conn:
            names = set(ctx.store.names()) | set(hv.sandbox_domains(conn))
            return [inspect(ctx, n, conn) for n in sorted(names)]
    except SandboxError:
        local = ctx.store.names()
        if not local:
            raise  # nothing to show but the reason libvirt could not be asked
        return [inspect(ctx, n) for n in local]


@dataclass(frozen=True)
class PolicyReport:
    name: str
    policy: EgressPolicy
    guest_rules: dict[int, str]
    host_filter: str
    problems: tuple[str, ...]


def policy_report(ctx: Context, name: str) -> PolicyReport:
    """The effective policy and both layers' rules as they are now (read from the guest and from
    libvirt, not re-rendered), so the output shows what is really enforced."""
    state = ready_state(ctx, name)
    policy = EgressPolicy.from_dict(state.policy)
    problems: list[str] = []
    guest_rules: dict[int, str] = {}
    try:
        with open_guest(ctx, name) as guest:
            for version in (4, 6):
                guest_rules[version] = guest.check(firewall.restore_commands(version)[1])
    except SandboxError as exc:
        problems.append(f"cannot read the guest's rules: {exc.message}")
    host_filter = ""
    with hv.connection(state.uri) as conn:
        host_filter = hostfilter.filter_xml(conn, name) or ""
        bridge = hv.network_bridge(conn, state.network) if guards_host(state.uri) else None
    if not host_filter:
        problems.append(f"the host-side filter {names.nwfilter(name)} is missing")
    if bridge is not None and not hostguard.present(bridge):
        problems.append(
            f"the host-side input guard {names.guard_table(bridge)} is missing: guests can "
            "open connections to the host's own services"
        )
    return PolicyReport(name, policy, guest_rules, host_filter, tuple(problems))

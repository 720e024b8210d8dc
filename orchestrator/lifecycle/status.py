"""`sandbox status`, `list` and `policy show`: derived from what exists, problems collected
rather than raised."""

from __future__ import annotations

import contextlib
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import libvirt

from orchestrator import names, paths
from orchestrator.egress import firewall, hostfilter, hostguard
from orchestrator.egress.policy import EgressPolicy
from orchestrator.egress.wildcards import HandedOut
from orchestrator.errors import (
    SandboxError,
)
from orchestrator.lifecycle import hosts
from orchestrator.lifecycle.context import (
    Context,
    guards_host,
    guards_remote_host,
    logs_dir,
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
    # The libvirt host it is on: its state's, else the one its VM was found on ("": nowhere).
    host: str = ""

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


@dataclass(frozen=True)
class HostDown:
    """A libvirt host `list` could not ask: its sandboxes' status is unknown."""

    uri: str
    error: str


@dataclass(frozen=True)
class Listing:
    sandboxes: tuple[Status, ...]
    down: tuple[HostDown, ...]  # configured hosts, or hosts a state names, that did not answer


def _domain_status(conn: libvirt.virConnect, domain: str) -> str:
    dom = hv.lookup_domain(conn, domain)
    return "missing" if dom is None else ("running" if hv.domain_running(dom) else "stopped")


def _with_state(ctx: Context, state: SandboxState, domain: str, problems: list[str]) -> Status:
    if domain == "missing":
        problems.append("its VM is gone")
    if not ctx.store.file(state.name, paths.CLIENT_KEY).exists():
        problems.append("its SSH key is missing")
    if state.phase is Phase.CREATING and domain != "running":
        problems.append("`sandbox up` did not finish")
    return Status(state.name, state, domain, tuple(problems), host=state.uri)


def inspect(ctx: Context, name: str, conn: libvirt.virConnect | None = None) -> Status:
    """Status derived from what exists; problems are collected, not raised (Lima's Inspect).
    A sandbox with state is looked at on its state's host; one without, on every configured
    host (the first that holds a domain of it)."""
    validate_name(name)
    state = ctx.store.load(name)
    if state is None:
        return _orphan(ctx, name)
    problems: list[str] = []
    domain = "unknown"
    with ExitStack() as stack:
        if conn is None:
            try:
                conn = stack.enter_context(hv.connection(state.uri))
            except SandboxError as exc:
                problems.append(exc.message)
        if conn is not None:
            domain = _domain_status(conn, state.domain)
    return _with_state(ctx, state, domain, problems)


def _orphan_on(conn: libvirt.virConnect, uri: str, name: str, domain: str) -> Status:
    return Status(name, None, _domain_status(conn, domain), (), host=uri)


def _orphan(ctx: Context, name: str) -> Status:
    """A sandbox without state: its VM searched for on every configured host."""
    if len(ctx.settings.all_hosts) == 1:
        # Without state and without libvirt there is nothing to report: its error is raised.
        with hv.connection(ctx.settings.connect) as conn:
            domain = hv.sandbox_domains(conn).get(name, names.domain(name))
            return _orphan_on(conn, ctx.settings.connect, name, domain)
    where = hosts.locate(ctx, name)
    if not where.found and len(where.down) == len(ctx.settings.all_hosts):
        raise hosts.unreachable_error(where.down)
    problems = where.down_problems()
    if len(where.found) > 1:
        problems += (f"it has VMs on {len(where.found)} hosts: {', '.join(where.found)}",)
    for uri, domain in where.found.items():
        with contextlib.suppress(SandboxError), hv.connection(uri) as conn:
            return Status(name, None, _domain_status(conn, domain), problems, host=uri)
    return Status(name, None, "unknown" if where.down else "missing", problems)


def list_status(ctx: Context) -> Listing:
    """Every sandbox on every host: those with state (each on its state's host) and our VMs
    without state, host by host. A host that does not answer is listed in `down`, its
    sandboxes with the reason; if no host answered and no state exists, its error is raised."""
    states = [s for s in (ctx.store.load(n) for n in ctx.store.names()) if s is not None]
    uris = list(dict.fromkeys([*ctx.settings.all_hosts, *(s.uri for s in states)]))
    found: list[Status] = []
    down: list[HostDown] = []
    errors: list[SandboxError] = []
    for uri in uris:
        here = [s for s in states if s.uri == uri]
        try:
            with hv.connection(uri) as conn:
                ours = hv.sandbox_domains(conn)
                orphans = sorted(set(ours) - {s.name for s in states})
                found += [inspect(ctx, s.name, conn) for s in here]
                found += [_orphan_on(conn, uri, n, ours[n]) for n in orphans]
        except SandboxError as exc:
            errors.append(exc)
            down.append(HostDown(uri, exc.message))
            problem = f"its libvirt host did not answer: {exc.message}"
            found += [_with_state(ctx, s, "unknown", [problem]) for s in here]
    if len(errors) == len(uris) and not found:
        if len(errors) == 1:
            raise errors[0]  # nothing to show but the reason libvirt could not be asked
        raise hosts.unreachable_error([hosts.HostProbe(d.uri, error=d.error) for d in down])
    found.sort(key=lambda st: (st.name, st.host))
    return Listing(tuple(found), tuple(down))


@dataclass(frozen=True)
class PolicyReport:
    name: str
    policy: EgressPolicy
    guest_rules: dict[int, str]
    host_filter: str
    problems: tuple[str, ...]
    # What the wildcard entries' resolver has allowed so far (egress/wildcards.py).
    handed_out: tuple[HandedOut, ...] = ()


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
        guarded = guards_host(state.uri) or guards_remote_host(state.uri)
        bridge = hv.network_bridge(conn, state.network) if guarded else None
    if not host_filter:
        problems.append(f"the host-side filter {names.nwfilter(name)} is missing")
    if bridge is not None:
        from orchestrator.vm import hostfiles  # a remote host's nft: over SSH

        try:
            with hostfiles.on_host(state.uri) as host:
                present = hostguard.present(bridge, host=host)
        except SandboxError as exc:
            problems.append(f"cannot check the host-side input guard: {exc.message}")
        else:
            if not present:
                problems.append(
                    f"the host-side input guard {names.guard_table(bridge)} is missing: guests "
                    "can open connections to the host's own services"
                )
    handed_out: tuple[HandedOut, ...] = ()
    if policy.wildcards:
        from orchestrator.egress import wildcards

        handed_out = tuple(wildcards.read_handed_out(logs_dir(ctx, name)))
        if not (state.wildcard_pid and wildcards.running(state.wildcard_pid)):
            problems.append(
                "the resolver of the wildcard entries is not running: their names get no answer"
            )
    return PolicyReport(name, policy, guest_rules, host_filter, tuple(problems), handed_out)

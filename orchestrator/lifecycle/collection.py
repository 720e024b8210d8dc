"""The one collection pipeline: the guest's new capture records and firewall state, the
resolver's new queries, joined, given verdicts and DNS names, tied to runs and PHP lines, and
appended to the logs. Every verb that brings records home goes through `collect`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import jsontext, paths
from orchestrator.capture import hostflows, logview, monitor, payload
from orchestrator.capture.records import Attempt, DnsQuery, Verdict
from orchestrator.egress import dnslog, guestfw, sinkhole
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import GuestError, NotFoundError, SandboxError, UsageError
from orchestrator.files import atomic_write, file_lock
from orchestrator.lifecycle.context import (
    LEGACY_SUBNET,
    LEGACY_SUBNET6,
    Context,
    endpoint,
    expected_rules,
    guards_remote_host,
    logs_dir,
    network_of,
    ready_state,
)
from orchestrator.run import target as runs
from orchestrator.state import Phase, SandboxState, validate_name
from orchestrator.vm import hostfiles
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import (
    NetworkSpec,
)
from orchestrator.waits import Deadline

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    from orchestrator.vm.guest import Guest


@dataclass(frozen=True)
class CollectReport:
    new_attempts: int
    new_dns: int
    warnings: tuple[str, ...]


def collect(
    ctx: Context,
    name: str,
    *,
    lock_timeout: float = 120.0,
    guest: Guest | None = None,
    after_run: bool = False,
) -> CollectReport:
    """Bring the guest's new connection records and the resolver's new queries to the host;
    tie attempts to the runs (and PHP lines) that made them."""
    state = ready_state(ctx, name)
    # Collections of one sandbox take turns: the cursor moves forward exactly once per record.
    with file_lock(
        logs_dir(ctx, name) / paths.COLLECT_LOCK,
        f"collecting the logs of sandbox {name!r}",
        timeout=lock_timeout,
    ):
        return collect_locked(ctx, state, final=False, guest=guest, after_run=after_run)


def collect_locked(
    ctx: Context,
    state: SandboxState,
    *,
    final: bool,
    guest: Guest | None = None,
    after_run: bool = False,
    stream: bytes | None = None,
) -> CollectReport:
    """`stream`: take the guest's records from the host's copy (monitor.read_stream's bytes)
    instead of over SSH; GuestError if it does not hold all of them since the last collection.
    The guest's firewall is not read back then: its changes are in the capture's records."""
    logs = logs_dir(ctx, state.name)
    logs.mkdir(parents=True, exist_ok=True)
    cursor_path = logs / paths.CAPTURE_CURSOR
    cursor = monitor.Cursor.load(cursor_path)
    policy = EgressPolicy.from_dict(state.policy)

    def gather(g: Guest) -> tuple[monitor.Collected, list[Attempt]]:
        collected = monitor.collect_full(g, cursor, final=final)
        collected = dataclasses.replace(
            collected, attempts=_own_loads(collected.attempts, logs, policy)
        )
        changes = [a for a in collected.attempts if a.verdict is Verdict.TAMPER and a.pid]
        expected = expected_rules(state)
        return collected, _firewall_tamper(g, expected, logs, changes)

    tampered: list[Attempt] = []
    if stream is not None:
        copied = monitor.collect_stream(monitor.parse_stream(stream), cursor, final=final)
        if copied is None:
            raise GuestError(
                "the host's copy of the guest's records does not hold all of them since the "
                "last collection",
                "collect over SSH",
            )
        collected = dataclasses.replace(copied, attempts=_own_loads(copied.attempts, logs, policy))
    elif guest is not None:
        collected, tampered = gather(guest)
    else:
        from orchestrator.vm.guest import Guest  # paramiko: only where SSH is used
        from orchestrator.vm.jump import guest_route

        deadline = Deadline(60, f"SSH to sandbox {state.name!r} to collect its records")
        with (
            guest_route(state.uri) as opener,
            Guest.connect(endpoint(ctx, state), deadline, opener=opener) as own,
        ):
            collected, tampered = gather(own)
    collected = dataclasses.replace(collected, attempts=collected.attempts + tampered)
    # On a remote host, the host-side records come home with the DNS log, on its login.
    queries, dns_warnings = _dns_queries(ctx, state)
    new_dns = logview.append_dns(logs, queries)
    known_dns: list[DnsQuery] = logview.read_dns(logs)
    handed = _handed_out(logs, policy)
    attempts = monitor.name_queries(
        [_host_verdict(a, policy, handed) for a in collected.attempts], known_dns
    )
    attempts = monitor.attach_dns_names(monitor.confirm_probes(attempts, known_dns), known_dns)
    # The server names and HTTP requests the host side saw on the guest's TCP connections.
    attempts = payload.attach(attempts, payload.read_segments(hostflows.capture_files(logs)))
    if policy.sinkhole:
        attempts = sinkhole.attach(
            attempts,
            sinkhole.read_records(logs),
            str(network_of(state).gateway),
            history=logview.read_attempts(logs),
        )
    inflate = ctx.settings.limits.decompressed
    new_attempts = logview.append_attempts(logs, runs.annotate(attempts, logs, limit=inflate))
    if after_run:
        # Attempts collected while the run was still going (a `logs --follow` beside it) could
        # not be tied to its trace then; now its trace is here.
        logview.rewrite_attempts(logs, lambda stored: runs.annotate(stored, logs, limit=inflate))
    atomic_write(cursor_path, collected.cursor.to_json() + "\n")
    return CollectReport(new_attempts, new_dns, (*collected.warnings, *dns_warnings))


def _own_loads(attempts: list[Attempt], logs: Path, policy: EgressPolicy) -> list[Attempt]:
    """`attempts` without the capture's rows of the wildcard resolver's own loads into the
    guest's SBX-WILD chain (egress/wildcards.py): each load's command line names a nonce the
    resolver recorded, and each is taken once, ever (paths.WILDCARD_LOADS_SEEN keeps them): a
    guest replaying one is a change like any other. What the loads added is checked anyway, by
    the read-back of the guest's rules."""
    if not policy.wildcards:
        return attempts
    from orchestrator.egress import wildcards

    own = wildcards.own_loads(logs)
    seen_file = logs / paths.WILDCARD_LOADS_SEEN
    seen = set(seen_file.read_text().splitlines()) if seen_file.exists() else set()
    taken: list[str] = []
    kept = []
    for attempt in attempts:
        command = (attempt.cmdline or "").strip()
        if attempt.verdict is Verdict.TAMPER and command in own and command not in seen:
            seen.add(command)
            taken.append(command)
            continue
        kept.append(attempt)
    if taken:
        with seen_file.open("a") as out:
            out.write("".join(f"{command}\n" for command in taken))
    return kept


def _handed_out(logs: Path, policy: EgressPolicy) -> set[tuple[str, str, int]]:
    if not policy.wildcards:
        return set()
    from orchestrator.egress import wildcards

    return {(h.address, h.proto, h.port) for h in wildcards.read_handed_out(logs)}


def _host_verdict(
    attempt: Attempt, policy: EgressPolicy, handed_out: Collection[tuple[str, str, int]] = ()
) -> Attempt:
    """An attempt the guest's firewall never logged gets the host side's verdict: the nwfilter's
    allow list, and the addresses the wildcard resolver handed out (the host guard's sets)."""
    if attempt.verdict is not Verdict.UNLOGGED:
        return attempt
    if policy.allows(attempt.proto, attempt.dst, attempt.dport):
        return attempt
    if (attempt.dst, attempt.proto, attempt.dport) in handed_out:
        return attempt
    return dataclasses.replace(attempt, verdict=Verdict.HOST_BLOCKED)


def _dns_queries(ctx: Context, state: SandboxState) -> tuple[list[DnsQuery], list[str]]:
    """The sandbox network resolver's log, for this guest's addresses, since it was created, and
    what kept it from being read. The log is a file on the hypervisor's host: read over SSH
    (SFTP) for a remote one. It is the names' only source, not the attempts': a failure to read
    it is a warning, and the cursor stays, so the next collection reads what this one missed.
    On a remote host, the files of the host-side records (remotecapture.py) are brought to the
    logs over the same login, first: what is new since the last collection."""
    clients = [state.ip] if state.ip else []
    with contextlib.suppress(SandboxError), hv.connection(state.uri) as conn:
        dom = hv.lookup_domain(conn, state.domain)
        if dom is not None:
            clients = sorted(set(clients) | set(hv.domain_addresses(dom)))
    since = dt.datetime.fromisoformat(state.created)
    # Read from where this sandbox's last collection ended, not the log whole.
    logs = logs_dir(ctx, state.name)
    cursor_path = logs / paths.DNS_CURSOR
    cursor = dnslog.LogCursor.load(cursor_path)
    log = network_of(state).dns_log
    try:
        with hostfiles.on_host(state.uri) as files:
            fetched = _fetch_records(files, state, logs)
            queries, after = dnslog.read_for(log, clients, since, cursor, files)
            atomic_write(cursor_path, after.to_json() + "\n")
            try:
                dnslog.rotate_if_large(log, files=files, keep_from=after.offset)
            except SandboxError as exc:
                return queries, [*fetched, _hinted(exc)]
    except hostfiles.NoHostFiles as exc:
        # Nothing to retry: said with every `logs` (recorded_losses), kept past destroy.
        atomic_write(logs / paths.DNS_UNREAD, f"no DNS queries were recorded: {_hinted(exc)}\n")
        return [], []
    except SandboxError as exc:
        return [], [f"DNS queries not collected this time: {_hinted(exc)}"]
    return queries, fetched


def _fetch_records(files: hostfiles.HostFiles, state: SandboxState, logs: Path) -> list[str]:
    """The remote host's new host-side record files into `logs`; what kept them (warnings)."""
    if not state.remote_dir or not guards_remote_host(state.uri):
        return []
    from orchestrator.capture import remotecapture

    warnings: list[str] = []
    try:
        rings = remotecapture.rings_of(state.remote_pcap_pid)
        warnings += remotecapture.fetch(files, state.remote_dir, logs, rings).warnings
    except SandboxError as exc:
        warnings.append(f"host-side records not brought back this time: {_hinted(exc)}")
    if state.remote_sinkhole_pid:
        from orchestrator.egress import remotesinkhole

        key = remotesinkhole.fetch_key(state.created, state.remote_sinkhole_pid)
        try:
            warnings += remotesinkhole.fetch(files, state.remote_dir, logs, key).warnings
        except SandboxError as exc:
            warnings.append(f"the sinkhole's records not brought back this time: {_hinted(exc)}")
    return warnings


def _hinted(exc: SandboxError) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def recorded_losses(ctx: Context, name: str) -> list[str]:
    """Every loss a collection ever detected for this sandbox (kept in the capture cursor), and
    a record it could not take at all (the DNS queries of a remote host without SSH)."""
    logs = logs_dir(ctx, name)
    losses = list(monitor.Cursor.load(logs / paths.CAPTURE_CURSOR).losses)
    with contextlib.suppress(FileNotFoundError):
        losses.append((logs / paths.DNS_UNREAD).read_text().strip())
    return losses


@dataclass(frozen=True)
class HostFlowReport:
    flows: tuple[hostflows.Flow, ...]
    unrecorded: tuple[hostflows.Unrecorded, ...]


def _resolver_addresses(logs: Path) -> list[str]:
    try:
        record = jsontext.object_or_none((logs / paths.NETWORK_RECORD).read_text()) or {}
        return [str(ipaddress.ip_address(a)) for a in record["resolver"]]
    except (OSError, ValueError, KeyError, TypeError):
        # Logs of a sandbox from before each had its own network: the shared one's gateways.
        legacy = NetworkSpec(
            "", "", ipaddress.IPv4Network(LEGACY_SUBNET), ipaddress.IPv6Network(LEGACY_SUBNET6)
        )
        return [str(legacy.gateway), str(legacy.gateway6)]


def host_flows(ctx: Context, name: str, *, before: float | None = None) -> HostFlowReport:
    """The host's own record of the flows the guest started, and the destinations it saw more
    flows to than the guest's record holds. Only flows before `before` (an epoch time: when the
    last collection started) are compared, since later ones cannot be in the guest's record yet."""
    directory = logs_dir(ctx, name)
    if not hostflows.capture_files(directory):
        return HostFlowReport((), ())
    flows = hostflows.read_flows(directory)
    compared = [f for f in flows if before is None or f.time < before]
    resolver = _resolver_addresses(directory)
    missing = hostflows.unrecorded(compared, logview.read_attempts(directory), resolver=resolver)
    return HostFlowReport(tuple(flows), tuple(missing))


def _firewall_tamper(
    guest: Guest, expected: Mapping[int, str], logs: Path, changers: Sequence[Attempt] = ()
) -> list[Attempt]:
    """A tamper row when the guest's firewall no longer is (or is again) what `up` loaded, once
    per change: the last state seen is kept in logs/ (paths.FIREWALL_STATE). `changers`: this
    collection's rows of the changes the capture saw, each with its process: the row names
    them (they came between the last collection and this one)."""
    from orchestrator.egress import wildcards

    printed = guestfw.read_back(guest)
    # Read after the rules: the resolver records a rule before it adds it, so every rule of its
    # in `printed` is on record by now (read first, a push in between looked like tampering).
    handed_out = wildcards.handed_out_rules(logs)
    now_state, diff = guestfw.readback_state(expected, printed, handed_out)
    digest = now_state.removeprefix("changed ")
    state_file = logs / paths.FIREWALL_STATE
    before = state_file.read_text().strip() if state_file.exists() else "intact"
    if now_state == before:
        return []
    atomic_write(state_file, now_state + "\n")
    if diff:
        changes = "; ".join(
            f"IPv{version}: " + " / ".join(lines[:3]) for version, lines in sorted(diff.items())
        )
        what = f"the guest's firewall no longer matches the policy ({changes})"
    else:
        what = "the guest's firewall matches the policy again"
    if changers:
        who = sorted({logview.process_label(c.exe, c.pid) for c in changers})
        more = f" and {len(who) - 3} more" if len(who) > 3 else ""
        what += f"; changed since the last collection by {', '.join(who[:3])}{more}"
    # Seen at this collection: the change happened since the last one (`collect_every`).
    return [monitor.tamper_record(time.time(), what[:500], f"fw{digest}{int(time.time())}")]


def collect_quietly(
    ctx: Context,
    name: str,
    on_warning: Callable[[str], None],
    *,
    guest: Guest | None = None,
    after_run: bool = False,
) -> CollectReport | None:
    """`collect`, with its failure and its capture warnings said through `on_warning`."""
    try:
        report = collect(ctx, name, guest=guest, after_run=after_run)
    except SandboxError as exc:
        on_warning(f"connection records not collected: {exc.message}")
        return None
    for warning in report.warnings:
        on_warning(warning)
    return report


# ---- reading the logs (sandbox logs) ---------------------------------------------------------


# The most `logs --purge` waits for a detached destroy's removal (teardown.py).
PURGE_WAIT_SECONDS = 120.0


def purge_logs(ctx: Context, name: str) -> bool:
    """Delete a destroyed sandbox's logs; False when there were none."""
    validate_name(name)
    state = ctx.store.load(name)
    if state is not None and state.phase is Phase.DESTROYING:
        # A detached destroy's child is removing it: wait for it (it holds the lock).
        with ctx.store.lock(name, timeout=PURGE_WAIT_SECONDS):
            state = ctx.store.load(name)
    if state is not None:
        raise UsageError(
            f"sandbox {name!r} still exists", f"destroy it first: sandbox destroy --name {name}"
        )
    return logview.purge(logs_dir(ctx, name))


def require_logs(ctx: Context, name: str) -> None:
    """Fail unless the sandbox exists or left logs."""
    validate_name(name)
    if ctx.store.load(name) is None and not logs_dir(ctx, name).exists():
        raise NotFoundError(f"no logs for sandbox {name!r}", "check the name with `sandbox list`")


def last_run_id(ctx: Context, name: str) -> str:
    known = runs.load_records(logs_dir(ctx, name))
    if not known:
        raise NotFoundError(f"sandbox {name!r} has had no run", "use `sandbox run` first")
    return max(known, key=lambda r: r.started).id


def refresh_logs(ctx: Context, name: str, on_warning: Callable[[str], None]) -> float:
    """Bring the records home if the sandbox is up (a failure is a warning: the stored logs are
    still shown). Returns when this collection started: records of flows after it cannot be in
    the logs yet."""
    started = time.time()
    state = ctx.store.load(name)
    if state is not None and state.phase is Phase.READY:
        collect_quietly(ctx, name, on_warning)
    return started


def read_logs(
    ctx: Context, name: str, chosen: logview.Filter, *, dns: bool = False
) -> list[Attempt] | list[DnsQuery]:
    """The stored attempts (or, with `dns`, the resolver's queries) that pass `chosen`."""
    directory = logs_dir(ctx, name)
    if dns:
        return logview.apply_dns(chosen, logview.read_dns(directory))
    return logview.apply(chosen, logview.read_attempts(directory))

"""up / exec / status / list / destroy: sequences the edges; rolls back a failed `up`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import libvirt

from . import (
    dnslog,
    firewall,
    hostfilter,
    hostflows,
    hostguard,
    jsontext,
    logview,
    monitor,
    names,
    paths,
    pcap,
    xdebug,
)
from . import hypervisor as hv
from . import run as runs
from .config import Settings
from .domain import (
    DomainSpec,
    NetworkSpec,
    PoolSpec,
    dns_log_path,
    render_domain,
    resolver_hosts,
)
from .errors import (
    ConflictError,
    GuestError,
    HypervisorError,
    NotFoundError,
    SandboxError,
    UsageError,
)
from .images import KERNEL_CMDLINE, Image, default_image_name, load_image, verify_image
from .policy import Blocked, EgressPolicy, build_policy, load_policy_file
from .records import Attempt, DnsQuery, Verdict
from .state import Phase, SandboxState, StateStore, atomic_write, file_lock, validate_name
from .waits import Deadline

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    from .cloudinit import SeedSpec
    from .guest import Endpoint, Guest


class Reporter(Protocol):
    def step(self, what: str) -> AbstractContextManager[None]: ...

    def info(self, message: str) -> None: ...


class QuietReporter:
    def step(self, what: str) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def info(self, message: str) -> None:
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _random_mac() -> str:
    # 52:54:00 is QEMU's prefix; a fresh MAC per boot never picks up a stale lease
    # (docs/platform.md#a-new-mac-per-boot).
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def make_policy(
    ctx: Context,
    allow: Sequence[str] = (),
    *,
    policy_file: Path | None = None,
    dns: bool | None = None,
    blocked: Blocked | None = None,
) -> EgressPolicy:
    """The effective policy: the config file's allow list, then the policy file, then the
    flags. Host names are resolved here, on the host, before anything is created."""
    entries = [*ctx.settings.allow]
    file_dns: bool | None = None
    file_blocked: Blocked | None = None
    if policy_file is not None:
        pf = load_policy_file(policy_file)
        entries += pf.allow
        file_dns, file_blocked = pf.dns, pf.blocked
    entries += allow
    policy = build_policy(
        entries,
        dns=dns if dns is not None else (file_dns if file_dns is not None else True),
        blocked=blocked or file_blocked or Blocked.REJECT,
    )
    net = ctx.settings.network
    for entry in policy.allow:
        own = net.subnets if entry.version == 4 else net.subnets6
        if own is not None and entry.network.overlaps(own):
            raise UsageError(
                f"--allow {entry.source!r} overlaps the sandbox networks' range {own}",
                "sandboxes may not reach each other or the host's side of their network; "
                "allow outside destinations only (or set network.subnets in the config file)",
            )
    return policy


# The shared network every sandbox used before each had its own: what a sandbox of that time
# (state without subnets) was on, so that it can still be collected and destroyed.
_LEGACY_SUBNET, _LEGACY_SUBNET6 = "192.168.213.0/24", "2001:db8:213::/64"


def network_of(state: SandboxState) -> NetworkSpec:
    """The network the sandbox was created on, as `up` recorded it in its state."""
    subnet6 = state.subnet6 if state.subnet is not None else _LEGACY_SUBNET6
    return NetworkSpec(
        name=state.network,
        bridge=names.bridge(state.name),
        subnet=ipaddress.IPv4Network(state.subnet or _LEGACY_SUBNET),
        subnet6=ipaddress.IPv6Network(subnet6) if subnet6 else None,
        guest_mac=state.mac,
    )


@dataclass
class Context:
    """What every verb needs: settings, where state lives, how to report progress."""

    settings: Settings
    dirs: paths.Dirs
    reporter: Reporter = field(default_factory=QuietReporter)

    @property
    def store(self) -> StateStore:
        return StateStore(self.dirs.state)

    def pool_spec(self) -> PoolSpec:
        return PoolSpec(name=self.settings.pool.name, path=self.settings.pool.path)

    def image_name(self, override: str | None) -> str:
        if override:
            return override
        if self.settings.image.name:
            return self.settings.image.name
        return default_image_name(self.settings.image.packages)


def _seed_spec(name: str, host_key: tuple[str, str], client_pub: str, nameserver: str) -> SeedSpec:
    from .cloudinit import SeedSpec

    return SeedSpec(
        instance_id=f"sandbox-{name}-{uuid.uuid4().hex[:12]}",
        hostname=f"sandbox-{name}",
        host_key_private=host_key[0],
        host_key_public=host_key[1],
        authorized_key=client_pub,
        nameserver=nameserver,
    )


def up(
    ctx: Context,
    name: str,
    *,
    image: str | None = None,
    policy: EgressPolicy | None = None,
    capture: bool = False,
    xdebug_mode: xdebug.XdebugMode = xdebug.XdebugMode.TRACE,
) -> SandboxState:
    validate_name(name)
    policy = policy if policy is not None else make_policy(ctx)
    if capture and not is_local(ctx.settings.connect):
        raise UsageError(
            f"--pcap needs libvirt on this machine, not {ctx.settings.connect}",
            "run sandbox on the hypervisor host for a packet capture, or leave out --pcap",
        )
    store = ctx.store
    img = load_image(ctx.image_name(image), ctx.dirs.images)
    with store.lock(name):
        existing = store.load(name)
        if existing is not None:
            what = "exists" if existing.phase is Phase.READY else "was left half-built"
            raise ConflictError(
                f"sandbox {name!r} {what} (phase: {existing.phase.value})",
                f"use it, or run `sandbox destroy --name {name}` first",
            )
        with hv.connection(ctx.settings.connect) as conn:
            return _up_locked(ctx, conn, name, img, policy, capture, xdebug_mode)


def _up_locked(
    ctx: Context,
    conn: libvirt.virConnect,
    name: str,
    img: Image,
    policy: EgressPolicy,
    capture: bool,
    xdebug_mode: xdebug.XdebugMode,
) -> SandboxState:
    from .cloudinit import build_seed_iso
    from .guest import Endpoint, Guest, generate_ed25519, known_hosts_line, wait_for_banner

    store, settings, report = ctx.store, ctx.settings, ctx.reporter
    dom_name = names.domain(name)
    if hv.lookup_domain(conn, dom_name) is not None:
        raise ConflictError(
            f"a libvirt domain {dom_name} already exists without sandbox state",
            f"run `sandbox destroy --name {name}` to remove it",
        )
    accel = hv.resolve_accel(conn, settings.accel)
    vols = names.SandboxVolumes.for_sandbox(name)
    state = SandboxState(
        name=name,
        phase=Phase.CREATING,
        created=_now(),
        uri=settings.connect,
        domain=dom_name,
        pool=settings.pool.name,
        network=names.network(name),
        volumes=vols.all(),
        image=img.name,
        image_hash=img.manifest.recipe_hash,
        accel=accel,
        mac=_random_mac(),
        policy=policy.to_dict(),
        xdebug=xdebug_mode,
    )

    with ExitStack() as rollback:
        # Written before anything exists, so that `destroy` knows what to look for even if this
        # process is killed with SIGKILL in the middle.
        store.save(state)
        _forget_earlier_vm(logs_dir(ctx, name))
        rollback.callback(store.remove_secrets, name)
        client = generate_ed25519(f"sandbox-{name}-client")
        host = generate_ed25519(f"sandbox-{name}-host")
        key_path = store.write_secret(name, paths.CLIENT_KEY, client.private_openssh)
        store.write_secret(name, paths.CLIENT_KEY_PUB, client.public_line + "\n")
        store.write_secret(name, paths.HOST_KEY_PUB, host.public_line + "\n")
        state = dataclasses.replace(state, host_key=host.public_line)
        store.save(state)

        with store.global_lock():
            with report.step("preparing storage pool and base image"):
                pool = hv.ensure_pool(conn, ctx.pool_spec())
                base = hv.ensure_base_volumes(
                    conn,
                    pool,
                    image_name=img.name,
                    image_hash=img.manifest.recipe_hash,
                    disk=img.disk,
                    kernel=img.kernel,
                    initrd=img.initrd,
                    verify=lambda: verify_image(img),
                )
            rollback.callback(_remove_volumes, conn, pool, vols, store, name)
            with report.step(f"starting network {state.network}"):
                net, net_spec = hv.create_network(
                    conn,
                    lambda subnet, subnet6: NetworkSpec(
                        name=state.network,
                        bridge=names.bridge(name),
                        subnet=subnet,
                        subnet6=subnet6,
                        dns_hosts=resolver_hosts(policy.names),
                        guest_mac=state.mac,
                    ),
                    settings.network.subnets,
                    settings.network.subnets6,
                )
            rollback.callback(_remove_network, ctx, conn, state.network)
            address = str(net_spec.guest_ip)
            state = dataclasses.replace(
                state,
                ip=address,
                subnet=str(net_spec.subnet),
                subnet6=str(net_spec.subnet6) if net_spec.subnet6 else None,
            )
            store.save(state)
            _record_network(logs_dir(ctx, name), net_spec)
            ip6: tuple[str, ...] = ()
            if net_spec.guest_ip6 is not None:
                ip6 = (str(net_spec.guest_ip6), str(hostfilter.link_local(state.mac)))
            with report.step("creating disk overlay and cloud-init seed"):
                disk_path = hv.create_overlay(pool, vols.disk, base.disk)
                seed = build_seed_iso(
                    _seed_spec(
                        name,
                        (host.private_openssh, host.public_line),
                        client.public_line,
                        str(net_spec.gateway),
                    )
                )
                seed_path = str(hv.upload(conn, pool, vols.seed, data=seed).path())
            if guards_host(settings.connect):
                with report.step("closing the host's own services to the guests (nftables)"):
                    hostguard.apply(str(net.bridgeName()))
            with report.step("defining the host-side egress filter"):
                hostfilter.ensure_shared_filters(conn)
                hostfilter.define_filter(
                    conn,
                    hostfilter.render_filter(
                        name, policy, gateway=net_spec.gateway, gateway6=net_spec.gateway6
                    ),
                )
            rollback.callback(hostfilter.remove_filter, conn, name)
            spec = DomainSpec(
                name=dom_name,
                uuid=str(uuid.uuid4()),
                accel=accel,
                memory_mib=settings.memory_mib,
                vcpus=settings.vcpus,
                kernel=hv.volume_path(pool, base.kernel),
                initrd=hv.volume_path(pool, base.initrd),
                cmdline=KERNEL_CMDLINE,
                disk=disk_path,
                seed=seed_path,
                network=net_spec.name,
                mac=state.mac,
                console_log=os.path.join(hv.pool_path(pool), vols.console),
                sandbox=name,
                image=img.name,
                filterref=names.nwfilter(name),
                target_dev=names.target_dev(name),
                ip=address,
                ip6=ip6,
            )
            with report.step(f"starting VM {dom_name} ({accel.value})"):
                boot = Deadline(
                    settings.boot_timeout,
                    f"sandbox {name!r} to boot",
                    "the machine may be overloaded; raise boot_timeout in the config file",
                )
                dom = hv.start_domain(conn, render_domain(spec))
            rollback.callback(hv.destroy_domain, conn, dom_name)
            if guards_host(settings.connect):
                with report.step(f"recording the guest's flows on {spec.target_dev} (host side)"):
                    flows_pid = hostflows.start(str(spec.target_dev), logs_dir(ctx, name))
                rollback.callback(pcap.stop_pcap, flows_pid)
                state = dataclasses.replace(state, flows_pid=flows_pid)
                store.save(state)
            if capture:
                with report.step(f"capturing packets on {spec.target_dev}"):
                    logs = store.dir(name) / paths.LOGS_DIR
                    logs.mkdir(parents=True, exist_ok=True)
                    pid = pcap.start_pcap(str(spec.target_dev), logs / paths.PCAP_FILE)
                rollback.callback(pcap.stop_pcap, pid)
                state = dataclasses.replace(state, pcap_pid=pid)
                store.save(state)

        try:
            with report.step("waiting for the DHCP lease"):
                ip = hv.wait_for_lease(dom, state.mac, boot)
            if ip != address:
                raise HypervisorError(
                    f"the guest was leased {ip}, not the address kept for it ({address})",
                    f"another DHCP client holds {address}: destroy the sandbox and retry",
                )
            with report.step(f"waiting for sshd on {ip}"):
                wait_for_banner(ip, state.ssh_port, boot)
            with report.step("logging in with the pinned host key"):
                endpoint = Endpoint(ip, state.ssh_port, state.user, key_path, host.public_line)
                guest = Guest.connect(endpoint, boot)
            # Before `up` returns, so before any target software can run.
            with guest:
                with report.step(
                    f"loading the egress policy and xdebug ({xdebug_mode.value}) in the guest"
                ):
                    apply_guest_policy(
                        guest, policy, net_spec, files=xdebug.guest_files(xdebug_mode)
                    )
                with report.step("checking connection capture (eBPF)"):
                    # Its clock now: the firewall changes up to here are the push just done.
                    _mark_policy_push(logs_dir(ctx, name), monitor.start(guest))
        except SandboxError as exc:
            text = hv.console_text(conn, pool, vols.console)
            _save_console(store, name, text)
            tail = "\n".join(text.splitlines()[-25:]) or "(empty: the guest printed nothing yet)"
            exc.message += "\n--- last lines of the VM console ---\n" + tail
            raise

        store.write_secret(
            name, paths.KNOWN_HOSTS, known_hosts_line(ip, state.ssh_port, host.public_line) + "\n"
        )
        state = dataclasses.replace(state, phase=Phase.READY, boot_seconds=round(boot.elapsed(), 1))
        store.save(state)
        rollback.pop_all()
    return state


def files_script(files: dict[str, str]) -> list[str]:
    """Shell lines that write files into the guest (mode 0644), contents inline."""
    import base64

    lines = []
    for path, content in sorted(files.items()):
        encoded = base64.b64encode(content.encode()).decode()
        lines += [
            f"mkdir -p {shlex.quote(os.path.dirname(path))}",
            f"echo {encoded} | base64 -d > {shlex.quote(path)}",
            f"chmod 0644 {shlex.quote(path)}",
        ]
    return lines


def guest_rules(policy: EgressPolicy, net: NetworkSpec) -> dict[int, str]:
    """The filter tables the guest must hold for this policy, per IP version."""
    return {
        version: firewall.render_rules(
            policy, version=version, resolver=net.gateway, resolver6=net.gateway6
        )
        for version in (4, 6)
    }


def apply_guest_policy(
    guest: Guest, policy: EgressPolicy, net: NetworkSpec, *, files: dict[str, str] | None = None
) -> None:
    """Load the rules with iptables-restore (each family atomically), read them back and fail
    unless the kernel holds exactly what was meant; write `files` too. One SSH round trip: under
    TCG every extra channel costs a noticeable part of a second."""
    rules = guest_rules(policy, net)
    restore4, restore6 = (firewall.restore_commands(v)[0] for v in (4, 6))
    script = "\n".join(
        [
            "set -e",
            *files_script(files or {}),
            f"{shlex.join(restore4)} <<'SANDBOX_RULES_V4'",
            rules[4].rstrip("\n"),
            "SANDBOX_RULES_V4",
            f"{shlex.join(restore6)} <<'SANDBOX_RULES_V6'",
            rules[6].rstrip("\n"),
            "SANDBOX_RULES_V6",
            *firewall.save_script(),
        ]
    )
    for version, diff in firewall.mismatches(
        rules, guest.check(["sh", "-c", script], timeout=60)
    ).items():
        raise GuestError(
            f"the guest's IPv{version} firewall differs from the policy after loading it:\n"
            + "\n".join(diff),
            "something in the guest changed the rules; destroy the sandbox and report this",
        )


def _forget_earlier_vm(logs: Path) -> None:
    """The logs of a destroyed sandbox of the same name stay, but its capture cursor described
    that VM's capture: starting from it, the new VM would look like a
    reboot with records lost. Keep only the losses it recorded."""
    cursor_path = logs / paths.CAPTURE_CURSOR
    if cursor_path.exists():
        earlier = monitor.Cursor.load(cursor_path)
        atomic_write(cursor_path, monitor.Cursor(losses=earlier.losses).to_json() + "\n")


def _mark_policy_push(logs: Path, mark: monitor.Mark) -> None:
    """Keep `up`'s Mark in the capture cursor: the collections take the firewall changes up to
    it for the push of the policy, every later one for the guest's."""
    logs.mkdir(parents=True, exist_ok=True)
    cursor_path = logs / paths.CAPTURE_CURSOR
    cursor = monitor.Cursor.load(cursor_path)
    atomic_write(cursor_path, cursor.marked(mark).to_json() + "\n")


def _save_console(store: StateStore, name: str, text: str) -> None:
    if text:
        logs = store.dir(name) / paths.LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        (logs / paths.CONSOLE_LOG).write_text(text)


def _remove_volumes(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    vols: names.SandboxVolumes,
    store: StateStore,
    name: str,
) -> None:
    _save_console(store, name, hv.console_text(conn, pool, vols.console))
    for vol in (*vols.all(), *hv.console_rotations(pool, vols.console)):
        hv.delete_volume(pool, vol)


def _remove_network(ctx: Context, conn: libvirt.virConnect, network: str) -> bool:
    """Remove the sandbox's network (once its domain is gone), the host-side guard of its bridge
    and its resolver's query log (read by the final collection before), and the filters all
    sandboxes share once no sandbox is left. Takes the global lock."""
    with ctx.store.global_lock():
        bridge = hv.network_bridge(conn, network)
        removed = hv.remove_network_if_unused(conn, network)
        if removed and guards_host(str(conn.getURI())):
            if bridge is not None:
                hostguard.remove(bridge)
            log = dns_log_path(network)
            for path in (Path(log), dnslog.rotated_copy(log)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if not hv.sandbox_domains(conn):
            with contextlib.suppress(HypervisorError):  # the test:/// driver has no nwfilter
                hostfilter.remove_shared_filters(conn)
        return removed


# ---- destroy -------------------------------------------------------------------------------


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
                FINAL_COLLECT_SECONDS, lambda: _collect_locked(ctx, state, final=True)
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
        with hv.connection(uri) as conn:
            dom_name = names.domain(name)
            if hv.destroy_domain(conn, dom_name):
                removed.append(f"domain {dom_name}")
            if hostfilter.remove_filter(conn, name):
                removed.append(f"filter {names.nwfilter(name)}")
            pool = hv.active_pool(conn, pool_name)
            if pool is not None:
                vols = names.SandboxVolumes.for_sandbox(name)
                _save_console(store, name, hv.console_text(conn, pool, vols.console))
                # virtlogd rotates the console log (2 MiB a file, 3 kept): the old ones too.
                for vol in (*vols.all(), *hv.console_rotations(pool, vols.console)):
                    if hv.delete_volume(pool, vol):
                        removed.append(f"volume {vol}")
            if _remove_network(ctx, conn, network):
                removed.append(f"network {network}")
        secrets_dir = store.dir(name)
        present = [f for f in (*paths.SECRET_FILES, paths.STATE_FILE) if (secrets_dir / f).exists()]
        store.remove_secrets(name)
        if present:
            removed.append("state and keys")
    with contextlib.suppress(FileNotFoundError):
        store.file(name, paths.LOCK_FILE).unlink()
    return DestroyReport(name=name, removed=tuple(removed), warnings=tuple(warnings))


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


# ---- status --------------------------------------------------------------------------------


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
            dom = hv.lookup_domain(conn, names.domain(name))
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


# ---- guest access --------------------------------------------------------------------------


def ready_state(ctx: Context, name: str) -> SandboxState:
    validate_name(name)
    state = ctx.store.load(name)
    if state is None:
        raise NotFoundError(
            f"sandbox {name!r} does not exist", f"create it with `sandbox up --name {name}`"
        )
    if state.phase is not Phase.READY or not state.ip:
        raise GuestError(
            f"sandbox {name!r} is not ready (phase: {state.phase.value})",
            f"run `sandbox destroy --name {name}` and `sandbox up --name {name}` again",
        )
    return state


def endpoint(ctx: Context, state: SandboxState) -> Endpoint:
    from .guest import Endpoint

    assert state.ip is not None
    return Endpoint(
        host=state.ip,
        port=state.ssh_port,
        user=state.user,
        client_key=ctx.store.file(state.name, paths.CLIENT_KEY),
        host_key=state.host_key,
    )


@contextlib.contextmanager
def open_guest(ctx: Context, name: str, timeout: float = 30.0) -> Iterator[Guest]:
    state = ready_state(ctx, name)
    deadline = Deadline(
        timeout,
        f"SSH to sandbox {name!r} at {state.ip}",
        f"check `sandbox status --name {name}`; the VM may have stopped",
    )
    from .guest import Guest

    with Guest.connect(endpoint(ctx, state), deadline) as guest:
        yield guest


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
) -> RunOutcome:
    """`sandbox run`: the target software in the guest, then its records brought home and tied
    to it. Local files are checked before anything is sent to the guest."""
    runs.plan(request)
    state = runnable_state(ctx, name)
    logs = logs_dir(ctx, name)
    expected = guest_rules(EgressPolicy.from_dict(state.policy), network_of(state))
    with open_guest(ctx, name) as guest:
        with collecting_meanwhile(ctx, name, on_warning, guest):
            result = runs.execute(
                guest,
                request,
                logs=logs,
                expected_rules=expected,
                default_mode=state.xdebug,
                stdout=stdout,
                stderr=stderr,
                on_warning=on_warning,
                limits=ctx.settings.limits,
            )
        # The run's last records are complete once the settle window has passed since its end
        # (younger halves wait for the next collection): wait out the rest of it, so that
        # `sandbox logs` right after `run` shows everything the run did.
        time.sleep(max(0.0, monitor.SETTLE_SECONDS - (time.monotonic() - result.finished)))
        collected = collect_quietly(ctx, name, on_warning, guest=guest, after_run=True)
    return RunOutcome(result, collected)


def runnable_state(ctx: Context, name: str) -> SandboxState:
    """The state of a sandbox that can take a run: up, and its policy loaded."""
    validate_name(name)
    state = ctx.store.load(name)
    if state is not None and state.phase is Phase.CREATING:
        raise GuestError(
            f"sandbox {name!r} is still being created: its egress policy is not applied yet",
            f"wait for `sandbox up --name {name}` to finish (or destroy it if that was "
            "interrupted), then run again",
        )
    return ready_state(ctx, name)


def is_local(uri: str) -> bool:
    """A URI whose hypervisor runs on this machine (no host part)."""
    from urllib.parse import urlparse

    return not urlparse(uri).netloc


def guards_host(uri: str) -> bool:
    """Whether this process can guard the hypervisor host's own services (hostguard.py): a local
    QEMU hypervisor, whose bridge is in this network namespace (the test:/// driver has none)."""
    from urllib.parse import urlparse

    return is_local(uri) and urlparse(uri).scheme.split("+")[0] == "qemu"


def ssh_argv(ctx: Context, name: str, command: Sequence[str]) -> list[str]:
    """An OpenSSH command line that trusts only the pinned host key and gives the guest nothing
    of the user's: no ssh config (-F /dev/null: no ProxyCommand, LocalCommand, forwardings or
    control sockets from ~/.ssh/config), no agent (-a, and IdentityAgent none), no X11 (-x)."""
    state = ready_state(ctx, name)
    store = ctx.store
    known_hosts: Path = store.file(name, paths.KNOWN_HOSTS)
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
        "-p",
        str(state.ssh_port),
        f"{state.user}@{state.ip}",
        *command,
    ]


# ---- policy show ---------------------------------------------------------------------------


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


# ---- connection log ------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectReport:
    new_attempts: int
    new_dns: int
    warnings: tuple[str, ...]


def logs_dir(ctx: Context, name: str) -> Path:
    return ctx.store.dir(name) / paths.LOGS_DIR


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
        return _collect_locked(ctx, state, final=False, guest=guest, after_run=after_run)


def _collect_locked(
    ctx: Context,
    state: SandboxState,
    *,
    final: bool,
    guest: Guest | None = None,
    after_run: bool = False,
) -> CollectReport:
    from .guest import Guest

    logs = logs_dir(ctx, state.name)
    logs.mkdir(parents=True, exist_ok=True)
    cursor_path = logs / paths.CAPTURE_CURSOR
    cursor = monitor.Cursor.load(cursor_path)
    policy = EgressPolicy.from_dict(state.policy)

    def gather(g: Guest) -> tuple[monitor.Collected, list[Attempt]]:
        collected = monitor.collect_full(g, cursor, final=final)
        changes = [a for a in collected.attempts if a.verdict is Verdict.TAMPER and a.pid]
        expected = guest_rules(policy, network_of(state))
        return collected, _firewall_tamper(g, expected, logs, changes)

    if guest is not None:
        collected, tampered = gather(guest)
    else:
        deadline = Deadline(60, f"SSH to sandbox {state.name!r} to collect its records")
        with Guest.connect(endpoint(ctx, state), deadline) as own:
            collected, tampered = gather(own)
    collected = dataclasses.replace(collected, attempts=collected.attempts + tampered)
    queries = _dns_queries(ctx, state)
    new_dns = logview.append_dns(logs, queries)
    known_dns: list[DnsQuery] = logview.read_dns(logs)
    attempts: list[Attempt] = monitor.attach_dns_names(
        [_host_verdict(a, policy) for a in collected.attempts], known_dns
    )
    inflate = ctx.settings.limits.decompressed
    new_attempts = logview.append_attempts(logs, runs.annotate(attempts, logs, limit=inflate))
    if after_run:
        # Attempts collected while the run was still going (a `logs --follow` beside it) could
        # not be tied to its trace then; now its trace is here.
        logview.rewrite_attempts(logs, lambda stored: runs.annotate(stored, logs, limit=inflate))
    atomic_write(cursor_path, collected.cursor.to_json() + "\n")
    return CollectReport(new_attempts, new_dns, tuple(collected.warnings))


def readback_state(expected: dict[int, str], printed: str) -> tuple[str, dict[int, list[str]]]:
    """("intact" or "changed DIGEST", what differs) for the guest's firewall as printed by
    firewall.save_script. The digest is of what differs, not of the whole output: its chain
    counters move at every collection, and one change would be a new row each time."""
    diff = firewall.mismatches(expected, printed)
    if not diff:
        return "intact", diff
    return f"changed {hashlib.sha256(repr(sorted(diff.items())).encode()).hexdigest()[:16]}", diff


def _firewall_tamper(
    guest: Guest, expected: dict[int, str], logs: Path, changers: Sequence[Attempt] = ()
) -> list[Attempt]:
    """A tamper row when the guest's firewall no longer is (or is again) what `up` loaded, once
    per change: the last state seen is kept in logs/ (paths.FIREWALL_STATE). `changers`: this
    collection's rows of the changes the capture saw, each with its process: the row names
    them (they came between the last collection and this one)."""
    printed = guest.check(["sh", "-c", "\n".join(firewall.save_script())], timeout=30)
    now_state, diff = readback_state(expected, printed)
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


def _host_verdict(attempt: Attempt, policy: EgressPolicy) -> Attempt:
    """An attempt the guest's firewall never logged gets the host-side filter's verdict."""
    if attempt.verdict is Verdict.UNLOGGED and not policy.allows(
        attempt.proto, attempt.dst, attempt.dport
    ):
        return dataclasses.replace(attempt, verdict=Verdict.HOST_BLOCKED)
    return attempt


def _dns_queries(ctx: Context, state: SandboxState) -> list[DnsQuery]:
    """The sandbox network resolver's log, for this guest's addresses, since it was created.
    Only where libvirt runs on this machine: the log is a file on the hypervisor host."""
    if not is_local(state.uri):
        return []
    clients = [state.ip] if state.ip else []
    with contextlib.suppress(SandboxError), hv.connection(state.uri) as conn:
        dom = hv.lookup_domain(conn, state.domain)
        if dom is not None:
            clients = sorted(set(clients) | set(hv.domain_addresses(dom)))
    since = dt.datetime.fromisoformat(state.created)
    # Read from where this sandbox's last collection ended, not the log whole.
    cursor_path = logs_dir(ctx, state.name) / paths.DNS_CURSOR
    cursor = dnslog.LogCursor.load(cursor_path)
    log = network_of(state).dns_log
    queries, after = dnslog.read_for(log, clients, since, cursor)
    atomic_write(cursor_path, after.to_json() + "\n")
    dnslog.rotate_if_large(log)
    return queries


def sockets(ctx: Context, name: str) -> list[logview.Socket]:
    """The guest's current sockets, like the recipe's `lsof -i -nP`."""
    with open_guest(ctx, name) as guest:
        out: list[bytes] = []
        code = guest.run(logview.sockets_command(), stdout=out.append, timeout=30)
    text = b"".join(out).decode(errors="replace")
    if code not in (0, 1):
        raise GuestError(f"lsof in the guest failed (exit {code})", "check `sandbox status`")
    return logview.parse_sockets(text)


def recorded_losses(ctx: Context, name: str) -> list[str]:
    """Every loss a collection ever detected for this sandbox (kept in the capture cursor)."""
    return list(monitor.Cursor.load(logs_dir(ctx, name) / paths.CAPTURE_CURSOR).losses)


@dataclass(frozen=True)
class HostFlowReport:
    flows: tuple[hostflows.Flow, ...]
    unrecorded: tuple[hostflows.Unrecorded, ...]


def _record_network(logs: Path, net: NetworkSpec) -> None:
    """Keep the network's resolver addresses with the logs: they outlive the sandbox's state."""
    record = {"resolver": [str(net.gateway), *([str(net.gateway6)] if net.gateway6 else [])]}
    atomic_write(logs / paths.NETWORK_RECORD, json.dumps(record) + "\n")


def _resolver_addresses(logs: Path) -> list[str]:
    try:
        record = jsontext.object_or_none((logs / paths.NETWORK_RECORD).read_text()) or {}
        return [str(ipaddress.ip_address(a)) for a in record["resolver"]]
    except (OSError, ValueError, KeyError, TypeError):
        # Logs of a sandbox from before each had its own network: the shared one's gateways.
        legacy = NetworkSpec(
            "", "", ipaddress.IPv4Network(_LEGACY_SUBNET), ipaddress.IPv6Network(_LEGACY_SUBNET6)
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

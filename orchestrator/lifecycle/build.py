"""`sandbox up`: the effective policy, then the sandbox built as named steps, each registering
its own rollback, so that a failure anywhere leaves nothing behind."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import secrets
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from orchestrator import names, paths
from orchestrator.capture import hostflows, monitor, pcap
from orchestrator.egress import guestfw, hostfilter, hostguard
from orchestrator.egress.policy import (
    Blocked,
    EgressPolicy,
    Learn,
    build_policy,
    check_wildcards,
    learn_policy,
    load_policy_file,
)
from orchestrator.errors import (
    ConflictError,
    HypervisorError,
    SandboxError,
    UsageError,
)
from orchestrator.files import atomic_write
from orchestrator.lifecycle import hosts, resources, teardown, warm
from orchestrator.lifecycle.context import (
    Context,
    guards_host,
    guards_remote_host,
    logs_dir,
)
from orchestrator.lifecycle.resources import remove_network, remove_volumes, save_console
from orchestrator.run import xdebug
from orchestrator.state import Phase, SandboxState, validate_name
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import (
    DomainSpec,
    InterfaceSpec,
    NetworkSpec,
    render_domain,
    render_interface,
    render_metadata,
    resolver_hosts,
)
from orchestrator.vm.images import (
    KERNEL_CMDLINE,
    Image,
    load_image,
)
from orchestrator.waits import Deadline

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    from orchestrator.vm.cloudinit import SeedSpec
    from orchestrator.vm.guest import KeyPair
    from orchestrator.vm.hostfiles import HostFiles


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
    learn: Learn = Learn.OFF,
    sinkhole: bool | None = None,
) -> EgressPolicy:
    """The effective policy: the config file's allow list, then the policy file, then the
    flags. Host names are resolved here, on the host, before anything is created. `learn`
    widens it to every outside destination (policy.learn_policy)."""
    entries = [*ctx.settings.allow]
    file_dns: bool | None = None
    file_blocked: Blocked | None = None
    file_sinkhole: bool | None = None
    if policy_file is not None:
        pf = load_policy_file(policy_file)
        entries += pf.allow
        file_dns, file_blocked, file_sinkhole = pf.dns, pf.blocked, pf.sinkhole
    entries += allow
    policy = build_policy(
        entries,
        dns=dns if dns is not None else (file_dns if file_dns is not None else True),
        blocked=blocked or file_blocked or Blocked.REJECT,
        sinkhole=bool(sinkhole if sinkhole is not None else file_sinkhole),
    )
    if policy.sinkhole and not policy.dns:
        raise UsageError(
            "sinkhole mode answers names at the sandbox's resolver, and --no-dns turns it off",
            "drop --no-dns (or dns: false in the policy file), or drop --sinkhole",
        )
    check_wildcards(policy, learn)
    net = ctx.settings.network
    for entry in policy.allow:
        own = net.subnets if entry.version == 4 else net.subnets6
        if own is not None and entry.network.overlaps(own):
            raise UsageError(
                f"--allow {entry.source!r} overlaps the sandbox networks' range {own}",
                "sandboxes may not reach each other or the host's side of their network; "
                "allow outside destinations only (or set network.subnets in the config file)",
            )
    own_ranges = [r for r in (net.subnets, net.subnets6) if r is not None]
    return learn_policy(policy, own_ranges, mode=learn)


def host_resolvers(text: str) -> tuple[str, ...]:
    """The nameserver addresses of a resolv.conf."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError:
                continue
    return tuple(found)


def learn_upstream(configured: tuple[str, ...] | None) -> tuple[str, ...]:
    """Where a learn-mode sandbox's resolver forwards names: the config's learn_resolvers, else
    the host's own resolvers."""
    if configured is not None:
        return configured
    try:
        return host_resolvers(Path("/etc/resolv.conf").read_text())
    except OSError:
        return ()


def hostname(name: str) -> str:
    return f"sandbox-{name}"


def _warm_identity(name: str, nameserver: str) -> tuple[dict[str, str], list[list[str]]]:
    """What a warm VM learns when a sandbox takes it (files, commands): the sandbox's hostname
    and its network's resolver, which a cold boot gets from its seed."""
    from orchestrator.vm.cloudinit import resolv_conf

    host = hostname(name)
    files = {
        "/etc/hostname": host + "\n",
        "/etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {host}\n::1 localhost ip6-localhost\n",
        "/etc/resolv.conf": resolv_conf(nameserver),
    }
    return files, [["hostname", host]]


def _seed_spec(
    name: str,
    host_key: tuple[str, str],
    client_pub: str,
    nameserver: str,
    rules: Mapping[int, str],
    guest_files: Mapping[str, str],
) -> SeedSpec:
    from orchestrator.vm.cloudinit import POLICY_FILES, SeedSpec

    return SeedSpec(
        instance_id=f"sandbox-{name}-{uuid.uuid4().hex[:12]}",
        hostname=hostname(name),
        host_key_private=host_key[0],
        host_key_public=host_key[1],
        authorized_key=client_pub,
        nameserver=nameserver,
        files=tuple((POLICY_FILES[version], rules[version]) for version in sorted(rules)),
        guest_files=tuple(sorted(guest_files.items())),
    )


def up(
    ctx: Context,
    name: str,
    *,
    image: str | None = None,
    policy: EgressPolicy | None = None,
    capture: bool = False,
    xdebug_mode: xdebug.XdebugMode = xdebug.XdebugMode.TRACE,
    warm_start: bool = True,
) -> SandboxState:
    """Build and start a sandbox: from a warm VM when one fits (`warm_start`), else cold."""
    validate_name(name)
    policy = policy if policy is not None else make_policy(ctx)
    store = ctx.store
    img = load_image(ctx.image_name(image), ctx.dirs.images)
    with store.lock(name, timeout=teardown.lock_wait(store, name)):
        existing = store.load(name)
        if existing is not None and existing.phase is Phase.DESTROYING:
            # A detached destroy whose removal did not finish: finish it first.
            teardown.teardown_locked(ctx, name, existing)
            existing = None
        if existing is not None:
            what = "exists" if existing.phase is Phase.READY else "was left half-built"
            raise ConflictError(
                f"sandbox {name!r} {what} (phase: {existing.phase.value})",
                f"use it, or run `sandbox destroy --name {name}` first",
            )
        uri = hosts.place(
            ctx,
            name,
            fits=_fits(policy),
            prefer=warm.hosts_with_fit(ctx, img) if warm_start else (),
        )
        if capture:
            hosts.require_capture(uri)
        # From here on the sandbox's settings name its one host: its state records it, and a
        # warm VM fits only if it is on that host.
        here = dataclasses.replace(ctx, settings=ctx.settings.on_host(uri))
        with hv.connection(uri) as conn:
            state = _up_locked(here, conn, name, img, policy, capture, xdebug_mode, warm_start)
    if here.settings.warm and state.warm_id is not None:
        warm.refill_in_background(here, image)
    return state


def _fits(policy: EgressPolicy) -> Callable[[str], bool] | None:
    """Which libvirt hosts can take a sandbox with `policy` (hosts.place), None: any. Pure."""
    if policy.wildcards or policy.sinkhole:
        return hosts.runs_host_services  # their helpers run beside the network
    return None


def new_state(
    ctx: Context,
    conn: libvirt.virConnect,
    name: str,
    img: Image,
    policy: EgressPolicy,
    xdebug_mode: xdebug.XdebugMode,
) -> SandboxState:
    """The state of a sandbox about to be built: every name derived, nothing created yet."""
    dom_name = names.domain(name)
    if hv.lookup_domain(conn, dom_name) is not None:
        raise ConflictError(
            f"a libvirt domain {dom_name} already exists without sandbox state",
            f"run `sandbox destroy --name {name}` to remove it",
        )
    return SandboxState(
        name=name,
        phase=Phase.CREATING,
        created=_now(),
        uri=ctx.settings.connect,
        domain=dom_name,
        pool=ctx.settings.pool.name,
        network=names.network(name),
        volumes=names.SandboxVolumes.for_sandbox(name).all(),
        image=img.name,
        image_hash=img.manifest.recipe_hash,
        accel=hv.resolve_accel(conn, ctx.settings.accel),
        mac=_random_mac(),
        policy=policy.to_dict(),
        xdebug=xdebug_mode,
    )


def _up_locked(
    ctx: Context,
    conn: libvirt.virConnect,
    name: str,
    img: Image,
    policy: EgressPolicy,
    capture: bool,
    xdebug_mode: xdebug.XdebugMode,
    warm_start: bool,
) -> SandboxState:
    state = new_state(ctx, conn, name, img, policy, xdebug_mode)
    with ExitStack() as rollback:
        build = Build(ctx, conn, img, policy, rollback, state)
        build.record_intent()
        taken = build.take_warm() if warm_start else False
        if not taken:
            build.make_keys()
        with ctx.store.global_lock():
            build.prepare_storage()
            build.start_network()
            if not taken:
                build.make_disks()
            build.guard_host()
            build.define_host_filter()
            if taken:
                build.plug_in()
            else:
                build.start_vm()
            build.go_online(capture)
        build.log_in_and_push(xdebug_mode)
        build.mark_ready()
        rollback.pop_all()
    return build.state


@dataclass
class Build:
    """One `up` in progress: its steps in order, each saving what it made into the state and
    registering its own undo on `rollback` (unwound if a later step fails)."""

    ctx: Context
    conn: libvirt.virConnect
    img: Image
    policy: EgressPolicy
    rollback: ExitStack
    state: SandboxState
    vols: names.SandboxVolumes = field(init=False)
    # Filled in by the steps, in this order.
    client: KeyPair = field(init=False)
    host: KeyPair = field(init=False)
    key_path: Path = field(init=False)
    pool: libvirt.virStoragePool = field(init=False)
    base: names.BaseVolumes = field(init=False)
    net: libvirt.virNetwork = field(init=False)
    net_spec: NetworkSpec = field(init=False)
    disk_path: str = field(init=False)
    seed_path: str = field(init=False)
    spec: DomainSpec = field(init=False)
    dom: libvirt.virDomain = field(init=False)
    iface: InterfaceSpec | None = field(init=False, default=None)
    boot: Deadline = field(init=False)

    def __post_init__(self) -> None:
        self.vols = names.SandboxVolumes.for_sandbox(self.state.name)

    @property
    def name(self) -> str:
        return self.state.name

    def _save(self, **changes: Any) -> None:
        self.state = dataclasses.replace(self.state, **changes)
        self.ctx.store.save(self.state)

    def record_intent(self) -> None:
        # Written before anything exists, so that `destroy` knows what to look for even if this
        # process is killed with SIGKILL in the middle.
        self.ctx.store.save(self.state)
        _forget_earlier_vm(logs_dir(self.ctx, self.name))

    def make_keys(self) -> None:
        from orchestrator.vm.guest import generate_ed25519

        store = self.ctx.store
        self.rollback.callback(store.remove_secrets, self.name)
        self.client = generate_ed25519(f"sandbox-{self.name}-client")
        self.host = generate_ed25519(f"sandbox-{self.name}-host")
        self.key_path = store.write_secret(self.name, paths.CLIENT_KEY, self.client.private_openssh)
        store.write_secret(self.name, paths.CLIENT_KEY_PUB, self.client.public_line + "\n")
        store.write_secret(self.name, paths.HOST_KEY_PUB, self.host.public_line + "\n")
        self._save(host_key=self.host.public_line)

    def take_warm(self) -> bool:
        """Take a warm VM that fits, if there is one: its keys become the sandbox's, its domain
        and volumes are recorded as the sandbox's (lifecycle/warm.py)."""
        from orchestrator.vm.guest import KeyPair

        with warm.locked(self.ctx):
            taken = warm.take(self.ctx, self.conn, self.img, self.state.accel)
            if taken is None:
                return False
            vm, store = taken.vm, self.ctx.store
            self.rollback.callback(store.remove_secrets, self.name)
            # The VM and its volumes: a failure before prepare_storage (which registers the
            # volumes' removal) must not leave them behind.
            self.rollback.callback(warm.discard, self.ctx, self.conn, vm)
            self.client = KeyPair(taken.client_key, vm.client_key)
            self.host = KeyPair("", vm.host_key)
            self.key_path = store.write_secret(self.name, paths.CLIENT_KEY, taken.client_key)
            store.write_secret(self.name, paths.CLIENT_KEY_PUB, vm.client_key + "\n")
            store.write_secret(self.name, paths.HOST_KEY_PUB, vm.host_key + "\n")
            self.vols = names.SandboxVolumes.for_domain(vm.domain)
            self._save(
                host_key=vm.host_key, domain=vm.domain, volumes=self.vols.all(), warm_id=vm.id
            )
            # Recorded as this sandbox's now, in its state and in the domain's metadata (which
            # is also what keeps a concurrent fill from taking it for an orphan): `destroy` and
            # `list` find it through either.
            dom = hv.lookup_domain(self.conn, vm.domain)
            if dom is not None:
                hv.set_sandbox_metadata(dom, render_metadata(self.name, self.img.name, vm.id))
            warm.forget(self.ctx, vm)
        return True

    def prepare_storage(self) -> None:
        img = self.img
        with self.ctx.reporter.step("preparing storage pool and base image"):
            self.pool, self.base = resources.prepare_storage(self.ctx, self.conn, img)
        self.rollback.callback(
            remove_volumes, self.conn, self.pool, self.vols, self.ctx.store, self.name
        )

    def start_network(self) -> None:
        settings, name = self.ctx.settings, self.name
        resolver: socket.socket | None = None
        wildcard_port: int | None = None
        if self.policy.wildcards:
            from orchestrator.egress import wildcards

            if guards_host(self.state.uri):
                resolver = self.rollback.enter_context(wildcards.bind())
                wildcard_port = resolver.getsockname()[1]
            elif guards_remote_host(self.state.uri):
                wildcard_port = self._start_remote_relay()
            else:
                raise UsageError(
                    "wildcard entries need a login to the libvirt host (what their resolver "
                    "hands out is added to that host's nftables, beside the network), and "
                    f"{self.state.uri} gives none",
                    "connect with qemu+ssh://root@HOST/system, or allow the names one by one "
                    "(example.org:443)",
                )
        with self.ctx.reporter.step(f"starting network {self.state.network}"):
            self.net, self.net_spec = hv.create_network(
                self.conn,
                lambda subnet, subnet6: NetworkSpec(
                    name=self.state.network,
                    bridge=names.bridge(name),
                    subnet=subnet,
                    subnet6=subnet6,
                    dns_hosts=resolver_hosts(self.policy.names),
                    guest_mac=self.state.mac,
                    learn_upstream=learn_upstream(
                        settings.network.resolvers
                        if settings.network.learn_resolvers is None
                        else settings.network.learn_resolvers
                    )
                    if self.policy.learn is Learn.ALLOW_ALL
                    else None,
                    sinkhole=self.policy.sinkhole,
                    wildcard_domains=tuple(sorted({w.domain for w in self.policy.wildcards})),
                    wildcard_port=wildcard_port,
                ),
                settings.network.subnets,
                settings.network.subnets6,
            )
        self.rollback.callback(remove_network, self.ctx, self.conn, self.state.network)
        spec = self.net_spec
        self._save(
            ip=str(spec.guest_ip),
            subnet=str(spec.subnet),
            subnet6=str(spec.subnet6) if spec.subnet6 else None,
        )
        _record_network(logs_dir(self.ctx, name), spec)
        if wildcard_port is not None:
            self._start_wildcard_resolver(resolver)
        if self.policy.learn is not Learn.OFF:
            # Kept with the logs (past destroy): every `logs` and `report` of them says so.
            atomic_write(
                logs_dir(self.ctx, name) / paths.LEARN_RECORD,
                json.dumps({"learn": self.policy.learn.value, "since": self.state.created}) + "\n",
            )

    def _start_remote_relay(self) -> int:
        """The wildcard resolver's relay on the remote libvirt host (egress/remoterelay.py),
        started before the network is defined: its UDP port there, which the network's dnsmasq
        forwards the wildcard domains to."""
        from orchestrator.egress import remoterelay
        from orchestrator.vm import hostfiles

        with hostfiles.on_host(self.state.uri) as host:
            where = self._remote_dir(host)
            # Before the start: a login lost halfway may leave one running that no pid names.
            self.rollback.callback(remoterelay.discard, self.state.uri, where)
            with self.ctx.reporter.step("starting the wildcard relay on the libvirt host"):
                started = remoterelay.start(host, where)
        return started.port

    def _start_wildcard_resolver(self, sock: socket.socket | None) -> None:
        """The wildcard resolver, on this machine: on `sock` for a network here; else attached
        to the relay on the remote libvirt host (`sock` None)."""
        from orchestrator.egress import wildcards

        spec, state = self.net_spec, self.state
        remote = None
        if sock is None:
            assert state.remote_dir is not None  # saved by _remote_dir before the relay started
            remote = wildcards.Remote(uri=state.uri, where=state.remote_dir)
        config = wildcards.Config(
            bridge=spec.bridge,
            wildcards=self.policy.wildcards,
            upstream=learn_upstream(self.ctx.settings.network.resolvers),
            guest=wildcards.Guest(
                host=str(spec.guest_ip),
                port=state.ssh_port,
                user=state.user,
                client_key=str(self.ctx.store.file(self.name, paths.CLIENT_KEY)),
                host_key=state.host_key,
            ),
            remote=remote,
        )
        domains = ", ".join(w.describe() for w in self.policy.wildcards)
        with self.ctx.reporter.step(f"starting the resolver of {domains}"):
            pid = wildcards.start(sock, config, logs_dir(self.ctx, self.name))
        self.rollback.callback(wildcards.stop, pid)
        self._save(wildcard_pid=pid)

    def make_disks(self) -> None:
        from orchestrator.vm.cloudinit import build_seed_iso

        with self.ctx.reporter.step("creating disk overlay and cloud-init seed"):
            self.disk_path = hv.create_overlay(self.pool, self.vols.disk, self.base.disk)
            seed = build_seed_iso(
                _seed_spec(
                    self.name,
                    (self.host.private_openssh, self.host.public_line),
                    self.client.public_line,
                    str(self.net_spec.gateway),
                    guestfw.render(self.policy, self.net_spec),
                    xdebug.guest_files(self.state.xdebug),
                )
            )
            self.seed_path = str(hv.upload(self.conn, self.pool, self.vols.seed, data=seed).path())

    def guard_host(self) -> None:
        # Removed with the network (remove_network), whose rollback is registered already.
        if guards_remote_host(self.state.uri):
            self._guard_remote_host()
            return
        if not guards_host(self.state.uri):
            if self.policy.sinkhole:
                raise UsageError(
                    "sinkhole mode needs a login to the libvirt host (its sinkhole and nftables "
                    f"redirect run beside the sandbox's network), and {self.state.uri} gives none",
                    "connect with qemu+ssh://root@HOST/system, or drop --sinkhole",
                )
            return
        target: hostguard.Sinkhole | None = None
        if self.policy.sinkhole:
            # Imported only here: its packet parsing costs every other `up` a tenth of a second.
            from orchestrator.egress import sinkhole

            gateway = self.net_spec.gateway
            with self.ctx.reporter.step(f"starting the sinkhole on {gateway}"):
                started = sinkhole.start(gateway, logs_dir(self.ctx, self.name))
            self.rollback.callback(sinkhole.stop, started.pid)
            self._save(sinkhole_pid=started.pid)
            target = hostguard.Sinkhole(str(gateway), started.port)
        with self.ctx.reporter.step("closing the host's own services to the guests (nftables)"):
            hostguard.apply(
                str(self.net.bridgeName()), sinkhole=target, wildcards=self._wildcard_guard()
            )

    def _wildcard_guard(self) -> hostguard.Wildcards | None:
        """The guard's part for wildcard entries: their ports closed on the bridge but to the
        addresses handed out (and the allow list)."""
        if not self.policy.wildcards:
            return None
        return hostguard.Wildcards(
            ports=tuple((p, w.port) for w in self.policy.wildcards for p in w.protos),
            allow=self.policy.allow,
            reject=self.policy.blocked is Blocked.REJECT,
        )

    def _guard_remote_host(self) -> None:
        """guard_host on a remote libvirt host, over one SSH login: in sinkhole mode the
        sinkhole started there first (egress/remotesinkhole.py), then the guard loaded with nft."""
        from orchestrator.vm import hostfiles

        target: hostguard.Sinkhole | None = None
        with hostfiles.on_host(self.state.uri) as host:
            if self.policy.sinkhole:
                from orchestrator.egress import remotesinkhole

                gateway = str(self.net_spec.gateway)
                where = self._remote_dir(host)
                # Registered before the start: a failure halfway (the SSH login lost) may leave
                # one running that no pid names; the undo finds it in the directory.
                self.rollback.callback(remotesinkhole.discard, self.state.uri, where)
                with self.ctx.reporter.step(f"starting the sinkhole on {gateway} (libvirt host)"):
                    started = remotesinkhole.start(host, where, gateway)
                self._save(remote_sinkhole_pid=started.pid)
                target = hostguard.Sinkhole(gateway, started.port)
            with self.ctx.reporter.step(
                "closing the libvirt host's own services to the guests (nftables, over SSH)"
            ):
                hostguard.apply(
                    str(self.net.bridgeName()),
                    sinkhole=target,
                    host=host,
                    wildcards=self._wildcard_guard(),
                )

    def _remote_dir(self, host: HostFiles) -> str:
        """The sandbox's directory on the remote libvirt host (remotecapture.directory), for its
        host-side records and its sinkhole: on first use, its name saved and its removal
        registered before anything is there (a failure halfway, or a killed `up`, leaves
        destroy the name of what to remove), and what an earlier sandbox of this name whose
        `up` was killed left there stopped and removed."""
        from orchestrator.capture import remotecapture as remote

        if self.state.remote_dir is not None:
            return self.state.remote_dir
        where = remote.directory(self.name)
        self._save(remote_dir=where)
        self.rollback.callback(remote.discard, self.state.uri, where)
        # Its sinkhole too: stopped by its path, the directory's (a few milliseconds on the
        # login that is open anyway).
        from orchestrator.egress import remoterelay, remotesinkhole

        remotesinkhole.stop(host, where)
        remoterelay.stop(host, where)
        remote.clear(host, where)
        return where

    def define_host_filter(self) -> None:
        spec = self.net_spec
        with self.ctx.reporter.step("defining the host-side egress filter"):
            hostfilter.ensure_shared_filters(self.conn)
            hostfilter.define_filter(
                self.conn,
                hostfilter.render_filter(
                    self.name,
                    self.policy.with_sinkhole(spec.gateway).with_wildcard_ports(),
                    gateway=spec.gateway,
                    gateway6=spec.gateway6,
                ),
            )
        self.rollback.callback(hostfilter.remove_filter, self.conn, self.name)

    def start_vm(self, *, host_filter: bool = True) -> None:
        """Define and start the domain. `host_filter=False` is the benchmark's bare boot: the
        same VM without the nwfilter on its interface."""
        settings, state, name = self.ctx.settings, self.state, self.name
        assert state.ip is not None
        self.spec = DomainSpec(
            name=state.domain,
            uuid=str(uuid.uuid4()),
            accel=state.accel,
            memory_mib=settings.memory_mib,
            vcpus=settings.vcpus,
            kernel=hv.volume_path(self.pool, self.base.kernel),
            initrd=hv.volume_path(self.pool, self.base.initrd),
            cmdline=KERNEL_CMDLINE,
            disk=self.disk_path,
            seed=self.seed_path,
            network=self.net_spec.name,
            mac=state.mac,
            console_log=os.path.join(hv.pool_path(self.pool), self.vols.console),
            capture_log=os.path.join(hv.pool_path(self.pool), self.vols.capture),
            sandbox=name,
            image=self.img.name,
            filterref=names.nwfilter(name) if host_filter else None,
            target_dev=names.target_dev(name),
            ip=state.ip,
            ip6=self._ip6(),
        )
        with self.ctx.reporter.step(f"starting VM {state.domain} ({state.accel.value})"):
            self.boot = Deadline(
                settings.boot_timeout,
                f"sandbox {name!r} to boot",
                "the machine may be overloaded; raise boot_timeout in the config file",
            )
            if not host_filter:
                self.dom = hv.start_domain(self.conn, render_domain(self.spec))
            else:
                # Started with its link down and without its filter, which go_online adds while
                # the kernel boots: libvirt takes ~1 s to instantiate a filter, which would delay
                # QEMU's start (docs/platform.md#warm-vms-an-interface-plugged-in-later).
                unfiltered = dataclasses.replace(self.spec, filterref=None, link_up=False)
                self.dom = hv.start_domain(self.conn, render_domain(unfiltered))
                self.iface = self.spec.interface()
        self.rollback.callback(hv.destroy_domain, self.conn, state.domain)

    def plug_in(self) -> None:
        """A warm VM: plug in its interface (fresh MAC, the sandbox's network and host
        filter): the warm counterpart of `start_vm`."""
        state, name = self.state, self.name
        dom = hv.lookup_domain(self.conn, state.domain)
        if dom is None or not hv.domain_running(dom):
            raise HypervisorError(
                f"the warm VM {state.domain} stopped before it could be used",
                "retry `sandbox up` (it boots cold when no warm VM is left)",
            )
        self.dom = dom
        assert state.ip is not None and state.warm_id is not None
        iface = InterfaceSpec(
            network=self.net_spec.name,
            mac=state.mac,
            target_dev=names.target_dev(name),
            filterref=names.nwfilter(name),
            ip=state.ip,
            ip6=self._ip6(),
        )
        # Again here (take_warm registered it first): the filter's removal, registered since,
        # must run after the domain is gone, as after a cold start_vm.
        self.rollback.callback(hv.destroy_domain, self.conn, state.domain)
        with self.ctx.reporter.step(f"plugging warm VM {state.domain} into {iface.network}"):
            # Plugged in with its link down and without its filter (go_online adds both): the
            # guest finds the new device and configures it while libvirt instantiates the
            # filter.
            unfiltered = dataclasses.replace(iface, filterref=None, link_up=False)
            hv.attach_device(dom, render_interface(unfiltered), "its interface")
            self.iface = iface
            self.boot = Deadline(
                self.ctx.settings.boot_timeout,
                f"sandbox {name!r} to come up on its network",
                "the machine may be overloaded; raise boot_timeout in the config file",
            )

    def go_online(self, capture: bool) -> None:
        """The interface that start_vm or plug_in left with its link down and unfiltered: its
        host filter, the host's records of its traffic, then its link. While the link is down
        QEMU passes no packet either way, so the guest is never on the network unfiltered, and
        the records hold its first packet. libvirt takes ~1 s to instantiate the filter
        (ebtables/iptables commands, one process each): the records start meanwhile."""
        iface = self.iface
        if iface is None:  # started without its filter: start_vm(host_filter=False)
            self.record_host_side(capture)
            return
        down = dataclasses.replace(iface, link_up=False)
        # On failure, leaving the pool waits for the filter's thread: the rollback then finds
        # the interface as libvirt left it.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nwfilter") as pool:
            filtering = pool.submit(
                hv.update_device, self.dom, render_interface(down), "the filter of its interface"
            )
            self.record_host_side(capture)
            # Wanted right after the link is up; imported here, while libvirt works.
            import orchestrator.vm.guest  # noqa: F401

            with self.ctx.reporter.step("filtering the VM's interface (host side)"):
                filtering.result()
        hv.update_device(self.dom, render_interface(iface), "the link of its interface")

    def _ip6(self) -> tuple[str, ...]:
        if self.net_spec.guest_ip6 is None:
            return ()
        return (str(self.net_spec.guest_ip6), str(hostfilter.link_local(self.state.mac)))

    def record_host_side(self, capture: bool) -> None:
        """The host's own records of the guest's traffic: the flow record, and `--pcap`."""
        tap = names.target_dev(self.name)
        if guards_remote_host(self.state.uri):
            self._record_on_remote_host(tap, capture)
            return
        if guards_host(self.state.uri):
            with self.ctx.reporter.step(f"recording the guest's flows on {tap} (host side)"):
                flows_pid = hostflows.start(tap, logs_dir(self.ctx, self.name))
            self.rollback.callback(pcap.stop_pcap, flows_pid)
            self._save(flows_pid=flows_pid)
        if capture:
            with self.ctx.reporter.step(f"capturing packets on {tap}"):
                logs = logs_dir(self.ctx, self.name)
                logs.mkdir(parents=True, exist_ok=True)
                pid = pcap.start_pcap(tap, logs / paths.PCAP_FILE)
            self.rollback.callback(pcap.stop_pcap, pid)
            self._save(pcap_pid=pid)

    def _record_on_remote_host(self, tap: str, capture: bool) -> None:
        """record_host_side on a remote libvirt host: the same tcpdumps, run there over one SSH
        login; collections bring their files back (capture/remotecapture.py)."""
        from orchestrator.capture import remotecapture as remote
        from orchestrator.vm import hostfiles

        with hostfiles.on_host(self.state.uri) as host:
            with self.ctx.reporter.step(f"recording the guest's flows on {tap} (libvirt host)"):
                where = self._remote_dir(host)
                flows_pid = remote.start(
                    host, tap, where, remote.FLOWS, remote.flows_args(tap, where)
                )
            self._save(remote_flows_pid=flows_pid)
            if capture:
                with self.ctx.reporter.step(f"capturing packets on {tap} (libvirt host)"):
                    pid = remote.start(
                        host, tap, where, remote.PCAP, remote.pcap_args(tap, where), "drop --pcap"
                    )
                self._save(remote_pcap_pid=pid)

    def log_in_and_push(self, xdebug_mode: xdebug.XdebugMode) -> None:
        """Wait for the guest, log in with the pinned key, load the policy and start the
        capture: before `up` returns, so before any target software can run."""
        from orchestrator.vm.guest import Endpoint, Guest, wait_for_sshd
        from orchestrator.vm.jump import guest_route

        report, state, boot = self.ctx.reporter, self.state, self.boot
        address = state.ip
        # One route for the banner wait and the login: on a remote host, one SSH connection to
        # it carries both (and the session), and is closed with the session.
        route = ExitStack()
        try:
            with report.step("waiting for the DHCP lease"):
                ip = hv.wait_for_lease(self.dom, state.mac, boot)
            if ip != address:
                raise HypervisorError(
                    f"the guest was leased {ip}, not the address kept for it ({address})",
                    f"another DHCP client holds {address}: destroy the sandbox and retry",
                )
            opener = route.enter_context(guest_route(state.uri))
            with report.step(f"waiting for sshd on {ip}"):
                primed = wait_for_sshd(ip, state.ssh_port, boot, opener=opener)
            with report.step("logging in with the pinned host key"):
                endpoint = Endpoint(
                    ip, state.ssh_port, state.user, self.key_path, self.host.public_line
                )
                guest = Guest.connect(endpoint, boot, opener=opener, first=primed)
            rules = guestfw.render(self.policy, self.net_spec)
            files = dict(xdebug.guest_files(xdebug_mode))
            commands: list[list[str]] = []
            if state.warm_id is not None:
                identity, commands = _warm_identity(self.name, str(self.net_spec.gateway))
                files.update(identity)
            with guest:
                with report.step(
                    f"loading the egress policy and xdebug ({xdebug_mode.value}) in the guest, "
                    "checking connection capture (eBPF)"
                ):
                    # One round trip. The capture's clock after the push: the firewall changes
                    # up to it are the push's.
                    status, output = guestfw.apply(
                        guest,
                        rules,
                        files=files,
                        commands=commands,
                        then=monitor.START_SCRIPT,
                        # A cold boot loaded them from its seed (make_disks): read back only.
                        preloaded=state.warm_id is None,
                    )
                    mark = monitor.started(status, output)
                self._save(guest_rules={str(v): text for v, text in rules.items()})
                _mark_policy_push(logs_dir(self.ctx, self.name), mark)
        except SandboxError as exc:
            text = hv.console_text(self.conn, self.pool, self.vols.console)
            save_console(self.ctx.store, self.name, text)
            tail = "\n".join(text.splitlines()[-25:]) or "(empty: the guest printed nothing yet)"
            exc.message += "\n--- last lines of the VM console ---\n" + tail
            raise
        finally:
            route.close()

    def mark_ready(self) -> None:
        from orchestrator.vm.guest import known_hosts_line

        state = self.state
        assert state.ip is not None
        self.ctx.store.write_secret(
            self.name,
            paths.KNOWN_HOSTS,
            known_hosts_line(state.ip, state.ssh_port, self.host.public_line) + "\n",
        )
        self._save(phase=Phase.READY, boot_seconds=round(self.boot.elapsed(), 1))
        if state.wildcard_pid:
            from orchestrator.egress import wildcards

            wildcards.guest_ready(state.wildcard_pid)


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


def _record_network(logs: Path, net: NetworkSpec) -> None:
    """Keep the network's resolver addresses with the logs: they outlive the sandbox's state."""
    record = {"resolver": [str(net.gateway), *([str(net.gateway6)] if net.gateway6 else [])]}
    atomic_write(logs / paths.NETWORK_RECORD, json.dumps(record) + "\n")

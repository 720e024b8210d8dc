"""Warm start: VMs booted ahead of time, each taken by exactly one `up`.

A warm VM boots from its own overlay and seed (its own SSH host and client keys, instance id,
and the machine-id systemd makes at its first boot) with no network interface at all: until a
sandbox takes it, it can reach nothing and nothing can reach it. `up` takes one (build.py
`Build.take_warm`), makes the sandbox's network, host filter and guard as for a cold boot, plugs
in an interface with a fresh MAC, and then pushes and checks the policy and the capture exactly
as after a cold boot. Nothing of a warm VM was ever another sandbox's.

Why booted VMs and not a saved memory image (docs/architecture.md#warm-start): libvirt restores a
save only under the name, UUID and MAC it was saved with (measured: it refuses any other), so
one save serves one sandbox at a time, a fresh MAC needs the same plug-in step anyway, and the
restored guest's clock is stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from orchestrator import jsontext, names, paths
from orchestrator.errors import HypervisorError, SandboxError
from orchestrator.files import atomic_write, file_lock
from orchestrator.lifecycle.context import Context, QuietReporter
from orchestrator.lifecycle.resources import delete_volumes, prepare_storage
from orchestrator.state import GLOBAL_LOCK_TIMEOUT
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import Accel, DomainSpec, render_domain
from orchestrator.vm.images import KERNEL_CMDLINE, Image, load_image
from orchestrator.waits import Deadline, wait_for

_ID_RE = re.compile(r"[0-9a-f]{8}")
# Spare PCIe root ports: one for the interface `up` plugs in.
HOTPLUG_PORTS = 1
# What the guest prints on its console once sshd and the capture are up
# (images/rootfs/etc/systemd/system/sandbox-ready.service): a warm VM counts as booted from then
# on. `up` still waits for sshd on the network itself.
READY_MARKER = "sandbox: guest ready"


@dataclass(frozen=True)
class WarmVM:
    """A booted VM waiting for a sandbox: what `up` needs to take it and check that it fits."""

    id: str
    domain: str
    created: str
    uri: str
    pool: str
    image: str
    image_hash: str
    accel: Accel
    memory_mib: int
    vcpus: int
    host_key: str  # the public line of its SSH host key (the private one went in its seed)
    client_key: str  # the public line of the key `up` logs in with (the private one: CLIENT_KEY)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["accel"] = self.accel.value
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> WarmVM:
        data = jsontext.known_fields(cls, jsontext.parse_object(text))
        data["accel"] = Accel(data["accel"])
        vm = cls(**data)
        if not _ID_RE.fullmatch(vm.id) or vm.domain != names.warm_domain(vm.id):
            raise ValueError(f"not a warm VM record: {vm.id!r}")
        return vm

    def fits(self, ctx: Context, img: Image, accel: Accel) -> bool:
        """Whether an `up` with these settings and this image would have built this VM. A
        rebuilt image (another recipe hash) makes every warm VM of the old one unfit."""
        s = ctx.settings
        return (
            self.uri == s.connect
            and self.pool == s.pool.name
            and self.image == img.name
            and self.image_hash == img.manifest.recipe_hash
            and self.accel is accel
            and self.memory_mib == s.memory_mib
            and self.vcpus == s.vcpus
        )


@dataclass(frozen=True)
class Taken:
    """A warm VM an `up` took: the record and the key to log in with."""

    vm: WarmVM
    client_key: str  # OpenSSH private key text


@dataclass(frozen=True)
class FillReport:
    started: tuple[str, ...]  # domains booted by this fill
    kept: int  # fitting warm VMs that were there already
    removed: tuple[str, ...]  # warm VMs removed: gone, unfit (image rebuilt) or orphaned
    ready: int  # warm VMs ready (booted) when fill returned


def owner(ctx: Context) -> str:
    """Our mark in a warm VM's metadata: several users (or test runs) with state directories
    of their own may share one libvirt, and each removes only its own orphans."""
    return hashlib.sha256(str(ctx.dirs.state.resolve()).encode()).hexdigest()[:12]


def _dir(ctx: Context, warm_id: str) -> Path:
    return ctx.dirs.warm / warm_id


@contextlib.contextmanager
def locked(ctx: Context) -> Iterator[None]:
    """Fills and takes of warm VMs take turns: two `up`s never take the same one."""
    ctx.dirs.warm.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Held briefly by a take, for the starts of its VMs by a fill (whose upload of a new base
    # image may wait for the global lock): concurrent `up`s queue behind it.
    with file_lock(
        ctx.dirs.warm / paths.WARM_LOCK,
        "the record of warm VMs",
        timeout=GLOBAL_LOCK_TIMEOUT,
        hint="another `sandbox warm fill` may be uploading a base image; try again when it is done",
    ):
        yield


def records(ctx: Context) -> list[WarmVM]:
    """The warm VMs on record, oldest first (an unreadable record is skipped: `drain` and the
    next fill remove its domain as an orphan)."""
    found = []
    if not ctx.dirs.warm.is_dir():
        return []
    for entry in ctx.dirs.warm.iterdir():
        if not _ID_RE.fullmatch(entry.name):
            continue
        try:
            vm = WarmVM.from_json((entry / paths.WARM_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if vm.id == entry.name:
            found.append(vm)
    return sorted(found, key=lambda vm: (vm.created, vm.id))


def _forget(ctx: Context, warm_id: str) -> None:
    shutil.rmtree(_dir(ctx, warm_id), ignore_errors=True)


def take(ctx: Context, conn: libvirt.virConnect, img: Image, accel: Accel) -> Taken | None:
    """The oldest running warm VM that fits, or None (then `up` boots cold). Call under
    `locked`; the caller records the VM in the sandbox's state, then calls `forget`."""
    for vm in records(ctx):
        if not vm.fits(ctx, img, accel):
            continue
        dom = hv.lookup_domain(conn, vm.domain)
        if dom is None or not hv.domain_running(dom):
            continue
        try:
            key = (_dir(ctx, vm.id) / paths.CLIENT_KEY).read_text()
        except OSError:
            continue
        return Taken(vm, key)
    return None


def hosts_with_fit(ctx: Context, img: Image) -> set[str]:
    """The hosts holding a warm VM on record that an `up` placed there could take (accel as
    recorded, unless the settings ask for one: `take` checks it against the host itself)."""
    found = set()
    for vm in records(ctx):
        there = dataclasses.replace(ctx, settings=ctx.settings.on_host(vm.uri))
        accel = vm.accel if ctx.settings.accel is Accel.AUTO else ctx.settings.accel
        if vm.fits(there, img, accel):
            found.add(vm.uri)
    return found


def forget(ctx: Context, vm: WarmVM) -> None:
    """Drop a taken VM's record: from now on it belongs to the sandbox that recorded it."""
    _forget(ctx, vm.id)


def fill(ctx: Context, count: int, image: str | None = None, *, wait: bool = True) -> FillReport:
    """Keep `count` warm VMs of the image for the current settings: remove those that are gone
    or no longer fit (the image was rebuilt), boot the missing ones, and (`wait`) wait until
    every one has booted."""
    img = load_image(ctx.image_name(image), ctx.dirs.images)
    with hv.connection(ctx.settings.connect) as conn:
        accel = hv.resolve_accel(conn, ctx.settings.accel)
        with locked(ctx):
            removed = _prune(ctx, conn, keep=lambda vm: vm.fits(ctx, img, accel))
            kept = [vm for vm in records(ctx) if vm.fits(ctx, img, accel)]
            started = []
            for _ in range(max(0, count - len(kept))):
                with ctx.reporter.step("booting a warm VM"):
                    started.append(_boot(ctx, conn, img, accel))
        ready = 0
        if wait:
            for vm in [*kept, *started]:
                with ctx.reporter.step(f"waiting for warm VM {vm.domain} to boot"):
                    _wait_booted(ctx, conn, vm)
                ready += 1
    return FillReport(
        started=tuple(vm.domain for vm in started),
        kept=len(kept),
        removed=tuple(removed),
        ready=ready,
    )


def refill_in_background(ctx: Context, image: str | None) -> None:
    """Boot replacements up to the configured count (settings.warm) in a detached process, so
    that the `up` that took a warm VM returns at once. Its errors go to .warm/refill.log; the
    next fill or `up` notices what it left."""
    if os.fork() != 0:
        return
    # The child: a new session (a Ctrl-C meant for the terminal does not reach it), then a
    # grandchild, so nothing waits for it.
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        log = os.open(
            ctx.dirs.warm / paths.WARM_REFILL_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        quiet = dataclasses.replace(ctx, reporter=QuietReporter())
        fill(quiet, ctx.settings.warm, image, wait=False)
        code = 0
    except BaseException as exc:  # the child must never return into the parent's code
        with contextlib.suppress(Exception):
            print(f"warm refill failed: {exc}", file=sys.stderr)
        code = 1
    os._exit(code)


def drain(ctx: Context) -> list[str]:
    """Remove every warm VM (and any warm domain left without a record)."""
    with hv.connection(ctx.settings.connect) as conn, locked(ctx):
        return _prune(ctx, conn, keep=lambda vm: False)


def _prune(ctx: Context, conn: libvirt.virConnect, keep: Callable[[WarmVM], bool]) -> list[str]:
    """Remove the warm VMs `keep` rejects, those whose domain is gone, and warm domains with
    no record (an `up` or fill killed half-way)."""
    removed = []
    on_record = {vm.id: vm for vm in records(ctx) if vm.uri == ctx.settings.connect}
    running = hv.warm_domains(conn, owner(ctx))
    for vm in on_record.values():
        dom = hv.lookup_domain(conn, vm.domain)
        alive = dom is not None and hv.domain_running(dom) and vm.id in running
        if alive and keep(vm):
            continue
        _remove(ctx, conn, vm.domain, vm.pool)
        _forget(ctx, vm.id)
        removed.append(vm.domain)
    for warm_id, domain in running.items():
        if warm_id not in on_record:
            _remove(ctx, conn, domain, ctx.settings.pool.name)
            removed.append(domain)
    return removed


def discard(ctx: Context, conn: libvirt.virConnect, vm: WarmVM) -> None:
    """Destroy a warm VM and delete its volumes (an `up` that took it failed before its own
    steps took charge of them)."""
    _remove(ctx, conn, vm.domain, vm.pool)


def _remove(ctx: Context, conn: libvirt.virConnect, domain: str, pool_name: str) -> None:
    hv.destroy_domain(conn, domain)
    pool = hv.active_pool(conn, pool_name)
    if pool is not None:
        delete_volumes(pool, names.SandboxVolumes.for_domain(domain))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _boot(ctx: Context, conn: libvirt.virConnect, img: Image, accel: Accel) -> WarmVM:
    from orchestrator.vm.cloudinit import SeedSpec, build_seed_iso
    from orchestrator.vm.guest import generate_ed25519

    settings = ctx.settings
    warm_id = secrets.token_hex(4)
    domain = names.warm_domain(warm_id)
    vols = names.SandboxVolumes.for_domain(domain)
    client = generate_ed25519(f"sandbox-warm-{warm_id}-client")
    host = generate_ed25519(f"sandbox-warm-{warm_id}-host")
    vm = WarmVM(
        id=warm_id,
        domain=domain,
        created=_now(),
        uri=settings.connect,
        pool=settings.pool.name,
        image=img.name,
        image_hash=img.manifest.recipe_hash,
        accel=accel,
        memory_mib=settings.memory_mib,
        vcpus=settings.vcpus,
        host_key=host.public_line,
        client_key=client.public_line,
    )
    # The record first: a fill killed from here on leaves a record (or an orphan domain) that
    # the next fill or `warm drain` removes.
    directory = _dir(ctx, warm_id)
    directory.mkdir(mode=0o700)
    atomic_write(directory / paths.CLIENT_KEY, client.private_openssh, mode=0o600)
    atomic_write(directory / paths.WARM_FILE, vm.to_json())
    try:
        with ctx.store.global_lock():
            pool, base = prepare_storage(ctx, conn, img)
            disk = hv.create_overlay(pool, vols.disk, base.disk)
            seed = build_seed_iso(
                SeedSpec(
                    instance_id=f"sandbox-warm-{warm_id}-{uuid.uuid4().hex[:12]}",
                    hostname=f"sandbox-warm-{warm_id}",
                    host_key_private=host.private_openssh,
                    host_key_public=host.public_line,
                    authorized_key=client.public_line,
                )
            )
            seed_path = str(hv.upload(conn, pool, vols.seed, data=seed).path())
            spec = DomainSpec(
                name=domain,
                uuid=str(uuid.uuid4()),
                accel=accel,
                memory_mib=settings.memory_mib,
                vcpus=settings.vcpus,
                kernel=hv.volume_path(pool, base.kernel),
                initrd=hv.volume_path(pool, base.initrd),
                cmdline=KERNEL_CMDLINE,
                disk=disk,
                seed=seed_path,
                network=None,
                mac=None,
                console_log=str(Path(hv.pool_path(pool)) / vols.console),
                capture_log=str(Path(hv.pool_path(pool)) / vols.capture),
                sandbox="",
                image=img.name,
                hotplug_ports=HOTPLUG_PORTS,
                warm_id=warm_id,
                warm_owner=owner(ctx),
            )
            hv.start_domain(conn, render_domain(spec))
    except BaseException:
        with contextlib.suppress(SandboxError, libvirt.libvirtError):
            _remove(ctx, conn, domain, settings.pool.name)
        _forget(ctx, warm_id)
        raise
    return vm


def _wait_booted(ctx: Context, conn: libvirt.virConnect, vm: WarmVM) -> None:
    deadline = Deadline(
        ctx.settings.boot_timeout,
        f"warm VM {vm.domain} to boot",
        "the machine may be overloaded: raise boot_timeout in the config file; images built "
        "before warm start print no ready line: rebuild it (`sandbox image build`)",
    )
    pool = hv.active_pool(conn, vm.pool)
    if pool is None:
        raise HypervisorError(f"the storage pool {vm.pool} is gone", "run `sandbox warm drain`")

    def booted() -> bool | None:
        state = _state(conn, vm)
        if state == "gone":
            raise SandboxError(
                f"warm VM {vm.domain} stopped while booting",
                "run `sandbox warm drain` and `sandbox warm fill` again; see `sandbox --debug`",
            )
        return True if state == "ready" else None

    wait_for(booted, deadline, interval=0.5, max_interval=1.0)


@dataclass(frozen=True)
class WarmStatus:
    vm: WarmVM
    # "ready", "booting", "gone" (its domain stopped: the next fill removes it), or
    # "unreachable" (its libvirt host, not the current one, did not answer)
    state: str


def status(ctx: Context) -> list[WarmStatus]:
    """The warm VMs on record and how far each has come (`sandbox warm status`)."""
    found = []
    on_record = records(ctx)
    # Each VM asked on its own host (`warm fill` with --connect may have put some elsewhere).
    for uri in dict.fromkeys([ctx.settings.connect, *(vm.uri for vm in on_record)]):
        there = [vm for vm in on_record if vm.uri == uri]
        if not there and uri != ctx.settings.connect:
            continue
        try:
            with hv.connection(uri) as conn:
                found += [WarmStatus(vm, _state(conn, vm)) for vm in there]
        except SandboxError:
            if uri == ctx.settings.connect:
                raise
            found += [WarmStatus(vm, "unreachable") for vm in there]  # reported, not fatal
    return sorted(found, key=lambda item: (item.vm.created, item.vm.id))


def _state(conn: libvirt.virConnect, vm: WarmVM) -> str:
    """ "ready" (its console says so), "booting", or "gone" (its domain or pool is)."""
    dom = hv.lookup_domain(conn, vm.domain)
    pool = hv.active_pool(conn, vm.pool)
    if dom is None or not hv.domain_running(dom) or pool is None:
        return "gone"
    console = names.SandboxVolumes.for_domain(vm.domain).console
    return "ready" if READY_MARKER in hv.console_text(conn, pool, console) else "booting"

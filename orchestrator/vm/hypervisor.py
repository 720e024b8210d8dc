"""The libvirt edge: connection, storage pool and volumes, network, domains, leases, console.

Everything the VM needs on the hypervisor host goes through libvirt's APIs (volumes are uploaded
through streams, the console log is read back through a volume), so a remote `--connect` URI
works the same as a local one and no file has to be readable by the QEMU user in our home.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from orchestrator import names
from orchestrator.errors import HypervisorError, NotFoundError
from orchestrator.vm.domain import (
    METADATA_NS,
    METADATA_PREFIX,
    SUBNET6_PREFIX,
    SUBNET_PREFIX,
    Accel,
    NetworkSpec,
    PoolSpec,
    VolumeSpec,
    render_network,
    render_pool,
    render_volume,
)
from orchestrator.waits import Deadline, wait_for


def _silence_libvirt(_ctx: object, _err: object) -> None:
    # libvirt's default handler prints every error to stderr, including the ones we expect and
    # handle (lookups of things that do not exist).
    return None


libvirt.registerErrorHandler(_silence_libvirt, None)


def error_code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def connection_hint(error_text: str, code: int) -> str:
    """What to do about a failed libvirt connection, from libvirt's own error."""
    if "ermission denied" in error_text or code == libvirt.VIR_ERR_AUTH_FAILED:
        return (
            "run as root, or add your user to the 'libvirt' group and log in again; "
            "or use --connect qemu:///session"
        )
    if "No such file" in error_text or "Connection refused" in error_text:
        return (
            "start libvirtd (`systemctl start libvirtd`, or `libvirtd -d` where systemd is "
            "not PID 1); to try sandbox safely on a shared machine use `sandbox-lab up`"
        )
    return "check the URI given with --connect, SANDBOX_CONNECT or the config file"


def open_connection(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"cannot connect to libvirt at {uri}: {exc}", connection_hint(str(exc), error_code(exc))
        ) from None


def resolve_accel(conn: libvirt.virConnect, requested: Accel) -> Accel:
    """KVM where the host can really run it: libvirt offers the kvm domain type for x86_64 AND
    the host CPU has vmx or svm. A /dev/kvm without either (as on nested schemes that cannot run a
    stock kernel) falls back to TCG."""
    caps = ET.fromstring(conn.getCapabilities())
    kvm_offered = any(
        d.get("type") == "kvm"
        for guest in caps.findall("guest")
        if guest.findtext("os_type") == "hvm"
        for arch in guest.findall("arch")
        if arch.get("name") == "x86_64"
        for d in arch.findall("domain")
    )
    qemu_offered = any(
        arch.get("name") == "x86_64"
        for guest in caps.findall("guest")
        for arch in guest.findall("arch")
    )
    features = {f.get("name") for f in caps.findall("host/cpu/feature")}
    kvm_usable = kvm_offered and bool(features & {"vmx", "svm"})
    if requested is Accel.KVM and not kvm_usable:
        why = "libvirt offers no kvm domain" if not kvm_offered else "the host CPU lacks vmx/svm"
        raise HypervisorError(
            f"KVM acceleration was asked for but is not usable here ({why})",
            "use --accel auto or --accel tcg (software emulation, slower)",
        )
    if requested is Accel.AUTO:
        requested = Accel.KVM if kvm_usable else Accel.TCG
    if requested is Accel.TCG and not qemu_offered:
        raise HypervisorError(
            "libvirt offers no x86_64 QEMU guests on this host",
            "install qemu-system-x86 on the hypervisor host and restart libvirtd",
        )
    return requested


def free_memory(conn: libvirt.virConnect) -> int | None:
    """The host's free memory in bytes, as libvirt reports it (virNodeGetFreeMemory), or None
    where it cannot tell. It is the kernel's MemFree summed over the NUMA cells: page cache counts
    as used, so a host with a big cache looks fuller than it is. getMemoryStats would add
    buffers and cache, but the test driver does not implement it (and the qemu driver answers
    both from the same /proc/meminfo). virNodeGetFreeMemory returns 0 for an error (a
    test:///FILE host has no NUMA cells to sum), and no real host has 0 bytes free."""
    try:
        free = int(conn.getFreeMemory())
    except libvirt.libvirtError:
        return None
    return free or None


# ---- storage -------------------------------------------------------------------------------


def ensure_pool(conn: libvirt.virConnect, spec: PoolSpec) -> libvirt.virStoragePool:
    try:
        pool = conn.storagePoolLookupByName(spec.name)
    except libvirt.libvirtError as exc:
        if error_code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise HypervisorError(f"cannot look up storage pool {spec.name}: {exc}") from None
        try:
            pool = conn.storagePoolDefineXML(render_pool(spec), 0)
            pool.build(0)
            pool.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot create storage pool {spec.name} at {spec.path}: {exc}",
                "check that the directory can be created by libvirtd, or set pool.path in the "
                "config file",
            ) from None
    if not pool.isActive():
        try:
            pool.create(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot start storage pool {spec.name}: {exc}") from None
    return pool


T = TypeVar("T")


def lookup_or_none(
    call: Callable[[], T], missing: int, what: str, hint: str | None = None
) -> T | None:
    """`call()`, or None when libvirt says the object does not exist (error code `missing`)."""
    try:
        return call()
    except libvirt.libvirtError as exc:
        if error_code(exc) == missing:
            return None
        raise HypervisorError(f"cannot look up {what}: {exc}", hint) from None


def active_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    """The storage pool, started if it was not (a host reboot stops it), or None where there is
    none or it cannot be read: `destroy` then has no volumes to look for."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return None
    if not pool.isActive():
        with contextlib.suppress(libvirt.libvirtError):
            pool.create(0)
    return pool


def lookup_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    return lookup_or_none(
        lambda: pool.storageVolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_VOL, f"volume {name}"
    )


def delete_volume(pool: libvirt.virStoragePool, name: str) -> bool:
    vol = lookup_volume(pool, name)
    if vol is None:
        return False
    try:
        vol.delete(0)
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return False
        raise HypervisorError(f"cannot delete volume {name}: {exc}") from None
    return True


def upload(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    name: str,
    *,
    path: Path | None = None,
    data: bytes | None = None,
    fmt: str = "raw",
) -> libvirt.virStorageVol:
    """Create a volume and fill it from a file or bytes through a libvirt stream."""
    size = path.stat().st_size if path is not None else len(data or b"")
    delete_volume(pool, name)
    try:
        vol = pool.createXML(render_volume(VolumeSpec(name=name, capacity=size, format=fmt)), 0)
        stream = conn.newStream(0)
        vol.upload(stream, 0, size, 0)
        if path is not None:
            with path.open("rb") as fh:
                stream.sendAll(lambda _st, nbytes, f: f.read(nbytes), fh)
        else:
            view = memoryview(data or b"")
            offset = [0]

            def chunk(_st: Any, nbytes: int, _opaque: Any) -> bytes:
                piece = bytes(view[offset[0] : offset[0] + nbytes])
                offset[0] += len(piece)
                return piece

            stream.sendAll(chunk, None)
        stream.finish()
    except libvirt.libvirtError as exc:
        with contextlib.suppress(HypervisorError):
            delete_volume(pool, name)
        raise HypervisorError(f"cannot upload volume {name}: {exc}") from None
    return vol


def download(conn: libvirt.virConnect, vol: libvirt.virStorageVol) -> bytes:
    chunks: list[bytes] = []
    try:
        stream = conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        stream.recvAll(lambda _st, buf, acc: acc.append(buf), chunks)
        stream.finish()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot download volume {vol.name()}: {exc}") from None
    return b"".join(chunks)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_base_volumes(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    *,
    image_name: str,
    image_hash: str,
    disk: Path,
    kernel: Path,
    initrd: Path,
    verify: Callable[[], None] | None = None,
) -> names.BaseVolumes:
    """Put the image's disk, kernel and initrd into the pool once per image version, after
    `verify` (the image's files against its manifest: a damaged cache must not become the base of
    every sandbox).

    A marker volume is written last: volumes without it are the remains of an interrupted upload
    and are uploaded again. Call under the global lock.
    """
    base = names.BaseVolumes.for_image(image_name, image_hash)
    pool.refresh(0)
    if lookup_volume(pool, base.marker) is None:
        if verify is not None:
            verify()
        upload(conn, pool, base.disk, path=disk)
        upload(conn, pool, base.kernel, path=kernel)
        upload(conn, pool, base.initrd, path=initrd)
        upload(conn, pool, base.marker, data=_sha256_file(disk).encode())
        pool.refresh(0)
        prune_base_volumes(pool, image_name, image_hash)
    return base


def prune_base_volumes(pool: libvirt.virStoragePool, image_name: str, keep_hash: str) -> list[str]:
    """Delete older versions of an image's base volumes that no overlay in the pool is backed
    by (each rebuild would otherwise leave ~0.5 GB behind). Call under the global lock."""
    prefix = names.base_volume_prefix(image_name)
    volumes = [str(n) for n in pool.listVolumes()]
    in_use: set[str] = set()
    for name in volumes:
        if name.startswith(names.PREFIX) and name.endswith(".qcow2"):
            vol = lookup_volume(pool, name)
            if vol is not None:
                backing = ET.fromstring(vol.XMLDesc(0)).findtext("backingStore/path")
                if backing:
                    in_use.add(Path(backing).name.split(".")[0])
    removed = []
    for name in sorted(volumes, key=lambda n: not n.endswith(".complete")):
        stem = name.split(".")[0]
        if not name.startswith(prefix) or stem == f"{prefix}{keep_hash[:12]}" or stem in in_use:
            continue
        # The completion marker goes first: a half-deleted version is never taken for whole.
        if delete_volume(pool, name):
            removed.append(name)
    return removed


def volume_path(pool: libvirt.virStoragePool, name: str) -> str:
    vol = lookup_volume(pool, name)
    if vol is None:
        raise NotFoundError(f"volume {name} is missing from pool {pool.name()}")
    return str(vol.path())


def pool_path(pool: libvirt.virStoragePool) -> str:
    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise HypervisorError(f"storage pool {pool.name()} has no target path")
    return path


def create_overlay(pool: libvirt.virStoragePool, name: str, backing: str) -> str:
    base = lookup_volume(pool, backing)
    if base is None:
        raise NotFoundError(f"base volume {backing} is missing from pool {pool.name()}")
    capacity = int(base.info()[1])
    spec = VolumeSpec(
        name=name,
        capacity=capacity,
        format="qcow2",
        backing_path=str(base.path()),
        backing_format="qcow2",
    )
    delete_volume(pool, name)
    try:
        vol = pool.createXML(render_volume(spec), 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot create the overlay {name}: {exc}") from None
    return str(vol.path())


# ---- network -------------------------------------------------------------------------------


def network_pieces(
    subnets: ipaddress.IPv4Network,
    subnets6: ipaddress.IPv6Network | None,
    taken: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Iterator[tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]]:
    """The pieces of the configured ranges that no existing network overlaps: the n-th /28 of
    `subnets` with the n-th /64 of `subnets6`, in order. Pure."""
    size = 2 ** (32 - SUBNET_PREFIX)
    count = subnets.num_addresses // size
    if subnets6 is not None:
        count = min(count, 2 ** (SUBNET6_PREFIX - subnets6.prefixlen))
    for index in range(count):
        piece = ipaddress.IPv4Network((int(subnets.network_address) + index * size, SUBNET_PREFIX))
        piece6 = (
            None
            if subnets6 is None
            else ipaddress.IPv6Network(
                (int(subnets6.network_address) + (index << (128 - SUBNET6_PREFIX)), SUBNET6_PREFIX)
            )
        )
        if any(
            piece.overlaps(t) if t.version == 4 else piece6 is not None and piece6.overlaps(t)
            for t in taken
        ):
            continue
        yield piece, piece6


def network_subnets(
    conn: libvirt.virConnect,
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The subnets of every network libvirt knows (ours and others, running or not)."""
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for net in conn.listAllNetworks(0):
        with contextlib.suppress(libvirt.libvirtError, ET.ParseError, ValueError):
            for ip in ET.fromstring(net.XMLDesc(0)).findall("ip"):
                address = ip.get("address", "")
                size = ip.get("prefix") or ip.get("netmask") or ""
                found.append(ipaddress.ip_network(f"{address}/{size}", strict=False))
    return found


# A piece of the range can still collide with a route of the host's (libvirt refuses to start
# the network then): so many pieces are tried before giving up.
NETWORK_TRIES = 16


def create_network(
    conn: libvirt.virConnect,
    make_spec: Callable[[ipaddress.IPv4Network, ipaddress.IPv6Network | None], NetworkSpec],
    subnets: ipaddress.IPv4Network,
    subnets6: ipaddress.IPv6Network | None,
) -> tuple[libvirt.virNetwork, NetworkSpec]:
    """Define and start a network on the first free piece of the ranges. Two `up`s racing for a
    piece are safe: libvirt starts only one network per subnet, the other tries the next."""
    errors: list[str] = []
    pieces = network_pieces(subnets, subnets6, network_subnets(conn))
    for piece, piece6 in pieces:
        spec = make_spec(piece, piece6)
        try:
            net = conn.networkDefineXML(render_network(spec))
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot define network {spec.name}: {exc}",
                "run `sandbox destroy` for this sandbox and try again",
            ) from None
        try:
            net.create()
        except libvirt.libvirtError as exc:
            errors.append(f"{piece}: {exc}")
            with contextlib.suppress(libvirt.libvirtError):
                net.undefine()
            if len(errors) >= NETWORK_TRIES:
                break
            pieces = network_pieces(subnets, subnets6, [*network_subnets(conn), piece])
            continue
        with contextlib.suppress(libvirt.libvirtError):
            net.setAutostart(0)
        return net, spec
    raise HypervisorError(
        f"no free subnet for a sandbox network in {subnets}"
        + (f" and {subnets6}" if subnets6 else "")
        + (": " + "; ".join(errors[-3:]) if errors else " (all pieces are in use)"),
        "destroy sandboxes you no longer need, or set network.subnets (and network.subnets6) "
        "in the config file to ranges the host does not use",
    )


def lookup_network(conn: libvirt.virConnect, network: str) -> libvirt.virNetwork | None:
    return lookup_or_none(
        lambda: conn.networkLookupByName(network), libvirt.VIR_ERR_NO_NETWORK, f"network {network}"
    )


def network_bridge(conn: libvirt.virConnect, network: str) -> str | None:
    """The bridge device of a network, or None when the network (or its bridge) is gone."""
    try:
        return str(conn.networkLookupByName(network).bridgeName()) or None
    except libvirt.libvirtError:
        return None


def network_users(conn: libvirt.virConnect, network: str) -> list[str]:
    users = []
    for dom in conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            root = ET.fromstring(dom.XMLDesc(0))
            if any(
                src.get("network") == network for src in root.findall("devices/interface/source")
            ):
                users.append(str(dom.name()))
    return users


def remove_network_if_unused(conn: libvirt.virConnect, network: str) -> bool:
    """Remove the sandbox network once no domain is attached to it. Call under the global lock."""
    net = lookup_network(conn, network)
    if net is None or network_users(conn, network):
        return False
    try:
        if net.isActive():
            net.destroy()
        net.undefine()
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_NETWORK:
            return False
        raise HypervisorError(f"cannot remove network {network}: {exc}") from None
    return True


# ---- domains -------------------------------------------------------------------------------


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    return lookup_or_none(
        lambda: conn.lookupByName(name), libvirt.VIR_ERR_NO_DOMAIN, f"domain {name}"
    )


def start_domain(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    try:
        # Transient: once destroyed, libvirt forgets it; nothing is left defined.
        return conn.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"libvirt could not start the VM: {exc}",
            "run with --debug for the domain XML; check `sandbox-lab status` or libvirtd's log",
        ) from None


def attach_device(dom: libvirt.virDomain, xml: str, what: str) -> None:
    """Plug a device into a running VM (a warm VM's network interface)."""
    try:
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"libvirt could not plug {what} into {dom.name()}: {exc}",
            "run `sandbox warm drain` and retry (`up` boots cold when no warm VM is left)",
        ) from None


def update_device(dom: libvirt.virDomain, xml: str, what: str) -> None:
    """Change a device of a running VM in place (a plugged-in interface's filter, its link)."""
    try:
        dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"libvirt could not change {what} of {dom.name()}: {exc}",
            "destroy the sandbox and retry",
        ) from None


def set_sandbox_metadata(dom: libvirt.virDomain, element: str) -> None:
    """Rewrite our <metadata> element of a running VM (a warm VM taken by a sandbox)."""
    try:
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            element,
            METADATA_PREFIX,
            METADATA_NS,
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"cannot name the sandbox in {dom.name()}'s metadata: {exc}"
        ) from None


def destroy_domain(conn: libvirt.virConnect, name: str) -> bool:
    dom = lookup_domain(conn, name)
    if dom is None:
        return False
    try:
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError as exc:
        if error_code(exc) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return True
        raise HypervisorError(f"cannot destroy domain {name}: {exc}") from None
    return True


def domain_running(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def wait_for_lease(dom: libvirt.virDomain, mac: str, deadline: Deadline) -> str:
    """The guest's IPv4 address from the network's DHCP leases."""

    def probe() -> str | None:
        if not domain_running(dom):
            raise HypervisorError(
                "the VM stopped while waiting for its DHCP lease",
                "see the console log in the sandbox's logs directory",
            )
        try:
            ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        except libvirt.libvirtError:
            return None
        for iface in (ifaces or {}).values():
            if str(iface.get("hwaddr", "")).lower() != mac.lower():
                continue
            for addr in iface.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return None

    # Polled often: a warm VM has its lease about a second after its interface is plugged in,
    # and every tenth of a second counts there; a libvirt lease lookup costs ~1 ms.
    return wait_for(probe, deadline, interval=0.1, max_interval=0.25)


def domain_addresses(dom: libvirt.virDomain) -> list[str]:
    """Every address (IPv4 and IPv6) the network's DHCP server leased to the domain."""
    try:
        ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
    except libvirt.libvirtError:
        return []
    return sorted(
        str(addr["addr"]) for iface in (ifaces or {}).values() for addr in iface.get("addrs") or []
    )


def _our_domains(conn: libvirt.virConnect) -> list[tuple[str, ET.Element]]:
    """Our domains (by the metadata we put in them): (domain name, our metadata element)."""
    found = []
    for dom in conn.listAllDomains(0):
        name = str(dom.name())
        if not name.startswith(names.PREFIX):
            continue
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        except libvirt.libvirtError:
            continue
        found.append((name, ET.fromstring(meta)))
    return found


def sandbox_domains(conn: libvirt.virConnect) -> dict[str, str]:
    """Our sandboxes' domains: sandbox name -> domain name (a warm VM taken by a sandbox keeps
    its own domain name: libvirt cannot rename a running domain)."""
    return {meta.get("name", ""): name for name, meta in _our_domains(conn) if meta.get("name")}


def warm_domains(conn: libvirt.virConnect, owner: str | None = None) -> dict[str, str]:
    """Warm VMs no sandbox has taken yet (only `owner`'s, if given): warm id -> domain name."""
    return {
        meta.get("warm", ""): name
        for name, meta in _our_domains(conn)
        if meta.get("warm")
        and not meta.get("name")
        and (owner is None or meta.get("owner") == owner)
    }


def console_rotations(pool: libvirt.virStoragePool, console: str) -> list[str]:
    """The console log's older files, as virtlogd rotates it (NAME.0, NAME.1, ...)."""
    with contextlib.suppress(libvirt.libvirtError):
        pool.refresh(0)
    try:
        volumes = [str(v) for v in pool.listVolumes()]
    except libvirt.libvirtError:
        return []
    return sorted(
        n for n in volumes if n.startswith(console + ".") and n[len(console) + 1 :].isdigit()
    )


def console_text(conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str) -> str:
    with contextlib.suppress(libvirt.libvirtError):
        pool.refresh(0)
    vol = lookup_volume(pool, name)
    if vol is None:
        return ""
    try:
        data = download(conn, vol)
    except HypervisorError:
        return ""
    return data.decode(errors="replace").replace("\r", "")


@contextlib.contextmanager
def connection(uri: str) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

"""Pure renderers for the libvirt XML we hand to the hypervisor: domain, network, volumes.

Built with ElementTree from frozen specs, never by string formatting (virtinst, virt-lightning),
and tested with golden files.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

# Our own namespace for <metadata>: lets `list` and `destroy` recognise our domains by content,
# not only by name.
METADATA_NS = "urn:sandbox:domain:1"
METADATA_PREFIX = "sandbox"
DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
# libvirt's own directory for each network's dnsmasq files (conf, hostsfile, addnhosts, status).
# dnsmasq opens its log file as root before it drops to nobody (and chowns the file to nobody), so
# any root-writable path works; this one exists wherever libvirt's network driver does, is not
# rotated by any logrotate rule (a rotation would leave dnsmasq writing to the old inode), and is
# where a confined dnsmasq (AppArmor/SELinux) is already let write its network's files.
DNSMASQ_DIR = "/var/lib/libvirt/dnsmasq"
# The virtio-serial port the guest's sandbox-capture-stream.service writes its records to
# (/dev/virtio-ports/NAME in the guest).
CAPTURE_CHANNEL = "org.sandbox.capture.0"


class Accel(Enum):
    """How to run the guest CPU. AUTO picks KVM only where the host can really run it."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        if self is Accel.AUTO:
            raise ValueError("resolve Accel.AUTO against the host's capabilities first")
        return "kvm" if self is Accel.KVM else "qemu"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str
    disk: str
    seed: str
    # None: no network interface at all (a warm VM: its interface is plugged in when an `up`
    # takes it, with the MAC, network and filter of that sandbox; see render_interface).
    network: str | None
    mac: str | None
    console_log: str
    sandbox: str
    image: str
    emulator: str | None = None
    # The libvirt nwfilter that enforces the egress policy on the host side of the interface.
    filterref: str | None = None
    # The host-side name of the guest's interface (<= 15 characters), so host rules can name it
    # before the VM exists.
    target_dev: str | None = None
    # The IPv4 address the network's DHCP server keeps for this MAC: the filter's $IP, so the
    # guest can send from (and claim in ARP) that address only.
    ip: str | None = None
    # Its IPv6 addresses (the DHCPv6 one kept for its DUID, its link-local): the filter's $IPV6.
    ip6: tuple[str, ...] = ()
    # Keeps QEMU's translation cache small under TCG: ~320 MiB resident instead of ~800 MiB
    # (docs/platform.md#tcg-translation-cache), at no visible cost.
    tcg_tb_cache_mib: int = 64
    # Empty PCIe root ports for devices plugged in while the VM runs (q35 has no hotplug slot
    # otherwise).
    hotplug_ports: int = 0
    # A warm VM's id (lifecycle/warm.py): in the metadata until a sandbox takes it.
    warm_id: str | None = None
    # Whose warm VM it is (a hash of the state directory that has its record): fills and drains
    # remove only their own warm VMs left without a record, never another user's.
    warm_owner: str | None = None
    # The host's file of the capture's virtio-serial port (CAPTURE_CHANNEL): the guest copies its
    # connection records there as they come, for `destroy` to read without SSH.
    capture_log: str | None = None

    # False: the interface starts with its link down (its filter is added while the VM boots).
    link_up: bool = True

    def interface(self) -> InterfaceSpec | None:
        if self.network is None or self.mac is None:
            return None
        return InterfaceSpec(
            network=self.network,
            mac=self.mac,
            target_dev=self.target_dev,
            filterref=self.filterref,
            ip=self.ip,
            ip6=self.ip6,
            link_up=self.link_up,
        )


@dataclass(frozen=True)
class InterfaceSpec:
    """The guest's one network interface: in the domain XML of a cold boot, or plugged into a
    warm VM when a sandbox takes it."""

    network: str
    mac: str
    target_dev: str | None = None
    filterref: str | None = None
    ip: str | None = None
    ip6: tuple[str, ...] = ()
    # False: plugged in with its link down (the guest can neither send nor receive on it yet).
    link_up: bool = True


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attrs)
    if text is not None:
        child.text = text
    return child


def _to_string(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def sandbox_metadata(
    sandbox: str, image: str, warm_id: str | None = None, warm_owner: str | None = None
) -> ET.Element:
    """Our <metadata> element: the sandbox's name ("" for a warm VM no sandbox has taken yet)."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    meta = ET.Element(f"{{{METADATA_NS}}}sandbox")
    meta.set("name", sandbox)
    meta.set("image", image)
    if warm_id is not None:
        meta.set("warm", warm_id)
    if warm_owner is not None:
        meta.set("owner", warm_owner)
    return meta


def render_metadata(sandbox: str, image: str, warm_id: str | None = None) -> str:
    """The same element for virDomainSetMetadata when a sandbox takes a warm VM (without its
    namespace: libvirt puts it in the one the call names)."""
    meta = ET.Element("sandbox", name=sandbox, image=image)
    if warm_id is not None:
        meta.set("warm", warm_id)
    return ET.tostring(meta, encoding="unicode")


def render_domain(spec: DomainSpec) -> str:
    dom = ET.Element("domain", type=spec.accel.domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    metadata = _sub(dom, "metadata")
    metadata.append(sandbox_metadata(spec.sandbox, spec.image, spec.warm_id, spec.warm_owner))
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    # Direct kernel boot: no bootloader, no firmware menu; the image ships kernel and initrd.
    _sub(os_el, "kernel", spec.kernel)
    _sub(os_el, "initrd", spec.initrd)
    _sub(os_el, "cmdline", spec.cmdline)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.accel is Accel.TCG:
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(spec.tcg_tb_cache_mib), unit="MiB")
    if spec.accel is Accel.KVM:
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")

    # A disposable VM never comes back from a reboot or a crash: the sandbox ends with it.
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    if spec.emulator:
        _sub(devices, "emulator", spec.emulator)
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=spec.disk)
    _sub(disk, "target", dev="vda", bus="virtio")

    # The seed ISO rides on virtio too: Debian's cloud kernel has no AHCI driver, so a SATA
    # cdrom would be invisible to the guest and cloud-init would run with no datasource.
    seed = _sub(devices, "disk", type="file", device="disk")
    _sub(seed, "driver", name="qemu", type="raw")
    _sub(seed, "source", file=spec.seed)
    _sub(seed, "target", dev="vdb", bus="virtio")
    _sub(seed, "readonly")

    iface = spec.interface()
    if iface is not None:
        devices.append(_interface_element(iface))

    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=spec.console_log, append="off")
    _sub(console, "target", type="serial", port="0")

    if spec.capture_log:
        channel = _sub(devices, "channel", type="file")
        _sub(channel, "source", path=spec.capture_log, append="off")
        _sub(channel, "target", type="virtio", name=CAPTURE_CHANNEL)

    rng = _sub(devices, "rng", model="virtio")
    # Without entropy a fresh guest can stall sshd and PHP waiting for getrandom().
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    # No USB: nothing uses it, and libvirt's default controller would take a PCIe port.
    _sub(devices, "controller", type="usb", model="none")
    if spec.hotplug_ports:
        # libvirt puts the VM's own PCIe devices on the ports listed first: one each for them,
        # then the empty ones. The root is named first, or libvirt would give index 0 (which
        # must be the root) to a port.
        used = sum(1 for el in devices if el.tag in ("disk", "interface", "rng"))
        # A virtio channel needs libvirt's virtio-serial controller: one more PCIe device.
        used += any(el.tag == "channel" for el in devices)
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(used + spec.hotplug_ports):
            _sub(devices, "controller", type="pci", model="pcie-root-port")
    return _to_string(dom)


def _interface_element(spec: InterfaceSpec) -> ET.Element:
    iface = ET.Element("interface", type="network")
    _sub(iface, "source", network=spec.network)
    _sub(iface, "mac", address=spec.mac)
    _sub(iface, "model", type="virtio")
    if spec.target_dev:
        _sub(iface, "target", dev=spec.target_dev)
    if not spec.link_up:
        _sub(iface, "link", state="down")
    if spec.filterref:
        ref = _sub(iface, "filterref", filter=spec.filterref)
        if spec.ip:
            _sub(ref, "parameter", name="IP", value=spec.ip)
        for address in spec.ip6:
            _sub(ref, "parameter", name="IPV6", value=address)
    return iface


def render_interface(spec: InterfaceSpec) -> str:
    """The <interface> device alone, for virDomainAttachDeviceFlags."""
    return _to_string(_interface_element(spec))


# Each sandbox's network is one piece of the configured ranges: an IPv4 /28 (the gateway and the
# guest; a small piece wastes little of a range) and an IPv6 /64 (SLAAC and DHCPv6 want a /64).
SUBNET_PREFIX = 28
SUBNET6_PREFIX = 64


@dataclass(frozen=True)
class NetworkSpec:
    """One sandbox's own network: its bridge, DHCP server and resolver serve that guest alone."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    # IPv6 for the guest, NATed like IPv4, so that allowed IPv6 destinations are reachable and
    # blocked ones are refused by the policy rather than merely unroutable. None: IPv4 only.
    subnet6: ipaddress.IPv6Network | None = None
    # Names the resolver may answer: the sandbox's allowed names. Everything else gets REFUSED,
    # and nothing is ever forwarded to the host's own resolvers.
    dns_hosts: tuple[tuple[str, tuple[str, ...]], ...] = field(default_factory=tuple)
    # The guest's MAC: the DHCP servers give it guest_ip and guest_ip6 (kept for it before it
    # boots, so that the host-side filter can pin them). None: no guest entry (a bare network).
    guest_mac: str | None = None
    # Where the network's dnsmasq logs every query with the asking guest's address (dnslog.py
    # reads it).
    dns_log_dir: str = DNSMASQ_DIR
    # Learn mode only (policy.Learn.ALLOW_ALL): the resolver answers every name, from the
    # hosts file of the machine libvirt runs on, then from these servers. None: only dns_hosts.
    learn_upstream: tuple[str, ...] | None = None
    # Sinkhole mode (EgressPolicy.sinkhole): the resolver answers every other name (A) with the
    # gateway, where the sinkhole listens.
    sinkhole: bool = False
    # Wildcard entries (policy.Wildcard): names under these domains go to the sandbox's own
    # forwarding resolver on the host's loopback, at this port (egress/wildcards.py), which
    # allows each answer's addresses before it returns the answer.
    wildcard_domains: tuple[str, ...] = ()
    wildcard_port: int | None = None

    @property
    def dns_log(self) -> str:
        return dns_log_path(self.name, self.dns_log_dir)

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return None if self.subnet6 is None else self.subnet6.network_address + 1

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def guest_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def guest_ip6(self) -> ipaddress.IPv6Address | None:
        # Above the dynamic DHCPv6 range, with the IPv4 address's host number.
        if self.subnet6 is None:
            return None
        return self.subnet6.network_address + 0x10000 + 2

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        return self.guest_ip, self.subnet.broadcast_address - 1


def resolver_hosts(
    names: Sequence[tuple[str, Sequence[str]]],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The policy's (name, addresses) pairs as the resolver's entries: (address, names)."""
    by_address: dict[str, set[str]] = {}
    for name, addresses in names:
        for address in addresses:
            by_address.setdefault(address, set()).add(name)
    return tuple((a, tuple(sorted(n))) for a, n in sorted(by_address.items()))


def dns_log_path(network: str, directory: str = DNSMASQ_DIR) -> str:
    """Where a network's dnsmasq logs its queries (rotated copies beside it: dnslog.py)."""
    return f"{directory}/{network}.queries.log"


def duid_ll(mac: str) -> str:
    """The DHCPv6 client id (DUID-LL: type 3, hardware type 1, the MAC) of a guest whose networkd
    uses DUIDType=link-layer, as the image configures it."""
    return "00:03:00:01:" + mac.lower()


def render_network(spec: NetworkSpec) -> str:
    ET.register_namespace("dnsmasq", DNSMASQ_NS)
    net = ET.Element("network")
    _sub(net, "name", spec.name)
    # NAT so that allowed destinations are reachable; what is allowed is the egress policy's job.
    forward = _sub(net, "forward", mode="nat")
    nat = _sub(forward, "nat", ipv6="yes") if spec.subnet6 else _sub(forward, "nat")
    _sub(nat, "port", start="1024", end="65535")
    _sub(net, "bridge", name=spec.bridge, stp="off", delay="0")
    dns = _sub(net, "dns", enable="yes", forwardPlainNames="no")
    for address, names in spec.dns_hosts:
        host = _sub(dns, "host", ip=address)
        for hostname in names:
            _sub(host, "hostname", hostname)
    ip = _sub(net, "ip", address=str(spec.gateway), netmask=str(spec.subnet.netmask))
    dhcp = _sub(ip, "dhcp")
    start, end = spec.dhcp_range
    _sub(dhcp, "range", start=str(start), end=str(end))
    if spec.guest_mac:
        # No name: dnsmasq would answer it in DNS.
        _sub(dhcp, "host", mac=spec.guest_mac.lower(), ip=str(spec.guest_ip))
    if spec.subnet6 is not None and spec.gateway6 is not None:
        ip6 = _sub(
            net,
            "ip",
            family="ipv6",
            address=str(spec.gateway6),
            prefix=str(spec.subnet6.prefixlen),
        )
        dhcp6 = _sub(ip6, "dhcp")
        base6 = spec.subnet6.network_address
        _sub(dhcp6, "range", start=str(base6 + 0x100), end=str(base6 + 0x1FF))
        if spec.guest_mac:
            _sub(dhcp6, "host", id=duid_ll(spec.guest_mac), ip=str(spec.guest_ip6))
    # libvirt's dnsmasq otherwise forwards unknown names to the host's resolvers and serves the
    # host's /etc/hosts (docs/platform.md#dns-leaks-of-a-plain-libvirt-network): a DNS
    # exfiltration channel and a leak of host names.
    options = ET.SubElement(net, f"{{{DNSMASQ_NS}}}options")
    if spec.learn_upstream is None:
        resolving = ["no-resolv", "no-hosts"]
    else:
        # Learn mode allows all egress anyway: the names are what it learns.
        resolving = ["no-resolv", *(f"server={a}" for a in spec.learn_upstream)]
    for value in resolving:
        ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=value)
    # Every query, answered or refused, with a serial and the asking guest's address: the host's
    # own record of what the sandboxes tried to resolve (`sandbox logs`), which a guest cannot
    # tamper with.
    for value in ("log-queries=extra", f"log-facility={spec.dns_log}"):
        ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=value)
    if spec.wildcard_port is not None:
        for domain in spec.wildcard_domains:
            value = f"server=/{domain}/127.0.0.1#{spec.wildcard_port}"
            ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=value)
    if spec.sinkhole:
        # Every name; the allowed names' own entries (the <host> elements, an addn-hosts file)
        # still win. AAAA queries stay REFUSED: the sinkhole is IPv4 only.
        ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=f"address=/#/{spec.gateway}")
    return _to_string(net)


@dataclass(frozen=True)
class PoolSpec:
    name: str
    path: str


def render_pool(spec: PoolSpec) -> str:
    pool = ET.Element("pool", type="dir")
    _sub(pool, "name", spec.name)
    target = _sub(pool, "target")
    _sub(target, "path", spec.path)
    return _to_string(pool)


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    capacity: int
    format: str
    backing_path: str | None = None
    backing_format: str | None = None


def render_volume(spec: VolumeSpec) -> str:
    vol = ET.Element("volume")
    _sub(vol, "name", spec.name)
    _sub(vol, "capacity", str(spec.capacity), unit="bytes")
    _sub(vol, "allocation", "0", unit="bytes")
    target = _sub(vol, "target")
    _sub(target, "format", type=spec.format)
    if spec.backing_path:
        backing = _sub(vol, "backingStore")
        _sub(backing, "path", spec.backing_path)
        _sub(backing, "format", type=spec.backing_format or "qcow2")
    return _to_string(vol)

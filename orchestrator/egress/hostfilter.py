"""Host-side egress enforcement: the egress policy as a libvirt nwfilter on the host side of the
guest's interface, where root in the guest cannot flush it.

Only ebtables-level rules (`mac`, `arp`, `ip`, `ipv6`) are used. nwfilter's iptables-level
protocols (`tcp`, `udp`, `all`, `icmp`, ...) only see bridged packets when br_netfilter is loaded
and `net.bridge.bridge-nf-call-iptables=1`; with it off a filtered guest reached a blocked server
silently (docs/platform.md#bridged-packets-and-iptables). ebtables sees every frame that crosses
the bridge port, whatever those sysctls say. The price is statelessness: replies are let in by
address and port, not by connection state, which is enough because what matters is what leaves
the guest.

Rule order (libvirt sorts a chain by priority, lowest first; the referenced filters are jumped to
at their chain's priority): no-mac-spoofing (-800), no-ip-spoofing (-710), no-arp-mac-spoofing
(-520) and no-arp-ip-spoofing (-510) first, so a guest sends only from its own MAC and IPv4
address and claims no other in ARP (one sandbox cannot pose as another, poison the DNS log's
attribution or break another's management session); then our accepts (< 900), then a drop of
everything else (1000) in both directions.
"""

from __future__ import annotations

import contextlib
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import libvirt

from orchestrator import names
from orchestrator.egress.policy import Allow, EgressPolicy, Proto
from orchestrator.errors import HypervisorError
from orchestrator.vm import hypervisor as hv

# libvirt's shipped filters. The MAC ones take $MAC, which libvirt fills in from the interface;
# the IP ones take $IP, the address the network's DHCP server keeps for the guest, given as the
# interface's filterref parameter (domain.py), so libvirt never has to learn it from the guest.
NO_MAC_SPOOFING = "no-mac-spoofing"
NO_ARP_MAC_SPOOFING = "no-arp-mac-spoofing"
NO_IP_SPOOFING = "no-ip-spoofing"
NO_ARP_IP_SPOOFING = "no-arp-ip-spoofing"
ANTI_SPOOFING = (NO_MAC_SPOOFING, NO_ARP_MAC_SPOOFING, NO_IP_SPOOFING, NO_ARP_IP_SPOOFING)
# libvirt ships no IPv6 counterpart: ours, shared by every sandbox, takes $IPV6 (the guest's
# DHCPv6 address and its EUI-64 link-local address, as filterref parameters).
# An underscore, which sandbox names never have: no sandbox's own filter can take this name.
NO_IPV6_SPOOFING = "sandbox_no-ipv6-spoofing"
SHARED_FILTERS = (NO_IPV6_SPOOFING,)
UNSPECIFIED6 = ipaddress.IPv6Address("::")  # the source of duplicate address detection

BROADCAST = ipaddress.IPv4Address("255.255.255.255")
LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
LINK_MULTICAST6 = ipaddress.IPv6Network("ff02::/16")
# All_DHCP_Relay_Agents_and_Servers: where a DHCPv6 client sends, renewals included.
DHCP6_SERVERS = ipaddress.IPv6Network("ff02::1:2/128")

# Priorities within the root chain (libvirt's range is -1000..1000).
PRIO_DROP_IPV6 = 50
PRIO_ARP = 100
PRIO_DHCP = 110
PRIO_ND = 120
PRIO_DNS = 130
PRIO_SSH = 140
PRIO_ALLOW = 200
PRIO_DROP_ALL = 1000

# ICMPv6 neighbour discovery: router solicitation/advertisement, neighbour solicitation/advert.
ND_RS, ND_RA, ND_NS, ND_NA = 133, 134, 135, 136

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Direction(Enum):
    OUT = "out"  # from the guest
    IN = "in"  # to the guest


@dataclass(frozen=True)
class Rule:
    """One nwfilter rule with an ebtables-level match (`element` is mac, arp, ip or ipv6)."""

    action: str
    direction: Direction
    priority: int
    element: str
    match: tuple[tuple[str, str], ...] = ()
    comment: str = ""


Match = tuple[tuple[str, str], ...]


def _dst(network: IPNetwork) -> Match:
    return (("dstipaddr", str(network.network_address)), ("dstipmask", str(network.prefixlen)))


def _src(network: IPNetwork) -> Match:
    return (("srcipaddr", str(network.network_address)), ("srcipmask", str(network.prefixlen)))


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> IPNetwork:
    return ipaddress.ip_network(address)


def _proto(protocol: str, *, sport: int | None = None, dport: int | None = None) -> Match:
    match = [("protocol", protocol)]
    if sport is not None:
        match.append(("srcportstart", str(sport)))
    if dport is not None:
        match.append(("dstportstart", str(dport)))
    return tuple(match)


def _nd(first: int, last: int) -> Match:
    return (("protocol", "icmpv6"), ("type", str(first)), ("typeend", str(last)))


def _out(priority: int, element: str, match: Match, comment: str) -> Rule:
    return Rule("accept", Direction.OUT, priority, element, match, comment)


def _in(priority: int, element: str, match: Match, comment: str) -> Rule:
    return Rule("accept", Direction.IN, priority, element, match, comment)


def _allow_rules(entry: Allow) -> Iterator[Rule]:
    """An allowed destination out, and its replies in (same network, the ports reversed)."""
    element = "ip" if entry.version == 4 else "ipv6"
    what = f"allow {entry.describe()}"
    if entry.proto is Proto.ICMP:
        protos: tuple[str | None, ...] = ("icmp" if entry.version == 4 else "icmpv6",)
    elif entry.proto is Proto.ANY:
        protos = (None,) if entry.port is None else ("tcp", "udp")
    else:
        protos = (entry.proto.value,)
    for proto in protos:
        out_match = () if proto is None else _proto(proto, dport=entry.port)
        in_match = () if proto is None else _proto(proto, sport=entry.port)
        yield _out(PRIO_ALLOW, element, _dst(entry.network) + out_match, what)
        yield _in(PRIO_ALLOW, element, _src(entry.network) + in_match, what)


def _ipv4_rules(policy: EgressPolicy, gateway: ipaddress.IPv4Address) -> Iterator[Rule]:
    gw = _host(gateway)
    # The guest resolves the gateway; no-arp-mac-spoofing has already dropped forged senders.
    yield _out(PRIO_ARP, "arp", (), "arp")
    yield _in(PRIO_ARP, "arp", (), "arp")
    # Pinned to broadcast or the gateway: an unpinned 68->67 rule let a packet out to an outside
    # address (docs/platform.md#nwfilter).
    for dst in (_host(BROADCAST), gw):
        yield _out(PRIO_DHCP, "ip", _dst(dst) + _proto("udp", sport=68, dport=67), "dhcp")
    yield _in(PRIO_DHCP, "ip", _src(gw) + _proto("udp", sport=67, dport=68), "dhcp")
    if policy.dns:
        for proto in ("udp", "tcp"):
            yield _out(PRIO_DNS, "ip", _dst(gw) + _proto(proto, dport=53), "dns via the gateway")
            yield _in(PRIO_DNS, "ip", _src(gw) + _proto(proto, sport=53), "dns via the gateway")
    # Management SSH: the host connects in, the guest only ever answers from port 22.
    yield _in(PRIO_SSH, "ip", _src(gw) + _proto("tcp", dport=22), "ssh")
    yield _out(PRIO_SSH, "ip", _dst(gw) + _proto("tcp", sport=22), "ssh")
    # Errors the host sends about the guest's own traffic (unreachable, fragmentation needed).
    yield _in(PRIO_SSH, "ip", _src(gw) + _proto("icmp"), "icmp from the gateway")
    for entry in policy.for_version(4):
        yield from _allow_rules(entry)


def _ipv6_rules(policy: EgressPolicy, gateway6: ipaddress.IPv6Address | None) -> Iterator[Rule]:
    entries = policy.for_version(6)
    if not entries:
        # No IPv6 destination is allowed: no IPv6 at all, not even neighbour discovery.
        no_ipv6 = (("protocolid", "ipv6"),)
        for direction in Direction:
            yield Rule("drop", direction, PRIO_DROP_IPV6, "mac", no_ipv6, "no ipv6")
        return
    gw6 = () if gateway6 is None else (_host(gateway6),)
    # Neighbour discovery, router solicitation and DHCPv6 stay on the link: pinned to link-local
    # and link-scope multicast destinations (or the gateway), since an ICMPv6 or UDP packet of
    # any type sent to an outside address would be routed like any other.
    for dst in (LINK_LOCAL6, LINK_MULTICAST6, *gw6):
        yield _out(PRIO_ND, "ipv6", _dst(dst) + _nd(ND_RS, ND_RS), "router solicitation")
        yield _out(PRIO_ND, "ipv6", _dst(dst) + _nd(ND_NS, ND_NA), "neighbour discovery")
    for src in (LINK_LOCAL6, *gw6):
        yield _in(PRIO_ND, "ipv6", _src(src) + _nd(ND_RA, ND_NA), "router adv., neighbours")
    for dst in (DHCP6_SERVERS, *gw6):
        yield _out(PRIO_DHCP, "ipv6", _dst(dst) + _proto("udp", sport=546, dport=547), "dhcpv6")
    for src in (LINK_LOCAL6, *gw6):
        yield _in(PRIO_DHCP, "ipv6", _src(src) + _proto("udp", sport=547, dport=546), "dhcpv6")
    if policy.dns and gateway6 is not None:
        gw = _host(gateway6)
        for proto in ("udp", "tcp"):
            yield _out(PRIO_DNS, "ipv6", _dst(gw) + _proto(proto, dport=53), "dns via the gateway")
            yield _in(PRIO_DNS, "ipv6", _src(gw) + _proto(proto, sport=53), "dns via the gateway")
    for entry in entries:
        yield from _allow_rules(entry)


def filter_rules(
    policy: EgressPolicy,
    *,
    gateway: ipaddress.IPv4Address,
    gateway6: ipaddress.IPv6Address | None,
) -> list[Rule]:
    """The rules of a sandbox's filter, in priority order. Pure."""
    rules = [*_ipv4_rules(policy, gateway), *_ipv6_rules(policy, gateway6)]
    # Everything not accepted above: other guests, the gateway's other ports, the metadata
    # address, other ethertypes.
    rules += [Rule("drop", d, PRIO_DROP_ALL, "mac", comment="default drop") for d in Direction]
    return sorted(rules, key=lambda r: r.priority)


def render_filter(
    name: str,
    policy: EgressPolicy,
    *,
    gateway: ipaddress.IPv4Address,
    gateway6: ipaddress.IPv6Address | None,
    uuid: str | None = None,
) -> str:
    """The nwfilter XML for sandbox `name` (named `names.nwfilter(name)`)."""
    root = ET.Element("filter", name=names.nwfilter(name), chain="root")
    if uuid is not None:
        ET.SubElement(root, "uuid").text = uuid
    for ref in ANTI_SPOOFING + ((NO_IPV6_SPOOFING,) if gateway6 is not None else ()):
        ET.SubElement(root, "filterref", filter=ref)
    for rule in filter_rules(policy, gateway=gateway, gateway6=gateway6):
        el = ET.SubElement(
            root,
            "rule",
            action=rule.action,
            direction=rule.direction.value,
            priority=str(rule.priority),
        )
        attrs = dict(rule.match)
        if rule.comment:
            attrs["comment"] = rule.comment
        ET.SubElement(el, rule.element, attrs)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def render_ipv6_spoofing_filter() -> str:
    """The shared filter that lets a guest send IPv6 only from its own addresses ($IPV6, one rule
    per value) or from :: (duplicate address detection), like no-ip-spoofing does for IPv4."""
    root = ET.Element("filter", name=NO_IPV6_SPOOFING, chain="ipv6-ip", priority="-710")
    allowed = ET.SubElement(root, "rule", action="return", direction="out", priority="500")
    ET.SubElement(allowed, "ipv6", srcipaddr="$IPV6")
    dad = ET.SubElement(root, "rule", action="return", direction="out", priority="510")
    ET.SubElement(dad, "ipv6", srcipaddr=str(UNSPECIFIED6))
    ET.SubElement(root, "rule", action="drop", direction="out", priority="1000")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address of a MAC (the guest's networkd is told to use it). Pure."""
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    eui = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


# ---- libvirt edge --------------------------------------------------------------------------


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virNWFilter | None:
    return hv.lookup_or_none(
        lambda: conn.nwfilterLookupByName(name),
        libvirt.VIR_ERR_NO_NWFILTER,
        f"network filter {name}",
        "check that libvirt's nwfilter driver is available (libvirt-daemon-driver-nwfilter); "
        "the test:/// driver has none",
    )


def filter_xml(conn: libvirt.virConnect, sandbox: str) -> str | None:
    """The defined filter of a sandbox as libvirt holds it, or None."""
    nwfilter = _lookup(conn, names.nwfilter(sandbox))
    if nwfilter is None:
        return None
    try:
        return str(nwfilter.XMLDesc(0))
    except libvirt.libvirtError as exc:
        if hv.error_code(exc) == libvirt.VIR_ERR_NO_NWFILTER:
            return None
        raise HypervisorError(
            f"cannot read network filter {names.nwfilter(sandbox)}: {exc}"
        ) from None


def define_filter(conn: libvirt.virConnect, xml: str) -> None:
    """Define a filter, or re-define it in place: libvirt rebuilds the rules of every running
    interface using it (~2 s). Without a <uuid> in `xml` the existing filter's uuid is kept, as
    libvirt refuses a second filter of the same name with another uuid."""
    root = ET.fromstring(xml)
    name = root.get("name", "")
    if root.find("uuid") is None:
        existing = _lookup(conn, name)
        if existing is not None:
            uuid = ET.Element("uuid")
            uuid.text = str(existing.UUIDString())
            root.insert(0, uuid)
            xml = ET.tostring(root, encoding="unicode")
    try:
        conn.nwfilterDefineXML(xml)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"libvirt refused the network filter {name}: {exc}",
            "check that the nwfilter driver and ebtables are installed on the hypervisor host "
            "(libvirt-daemon-driver-nwfilter, iptables); run with --debug for the filter XML",
        ) from None


def ensure_shared_filters(conn: libvirt.virConnect) -> None:
    """Define the filters every sandbox's filter refers to, once: re-defining one that running
    guests use would make libvirt rebuild all their rules."""
    if _lookup(conn, NO_IPV6_SPOOFING) is None:
        define_filter(conn, render_ipv6_spoofing_filter())


def remove_shared_filters(conn: libvirt.virConnect) -> list[str]:
    """Undefine the shared filters once no guest uses them (with the last sandbox's network); one
    still in use stays. Returns the names removed."""
    removed = []
    for name in SHARED_FILTERS:
        nwfilter = _lookup(conn, name)
        if nwfilter is None:
            continue
        with contextlib.suppress(libvirt.libvirtError):
            nwfilter.undefine()
            removed.append(name)
    return removed


def remove_filter(conn: libvirt.virConnect, sandbox: str) -> bool:
    """Undefine a sandbox's filter; False if there was none. A filter still used by a running
    domain cannot be removed: destroy the domain first."""
    name = names.nwfilter(sandbox)
    nwfilter = _lookup(conn, name)
    if nwfilter is None:
        return False
    try:
        nwfilter.undefine()
    except libvirt.libvirtError as exc:
        if hv.error_code(exc) == libvirt.VIR_ERR_NO_NWFILTER:
            return False
        raise HypervisorError(
            f"cannot remove network filter {name}: {exc}",
            f"a running VM still uses it: run `sandbox destroy --name {sandbox}` first",
        ) from None
    return True

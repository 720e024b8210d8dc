"""The host's own side of the sandbox network: what a guest may open on the host itself.

The host-side nwfilter (hostfilter.py) is stateless, ebtables-level: it lets the guest's replies
to the management SSH session out by address and port (`tcp sport 22` to the gateway). Guest
root can forge exactly that, SNAT its source port to 22, and reach every TCP service listening
on the host's bridge address (or on 0.0.0.0). ebtables cannot tell a reply from a new
connection; the host's own conntrack can, and it sees every packet addressed to the host at the
IP layer whatever br_netfilter's sysctls say (the packet is delivered locally on the bridge
device, not bridged). So one nftables table per sandbox network, on the input hook of its bridge:

- replies to connections the host opened (its SSH sessions to the guests) pass;
- the services a guest needs from the host pass: DHCP, DHCPv6, DNS (the network's dnsmasq),
  ICMP and ICMPv6 (neighbour discovery, errors);
- every other new connection from the guests to the host is rejected.

A drop in any nftables base chain is final, so libvirt's own accepting chains (LIBVIRT_INP)
cannot reopen it. The table lives as long as the network: created with it, removed with it.
It needs the host's nft (package nftables) and CAP_NET_ADMIN where libvirtd's network runs, so it
is applied only when the hypervisor is local.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass

from orchestrator import names
from orchestrator.egress.policy import Allow, Proto
from orchestrator.errors import SandboxError
from orchestrator.vm.hostfiles import LOCAL, HostFiles, Ran

NFT_TIMEOUT = 10.0


class GuardError(SandboxError):
    """The host-side input guard of the sandbox network could not be set or checked."""


# The sets the sandbox's resolver fills with the addresses it hands out for wildcard entries
# (egress/wildcards.py): address . protocol . port.
WILD_SET4 = "wild4"
WILD_SET6 = "wild6"
# A guest asking random names under a wildcard domain must not grow the host's sets without
# bound: the resolver stops handing out new addresses at this many (and says so in its log).
WILD_MAX = 4096


@dataclass(frozen=True)
class Wildcards:
    """Wildcard entries (policy.Wildcard) on this sandbox network: the protocol/port pairs the
    nwfilter opens to every address, the policy's allow entries (which stay allowed on them), and
    whether a packet to any other address there is rejected or dropped."""

    ports: tuple[tuple[str, int], ...]
    allow: tuple[Allow, ...]
    reject: bool = True


def _allow_match(entry: Allow) -> str | None:
    """An allow entry as an nft match (None: ICMP, which no wildcard port concerns). Pure."""
    if entry.proto is Proto.ICMP:
        return None
    if entry.network.prefixlen == 0:
        match = f"meta nfproto {'ipv4' if entry.version == 4 else 'ipv6'} "
    else:
        match = f"{'ip' if entry.version == 4 else 'ip6'} daddr {entry.network} "
    if entry.proto is Proto.ANY and entry.port is None:
        return match
    protos = "{ tcp, udp }" if entry.proto is Proto.ANY else entry.proto.value
    port = "" if entry.port is None else f" th dport {entry.port}"
    return f"{match}meta l4proto {protos}{port} "


def element(address: str, proto: str, port: int) -> str:
    """One member of the wildcard sets, in nft's syntax. Pure."""
    return f"{ipaddress.ip_address(address)} . {proto} . {port}"


@dataclass(frozen=True)
class Sinkhole:
    """Sinkhole mode: the gateway's address, and the port the sinkhole listens on there."""

    address: str
    port: int


def _forward(quoted: str, wildcards: Wildcards) -> list[str]:
    """The forward chain that decides what the guest reaches on a wildcard's ports: the
    addresses the resolver handed out (the sets) and the allow entries; nothing else there."""
    ports = ", ".join(f"{proto} . {port}" for proto, port in sorted(set(wildcards.ports)))
    verdict = "reject with icmpx admin-prohibited" if wildcards.reject else "drop"
    accepts = [m for m in map(_allow_match, wildcards.allow) if m is not None]
    lines = [f"\tset {WILD_SET4} {{", "\t\ttype ipv4_addr . inet_proto . inet_service", "\t}"]
    lines += [f"\tset {WILD_SET6} {{", "\t\ttype ipv6_addr . inet_proto . inet_service", "\t}"]
    lines += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter - 10; policy accept;",
        f"\t\tiifname != {quoted} accept",
        f'\t\tip daddr . meta l4proto . th dport @{WILD_SET4} accept comment "handed out"',
        f'\t\tip6 daddr . meta l4proto . th dport @{WILD_SET6} accept comment "handed out"',
        *(f'\t\t{m}accept comment "allowed"' for m in accepts),
        f'\t\tmeta l4proto . th dport {{ {ports} }} counter {verdict} comment "wildcard ports"',
        "\t}",
    ]
    return lines


def render_ruleset(
    bridge: str, sinkhole: Sinkhole | None = None, wildcards: Wildcards | None = None
) -> str:
    """The nft script that creates (or replaces, atomically) the guard of `bridge`. Pure."""
    table = names.guard_table(bridge)
    quoted = json.dumps(bridge)  # nft strings are double-quoted like JSON's
    forward = _forward(quoted, wildcards) if wildcards and wildcards.ports else []
    sink: list[str] = []
    redirect: list[str] = []
    if sinkhole is not None:
        # Every TCP port of the gateway but DNS leads to the sinkhole (its conntrack entry keeps
        # the port asked for); UDP there gets no answer at all, not even an ICMP error.
        address = ipaddress.IPv4Address(sinkhole.address)
        sink = [
            f'\t\tip daddr {address} tcp dport {sinkhole.port} accept comment "sinkhole"',
            f'\t\tip daddr {address} udp dport != {{ 53, 67 }} drop comment "sinkhole (udp)"',
        ]
        redirect = [
            "\tchain sinkhole {",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            f"\t\tiifname {quoted} ip daddr {address} tcp dport != 53 "
            f'redirect to :{sinkhole.port} comment "sinkhole"',
            "\t}",
        ]
    lines = [
        # Declared, flushed and filled in one transaction: a re-run replaces it atomically.
        f"table inet {table} {{}}",
        f"flush table inet {table}",
        f"table inet {table} {{",
        "\tchain input {",
        # Before the filter priority, so that it runs ahead of the host's own accepting rules.
        "\t\ttype filter hook input priority filter - 10; policy accept;",
        f"\t\tiifname != {quoted} accept",
        '\t\tct state established,related accept comment "the host\'s own SSH sessions"',
        "\t\tct state invalid drop",
        '\t\tudp dport { 53, 67 } accept comment "dns, dhcp"',
        '\t\ttcp dport 53 accept comment "dns"',
        '\t\tudp dport 547 accept comment "dhcpv6"',
        '\t\tmeta l4proto { icmp, ipv6-icmp } accept comment "icmp, neighbour discovery"',
        *sink,
        '\t\tcounter reject with icmpx admin-prohibited comment "anything else a guest opens"',
        "\t}",
        *redirect,
        *forward,
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft() -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise GuardError(
            "nft is not installed: the host cannot keep guests away from its own services",
            "install the nftables package (scripts/install.sh does)",
        )
    return nft


def _run(args: list[str], stdin: str | None = None, host: HostFiles | None = None) -> Ran:
    """nft here, or on the remote libvirt host `host` (over SSH, as its login user)."""
    if host is None or host is LOCAL:
        try:
            proc = subprocess.run(
                [_nft(), *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise GuardError(
                f"nft {' '.join(args)} did not finish within {NFT_TIMEOUT:.0f} s",
                "check the host's nftables (`nft list ruleset`)",
            ) from None
        return Ran(proc.returncode, proc.stdout, proc.stderr)
    ran = host.run(["nft", *args], stdin)
    if ran.status == 127:
        raise GuardError(
            f"nft is not installed on {host.where}: it cannot keep guests away from its own "
            "services",
            "install the nftables package there (apt-get install nftables)",
        )
    return ran


def _hint(host: HostFiles | None) -> str:
    if host is None or host is LOCAL:
        return "run as root on the hypervisor host, with the nftables package installed"
    return (
        f"sandbox sets the guard on {host.where} with nft over SSH, which needs root there: "
        "connect as root (qemu+ssh://root@HOST/system)"
    )


def apply(
    bridge: str,
    sinkhole: Sinkhole | None = None,
    host: HostFiles | None = None,
    wildcards: Wildcards | None = None,
) -> None:
    """Create or replace the guard of `bridge` (atomically), on this machine or on `host`."""
    ran = _run(["-f", "-"], render_ruleset(bridge, sinkhole, wildcards), host)
    if ran.status != 0:
        where = "" if host is None or host is LOCAL else f" on {host.where}"
        raise GuardError(
            f"cannot load the host-side input guard for bridge {bridge}{where}: "
            f"{ran.stderr.strip()[-500:]}",
            _hint(host),
        )


def present(bridge: str, host: HostFiles | None = None) -> bool:
    """Whether the guard table of `bridge` is loaded, with its final reject in place."""
    ran = _run(["list", "table", "inet", names.guard_table(bridge)], host=host)
    return ran.status == 0 and "reject" in ran.stdout and f'"{bridge}"' in ran.stdout


def remove(bridge: str, host: HostFiles | None = None) -> bool:
    """Delete the guard of `bridge`; False if there was none."""
    table = names.guard_table(bridge)
    if _run(["list", "table", "inet", table], host=host).status != 0:
        return False
    ran = _run(["delete", "table", "inet", table], host=host)
    if ran.status != 0:
        raise GuardError(
            f"cannot remove the host-side input guard {table}: {ran.stderr.strip()[-500:]}",
            f"remove it by hand: nft delete table inet {table}",
        )
    return True


def add_handed_out(
    bridge: str, elements: list[tuple[str, str, int]], host: HostFiles | None = None
) -> None:
    """Add (address, protocol, port) members to the wildcard sets of `bridge`'s guard, on this
    machine or on the remote libvirt host `host`."""
    if not elements:
        return
    lines = []
    table = names.guard_table(bridge)
    for address, proto, port in elements:
        family = WILD_SET4 if ipaddress.ip_address(address).version == 4 else WILD_SET6
        lines.append(f"add element inet {table} {family} {{ {element(address, proto, port)} }}")
    ran = _run(["-f", "-"], "\n".join(lines) + "\n", host)
    if ran.status != 0:
        raise GuardError(
            f"cannot add the handed-out addresses to {table}: {ran.stderr.strip()[-300:]}",
            _hint(host),
        )

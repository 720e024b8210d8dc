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
from orchestrator.errors import SandboxError
from orchestrator.vm.hostfiles import LOCAL, HostFiles, Ran

NFT_TIMEOUT = 10.0


class GuardError(SandboxError):
    """The host-side input guard of the sandbox network could not be set or checked."""


@dataclass(frozen=True)
class Sinkhole:
    """Sinkhole mode: the gateway's address, and the port the sinkhole listens on there."""

    address: str
    port: int


def render_ruleset(bridge: str, sinkhole: Sinkhole | None = None) -> str:
    """The nft script that creates (or replaces, atomically) the guard of `bridge`. Pure."""
    table = names.guard_table(bridge)
    quoted = json.dumps(bridge)  # nft strings are double-quoted like JSON's
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


def apply(bridge: str, sinkhole: Sinkhole | None = None, host: HostFiles | None = None) -> None:
    """Create or replace the guard of `bridge` (atomically), on this machine or on `host`."""
    ran = _run(["-f", "-"], render_ruleset(bridge, sinkhole), host)
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

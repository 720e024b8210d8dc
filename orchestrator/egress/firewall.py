"""EgressPolicy → iptables-restore / ip6tables-restore text for the guest, and the check that what
the guest's kernel holds is what we meant. Pure: the lead pushes and reads back over SSH.

The text is written in the exact form `iptables-save` (1.8.9, nf_tables backend, as on Debian 12)
prints back, so verification is a comparison of lines, not a parse of iptables syntax.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Collection, Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address

from orchestrator.egress.policy import Allow, Blocked, EgressPolicy, IPNetwork, Proto
from orchestrator.errors import UsageError

# NFLOG prefixes, one record per NEW attempt: the guest's capture takes every packet these rules
# log (images/capture/connect.bpf.c, where the rule runs), the connection log reads the verdict
# from the prefix. Nothing listens on the group: the packet costs no more than that. (LOG to the
# kernel log, as the recipe did, cost a burst of attempts 7-10 % of its run time under TCG, and
# as much again while journald copied it: benchmarks/capture.py.)
NFLOG_GROUP = 7
LOG_ALLOW = "SBX-ALLOW "
LOG_BLOCK = "SBX-BLOCK "
LOG_DNS = "SBX-DNS "
LOG_BOOT = "SBX-BOOT "  # the image's boot rules (images/rootfs/etc/sandbox/boot-v*.rules)
# Packets 2..ESTABLISHED_LOG_PACKETS of an answered UDP flow, by its first packet's verdict. A new
# socket that gets the source port of a flow conntrack still holds (UDP flows live 30-120 s after
# their last packet; a burst of UDP connects hits one every few dozen) rides it as ESTABLISHED
# and is never NEW: without these its attempt has no firewall record. The connection log tells
# the flow's own next datagram (IPv4 ID +1) from another socket's (a random ID) and never counts
# one of these records without a connect() of its own (orchestrator/capture/monitor.py).
LOG_ALLOW_EST = "SBX-ALLOW-EST "
LOG_DNS_EST = "SBX-DNS-EST "
ESTABLISHED_LOG_PACKETS = 16
# The verdict of a flow's first packet, kept on the conntrack entry (connmark bits 0-1).
_MARK_ALLOW = "0x1/0x3"
_MARK_DNS = "0x2/0x3"

CHAIN_ALLOW = "SBX-ALLOW"
CHAIN_BLOCK = "SBX-BLOCK"
CHAIN_DNS = "SBX-DNS"
# Wildcard entries (policy.Wildcard): empty when the rules load; the sandbox's resolver appends
# one rule per address it hands out (egress/wildcards.py, `wildcard_rule`), before the guest
# reads the answer.
CHAIN_WILD = "SBX-WILD"

# Neighbour discovery (133-136) and the kernel's own multicast listener reports (143): without
# them nothing IPv6 works, and MLD reports would fill the block log with attempts nobody made.
ND_TYPES = (133, 134, 135, 136, 143)

_BUILTIN_POLICIES = (("INPUT", "ACCEPT"), ("FORWARD", "DROP"), ("OUTPUT", "DROP"))
# iptables-save lists built-in chains first, then user chains sorted by name.
_USER_CHAINS = tuple(sorted((CHAIN_ALLOW, CHAIN_BLOCK, CHAIN_DNS)))


def _check_version(version: int) -> None:
    if version not in (4, 6):
        raise UsageError(f"IP version {version} is neither 4 nor 6", "render for version 4 or 6")


def _icmp(version: int) -> str:
    return "icmp" if version == 4 else "ipv6-icmp"


def _dest(network: IPNetwork) -> str:
    # iptables-save leaves out a match-everything destination.
    return "" if network.prefixlen == 0 else f"-d {network} "


def _proto_port(proto: str, port: int | None, *, sport: int | None = None) -> str:
    text = f"-p {proto} "
    if proto in ("tcp", "udp") and (port is not None or sport is not None):
        text += f"-m {proto} "
        if sport is not None:
            text += f"--sport {sport} "
        if port is not None:
            text += f"--dport {port} "
    return text


def _allow_rules(entry: Allow, version: int) -> list[str]:
    dest = _dest(entry.network)
    jump = f"-j {CHAIN_ALLOW}"
    if entry.proto is Proto.ICMP:
        if entry.port is not None:
            raise UsageError(f"{entry.describe()}: ICMP has no ports", "drop the port")
        return [f"-A OUTPUT {dest}{_proto_port(_icmp(version), None)}{jump}"]
    if entry.proto is Proto.ANY and entry.port is None:
        return [f"-A OUTPUT {dest}{jump}"]
    protos = ("tcp", "udp") if entry.proto is Proto.ANY else (entry.proto.value,)
    return [f"-A OUTPUT {dest}{_proto_port(p, entry.port)}{jump}" for p in protos]


def wildcard_rule(address: IPv4Address | IPv6Address, proto: str, port: int) -> str:
    """The rule the resolver appends for one address it handed out, as iptables-save prints it
    (read-backs compare it with the resolver's record). Pure."""
    prefix = 32 if address.version == 4 else 128
    return f"-A {CHAIN_WILD} -d {address}/{prefix} {_proto_port(proto, port)}-j {CHAIN_ALLOW}"


def _log(chain: str, prefix: str) -> str:
    return f'-A {chain} -j NFLOG --nflog-prefix "{prefix}" --nflog-group {NFLOG_GROUP}'


def render_rules(
    policy: EgressPolicy,
    *,
    version: int,
    resolver: IPv4Address,
    resolver6: IPv6Address | None = None,
) -> str:
    """The filter table for one IP version, as iptables-restore input (replaces the whole table).

    `resolver` is the sandbox network's gateway, which also serves DHCP and DNS; `resolver6` its
    IPv6 address if the network has one (DNS, and DHCPv6 renewals next to the multicast group).
    """
    _check_version(version)
    lines = ["*filter"]
    lines += [f":{chain} {target} [0:0]" for chain, target in _BUILTIN_POLICIES]
    chains = (*_USER_CHAINS, *((CHAIN_WILD,) if policy.wildcards else ()))
    lines += [f":{chain} - [0:0]" for chain in chains]

    established_udp = (
        "-A OUTPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir ORIGINAL -m connmark --mark "
        "{mark} -m connbytes --connbytes 2:{packets} --connbytes-mode packets --connbytes-dir "
        'original -j NFLOG --nflog-prefix "{prefix}" --nflog-group {group}'
    )
    gateway: IPv4Address | IPv6Address | None = resolver if version == 4 else resolver6
    dns = policy.dns and gateway is not None
    marks = [(_MARK_ALLOW, LOG_ALLOW_EST), *([(_MARK_DNS, LOG_DNS_EST)] if dns else [])]
    out = [
        "-A OUTPUT -o lo -j ACCEPT",
        *(
            established_udp.format(
                mark=mark, packets=ESTABLISHED_LOG_PACKETS, prefix=prefix, group=NFLOG_GROUP
            )
            for mark, prefix in marks
        ),
        # Replies of flows already known, above all the management SSH session from the host.
        "-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        # A TCP flow that was open before these rules first loaded conntrack is first seen
        # mid-stream and is then NEW (measured: with the guest speaking first, the SSH session that
        # pushed the rules was reset). Only a SYN opens a connection: non-SYN NEW packets are
        # such picked-up flows, or hand-made by root, who can flush this table anyway.
        "-A OUTPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m conntrack --ctstate NEW -j ACCEPT",
        # A late segment of a TCP connection that has ended (the guest's sshd answering after
        # the host's end of a management session closed) is INVALID to conntrack: no attempt,
        # and logged as a blocked one it showed as a connection from port 22 to the gateway.
        # Dropped here, it never leaves the guest, so it can carry nothing out either.
        "-A OUTPUT -p tcp -m conntrack --ctstate INVALID -j DROP",
    ]
    if version == 4:
        # DHCP renewals: pinned to the gateway and broadcast, never to any address (a bare
        # 68→67 rule is a way out).
        for dhcp in (resolver, IPv4Address("255.255.255.255")):
            out.append(f"-A OUTPUT -d {dhcp}/32 {_proto_port('udp', 67, sport=68)}-j ACCEPT")
    else:
        out += [f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in ND_TYPES]
        # DHCPv6: the network hands out addresses with leases; without renewals the guest loses
        # its IPv6 address after the first lease time. Pinned like DHCP for IPv4.
        dhcp6 = [IPv6Address("ff02::1:2"), *([resolver6] if resolver6 else [])]
        for server in dhcp6:
            out.append(f"-A OUTPUT -d {server}/128 {_proto_port('udp', 547, sport=546)}-j ACCEPT")
    if dns and gateway is not None:
        prefix = 32 if version == 4 else 128
        out += [
            f"-A OUTPUT -d {gateway}/{prefix} {_proto_port(p, 53)}-j {CHAIN_DNS}"
            for p in ("udp", "tcp")
        ]
    for entry in policy.for_version(version):
        out += _allow_rules(entry, version)
    if policy.wildcards:
        out.append(f"-A OUTPUT -j {CHAIN_WILD}")
    out.append(f"-A OUTPUT -j {CHAIN_BLOCK}")

    # Rules grouped by chain in the order iptables-save prints them (user chains by name).
    out += [
        _log(CHAIN_ALLOW, LOG_ALLOW),
        f"-A {CHAIN_ALLOW} -j CONNMARK --set-xmark {_MARK_ALLOW}",
        f"-A {CHAIN_ALLOW} -j ACCEPT",
    ]
    out.append(_log(CHAIN_BLOCK, LOG_BLOCK))
    if policy.blocked is Blocked.REJECT:
        unreachable = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"
        out += [
            # A TCP reset makes connect() fail at once with ECONNREFUSED.
            f"-A {CHAIN_BLOCK} -p tcp -j REJECT --reject-with tcp-reset",
            f"-A {CHAIN_BLOCK} -j REJECT --reject-with {unreachable}",
        ]
    else:
        out.append(f"-A {CHAIN_BLOCK} -j DROP")
    out += [
        _log(CHAIN_DNS, LOG_DNS),
        f"-A {CHAIN_DNS} -j CONNMARK --set-xmark {_MARK_DNS}",
        f"-A {CHAIN_DNS} -j ACCEPT",
    ]
    return "\n".join([*lines, *out, "COMMIT", ""])


def _strip_counters(line: str) -> str:
    if line.startswith("["):
        _, _, line = line.partition("] ")
    return line


def _rule_chain(line: str) -> str:
    parts = line.split(maxsplit=2)
    return parts[1] if len(parts) > 1 and parts[0] == "-A" else ""


def normalize(saved: str) -> list[str]:
    """Comparable lines of iptables-save (or iptables-restore) text: no comments or counters,
    chain declarations sorted, rules grouped by chain (chains by name, rule order kept)."""
    result: list[str] = []
    decls: list[str] = []
    rules: list[str] = []

    def flush() -> None:
        result.extend(sorted(decls))
        result.extend(sorted(rules, key=_rule_chain))  # stable: order within a chain is kept
        decls.clear()
        rules.clear()

    for raw in saved.splitlines():
        line = _strip_counters(raw.strip())
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            name, policy, *_ = line[1:].split()
            decls.append(f":{name} {policy}")
        elif line.startswith("-"):
            rules.append(line)
        else:  # *table, COMMIT
            flush()
            result.append(line)
    flush()
    return result


def _report(tag: str, lines: Iterable[str]) -> list[str]:
    return [f"{tag}: {line}" for line in lines]


def differences(expected: str, saved: str, handed_out: Collection[str] = ()) -> list[str]:
    """[] when the saved table is the rendered one; else one readable line per difference, e.g.
    `missing: -A OUTPUT -j SBX-BLOCK` or `unexpected: -A OUTPUT -j ACCEPT`. `handed_out`: the
    wildcard rules the resolver recorded before it added them (`wildcard_rule`), which the table
    may hold on top of the rendered rules; any other rule in that chain is unexpected."""
    want = normalize(expected)
    have = [line for line in normalize(saved) if line not in handed_out]
    if want == have:
        return []
    found: list[str] = []
    matcher = difflib.SequenceMatcher(a=want, b=have, autojunk=False)
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op in ("delete", "replace"):
            found += _report("missing", want[a1:a2])
        if op in ("insert", "replace"):
            found += _report("unexpected", have[b1:b2])
    return found


_SAVE_SPLIT = "----- sandbox: end of IPv4 rules -----"


def save_script() -> list[str]:
    """Shell lines printing both filter tables, IPv4 first, for `mismatches` to check."""
    return [
        shlex.join(restore_commands(4)[1]),
        f"echo {shlex.quote(_SAVE_SPLIT)}",
        shlex.join(restore_commands(6)[1]),
    ]


def mismatches(
    expected: Mapping[int, str], printed: str, handed_out: Collection[str] = ()
) -> dict[int, list[str]]:
    """What `save_script`'s output differs in from the expected tables, per IP version."""
    saved4, _, saved6 = printed.partition(_SAVE_SPLIT + "\n")
    found = {}
    for version, text in ((4, saved4), (6, saved6)):
        diff = differences(expected[version], text, handed_out)
        if diff:
            found[version] = diff
    return found


def restore_commands(version: int) -> tuple[list[str], list[str]]:
    """(argv that loads rendered text from stdin, argv that prints the filter table back)."""
    _check_version(version)
    tool = "iptables" if version == 4 else "ip6tables"
    return [f"{tool}-restore"], [f"{tool}-save", "-t", "filter"]

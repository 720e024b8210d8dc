"""The guest firewall: golden rule text, the comparison, and the rules enforced by a real kernel in
two network namespaces (client = the guest, server = the outside world)."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import pytest

from orchestrator.egress.firewall import (
    ESTABLISHED_LOG_PACKETS,
    LOG_ALLOW,
    LOG_ALLOW_EST,
    LOG_BLOCK,
    LOG_DNS,
    LOG_DNS_EST,
    NFLOG_GROUP,
    differences,
    normalize,
    render_rules,
    restore_commands,
)
from orchestrator.egress.policy import Blocked, EgressPolicy, build_policy
from orchestrator.errors import UsageError
from tests.netns import inside

from .conftest import Golden

RESOLVER = IPv4Address("192.0.2.1")
RESOLVER6 = IPv6Address("2001:db8:f::1")
ALLOWED = "203.0.113.7"
BLOCKED = "198.51.100.9"
ALLOWED6 = "2001:db8:1::9"
BLOCKED6 = "2001:db8:2::9"


def _no_names(name: str) -> list[str]:
    raise AssertionError(f"unexpected name lookup: {name}")


def policy(*allow: str, dns: bool = True, blocked: Blocked = Blocked.REJECT) -> EgressPolicy:
    return build_policy(allow, dns=dns, blocked=blocked, resolve=_no_names)


REPRESENTATIVE = policy(
    "203.0.113.7",
    "198.51.100.0/24",
    "203.0.113.8:443",
    "udp:203.0.113.9:5353",
    "icmp:198.51.100.77",
    "[2001:db8:1::9]:443",
    "2001:db8:2::/48",
)


def rules(p: EgressPolicy, version: int) -> str:
    return render_rules(p, version=version, resolver=RESOLVER, resolver6=RESOLVER6)


def output_rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A OUTPUT ")]


# --- pure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_golden_representative(golden: Golden, version: int) -> None:
    golden.check(f"firewall-v{version}.rules", rules(REPRESENTATIVE, version))


@pytest.mark.parametrize("version", [4, 6])
def test_golden_no_dns_drop(golden: Golden, version: int) -> None:
    p = policy("203.0.113.7", "[2001:db8:1::9]:443", dns=False, blocked=Blocked.DROP)
    golden.check(f"firewall-nodns-drop-v{version}.rules", rules(p, version))


def test_port_without_proto_allows_tcp_and_udp_and_icmp_is_per_family() -> None:
    p = policy("203.0.113.7:80", "icmp:203.0.113.8", "icmp:2001:db8::8")
    assert output_rules(rules(p, 4))[-4:] == [
        "-A OUTPUT -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j SBX-ALLOW",
        "-A OUTPUT -d 203.0.113.7/32 -p udp -m udp --dport 80 -j SBX-ALLOW",
        "-A OUTPUT -d 203.0.113.8/32 -p icmp -j SBX-ALLOW",
        "-A OUTPUT -j SBX-BLOCK",
    ]
    assert output_rules(rules(p, 6))[-2:] == [
        "-A OUTPUT -d 2001:db8::8/128 -p ipv6-icmp -j SBX-ALLOW",
        "-A OUTPUT -j SBX-BLOCK",
    ]


def test_everything_network_has_no_destination() -> None:
    # iptables-save drops `-d 0.0.0.0/0`, so rendering it would never compare equal.
    assert "-A OUTPUT -j SBX-ALLOW" in output_rules(rules(policy("0.0.0.0/0"), 4))


def test_dns_only_to_the_resolver_and_only_when_enabled() -> None:
    v4 = output_rules(rules(policy(), 4))
    assert [r for r in v4 if "--dport 53" in r] == [
        "-A OUTPUT -d 192.0.2.1/32 -p udp -m udp --dport 53 -j SBX-DNS",
        "-A OUTPUT -d 192.0.2.1/32 -p tcp -m tcp --dport 53 -j SBX-DNS",
    ]
    assert not [r for r in output_rules(rules(policy(dns=False), 4)) if "53" in r]
    no_v6_resolver = render_rules(policy(), version=6, resolver=RESOLVER)
    assert "SBX-DNS" not in "".join(output_rules(no_v6_resolver))


def test_dhcp_pinned_to_gateway_and_broadcast_v4_only() -> None:
    dhcp = [r for r in output_rules(rules(policy(), 4)) if "--sport 68" in r]
    assert [r.split()[3] for r in dhcp] == ["192.0.2.1/32", "255.255.255.255/32"]
    assert "--sport 68" not in rules(policy(), 6)


def test_log_prefixes_and_block_actions() -> None:
    text = rules(policy(), 4)
    for chain, prefix in (("SBX-ALLOW", LOG_ALLOW), ("SBX-BLOCK", LOG_BLOCK), ("SBX-DNS", LOG_DNS)):
        nflog = f'-A {chain} -j NFLOG --nflog-prefix "{prefix}" --nflog-group {NFLOG_GROUP}'
        assert nflog in text
    assert "--reject-with tcp-reset" in text
    assert "icmp6-port-unreachable" in rules(policy(), 6)
    dropping = rules(policy(blocked=Blocked.DROP), 6)
    assert "REJECT" not in dropping
    assert "-A SBX-BLOCK -j DROP" in dropping


def test_bad_version() -> None:
    with pytest.raises(UsageError):
        render_rules(policy(), version=5, resolver=RESOLVER)
    with pytest.raises(UsageError):
        restore_commands(5)


def test_restore_commands() -> None:
    assert restore_commands(4) == (["iptables-restore"], ["iptables-save", "-t", "filter"])
    assert restore_commands(6) == (["ip6tables-restore"], ["ip6tables-save", "-t", "filter"])


SAVED_SAMPLE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 23 11:14:16 2026
*filter
:INPUT ACCEPT [12:3456]
:SBX-B - [0:0]
:OUTPUT DROP [7:89]
:SBX-A - [0:0]
-A SBX-B -j DROP
[3:120] -A OUTPUT -o lo -j ACCEPT
-A OUTPUT -j SBX-B
-A SBX-A -j NFLOG --nflog-prefix "A " --nflog-group 7
-A SBX-A -j ACCEPT
COMMIT
# Completed on Mon Nov 23 11:14:16 2026
"""


def test_normalize() -> None:
    assert normalize(SAVED_SAMPLE) == [
        "*filter",
        ":INPUT ACCEPT",
        ":OUTPUT DROP",
        ":SBX-A -",
        ":SBX-B -",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -j SBX-B",
        '-A SBX-A -j NFLOG --nflog-prefix "A " --nflog-group 7',
        "-A SBX-A -j ACCEPT",
        "-A SBX-B -j DROP",
        "COMMIT",
    ]


def test_differences() -> None:
    text = rules(REPRESENTATIVE, 4)
    assert differences(text, "# Generated by x\n" + text.replace("[0:0]", "[5:6]")) == []
    tampered = text.replace("-A OUTPUT -j SBX-BLOCK\n", "-A OUTPUT -j ACCEPT\n")
    assert differences(text, tampered) == [
        "missing: -A OUTPUT -j SBX-BLOCK",
        "unexpected: -A OUTPUT -j ACCEPT",
    ]
    lines = text.splitlines()
    i = lines.index("-A OUTPUT -j SBX-BLOCK")
    swapped = list(lines)
    swapped[i - 1], swapped[i] = lines[i], lines[i - 1]
    assert differences(text, "\n".join(swapped)) != []  # order matters within a chain
    assert differences(text, "") != []


# --- real kernel ------------------------------------------------------------------------------


@dataclass
class Servers:
    """TCP echo servers on :80 and :443 (all addresses) and UDP echo on :53 (per address) in the
    server namespace; each records (proto, local address, local port) of what it accepted."""

    udp_addresses: tuple[str, ...]
    accepted: list[tuple[str, str, int]] = field(default_factory=list)
    _sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        for port in (80, 443):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            s.listen(16)
            self._sel.register(s, selectors.EVENT_READ, "listen")
        for addr in self.udp_addresses:
            u = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((addr, 53))
            self._sel.register(u, selectors.EVENT_READ, "udp")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _record(self, proto: str, local: tuple[str, int]) -> None:
        with self._lock:
            self.accepted.append((proto, local[0].removeprefix("::ffff:"), local[1]))

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "listen":
                    conn, _ = sock.accept()
                    self._record("tcp", conn.getsockname())
                    self._sel.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "udp":
                    data, peer = sock.recvfrom(2048)
                    self._record("udp", sock.getsockname())
                    sock.sendto(data, peer)
                else:
                    try:
                        data = sock.recv(2048)
                    except OSError:
                        data = b""
                    if data:
                        sock.sendall(data)
                    else:
                        self._sel.unregister(sock)
                        sock.close()

    def seen(self, proto: str, addr: str, port: int) -> bool:
        with self._lock:
            return (proto, addr, port) in self.accepted

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._sel.close()


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


@dataclass(frozen=True)
class FwLab:
    client: str
    server: str
    veth: str  # the client's interface, named in every LOG record it causes
    servers: Servers

    def load(self, p: EgressPolicy, *versions: int) -> None:
        for version in versions or (4, 6):
            restore, _ = restore_commands(version)
            sh("ip", "netns", "exec", self.client, *restore, stdin=rules(p, version))

    def saved(self, version: int) -> str:
        _, save = restore_commands(version)
        return sh("ip", "netns", "exec", self.client, *save)

    def sock(self, host: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with inside(self.client):
            return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)

    def connect(self, host: str, port: int, timeout: float = 2.0) -> socket.socket:
        s = self.sock(host)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    def refused(self, host: str, port: int) -> float:
        """Seconds until a TCP connect was refused."""
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            self.connect(host, port).close()
        return time.monotonic() - start

    def udp_exchange(self, host: str, port: int = 53) -> bytes:
        with self.sock(host, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            u.connect((host, port))
            u.send(b"query")
            return u.recv(2048)

    def udp_refused(self, host: str, port: int = 53) -> None:
        """A blocked datagram: a local netfilter drop fails send() with EPERM, and REJECT's ICMP
        error then fails the connected socket's recv() with ECONNREFUSED (measured)."""
        with self.sock(host, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            u.connect((host, port))
            with pytest.raises(PermissionError):
                u.send(b"query")
            with pytest.raises(ConnectionRefusedError):
                u.recv(2048)


def _echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    return s.recv(2048)


def _root_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    tools = ("ip", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save")
    missing = [t for t in tools if shutil.which(t) is None]
    return f"missing: {', '.join(missing)}" if missing else None


@pytest.fixture
def fw() -> Iterator[FwLab]:
    reason = _root_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"sbxfw-{os.getpid()}-{time.monotonic_ns() % 100000}"
    client, server = f"{tag}-c", f"{tag}-s"
    veth = f"fw{os.getpid() % 100000}c"
    servers = Servers((str(RESOLVER), BLOCKED, str(RESOLVER6), BLOCKED6))
    made: list[str] = []
    try:
        for ns in (client, server):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        # Created inside the client namespace, so the names never meet the host's interfaces.
        sh("ip", "-n", client, "link", "add", veth, "type", "veth", "peer", "name", "srv0",
           "netns", server)  # fmt: skip
        for ns, dev, v4, v6 in (
            (client, veth, "192.0.2.10/24", "2001:db8:f::10/64"),
            (server, "srv0", "192.0.2.1/24", "2001:db8:f::1/64"),
        ):
            sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for addr in (f"{ALLOWED}/32", f"{BLOCKED}/32"):
            sh("ip", "-n", server, "addr", "add", addr, "dev", "lo")
        # nodad: a loaded machine once found BLOCKED6 still unusable (EADDRNOTAVAIL) at bind().
        for addr in (f"{ALLOWED6}/128", f"{BLOCKED6}/128"):
            sh("ip", "-n", server, "addr", "add", addr, "dev", "lo", "nodad")
        for net in ("203.0.113.0/24", "198.51.100.0/24"):
            sh("ip", "-n", client, "route", "add", net, "via", str(RESOLVER))
        sh("ip", "-n", client, "-6", "route", "add", "2001:db8::/32", "via", str(RESOLVER6))
        with inside(server):
            servers.start()
        yield FwLab(client, server, veth, servers)
    finally:
        servers.stop()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=20)


@pytest.mark.root
@pytest.mark.parametrize("allow", [ALLOWED, f"{ALLOWED}:80"])
def test_allowed_tcp_connects(fw: FwLab, allow: str) -> None:
    fw.load(policy(allow))
    with fw.connect(ALLOWED, 80) as s:
        assert _echo(s, b"hello") == b"hello"
    assert fw.servers.seen("tcp", ALLOWED, 80)


@pytest.mark.root
def test_blocked_tcp_is_refused_at_once(fw: FwLab) -> None:
    fw.load(policy(ALLOWED))
    assert fw.refused(BLOCKED, 80) < 0.5
    assert not [a for a in fw.servers.accepted if a[1] == BLOCKED]


@pytest.mark.root
def test_port_restriction(fw: FwLab) -> None:
    fw.load(policy(f"{ALLOWED}:443"))
    with fw.connect(ALLOWED, 443) as s:
        assert _echo(s, b"tls?") == b"tls?"
    assert fw.refused(ALLOWED, 80) < 0.5
    assert not fw.servers.seen("tcp", ALLOWED, 80)


@pytest.mark.root
def test_ipv6_allowed_and_blocked(fw: FwLab) -> None:
    fw.load(policy(ALLOWED6))
    with fw.connect(ALLOWED6, 80) as s:
        assert _echo(s, b"six") == b"six"
    assert fw.refused(BLOCKED6, 80) < 0.5
    assert fw.servers.seen("tcp", ALLOWED6, 80)
    assert not [a for a in fw.servers.accepted if a[1] == BLOCKED6]


@pytest.mark.root
def test_dns_only_to_the_resolver(fw: FwLab) -> None:
    fw.load(policy())
    assert fw.udp_exchange(str(RESOLVER)) == b"query"
    assert fw.udp_exchange(str(RESOLVER6)) == b"query"
    for host in (BLOCKED, BLOCKED6):
        fw.udp_refused(host)
    assert not fw.servers.seen("udp", BLOCKED, 53)
    assert not fw.servers.seen("udp", BLOCKED6, 53)


@pytest.mark.root
def test_dns_off_blocks_the_resolver_too(fw: FwLab) -> None:
    fw.load(policy(dns=False))
    fw.udp_refused(str(RESOLVER))
    assert not fw.servers.accepted


@pytest.mark.root
def test_drop_times_out(fw: FwLab) -> None:
    fw.load(policy(ALLOWED, blocked=Blocked.DROP))
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        fw.connect(BLOCKED, 80, timeout=1.0).close()
    assert time.monotonic() - start >= 0.9
    with fw.connect(ALLOWED, 80) as s:
        assert _echo(s, b"still") == b"still"


@pytest.mark.root
def test_loopback_works(fw: FwLab) -> None:
    fw.load(policy())
    for host in ("127.0.0.1", "::1"):
        with fw.sock(host) as listener:
            listener.bind((host, 0))
            listener.listen(1)
            with fw.connect(host, listener.getsockname()[1]):
                conn, _ = listener.accept()
                conn.close()


@pytest.mark.root
def test_connection_opened_before_the_rules_keeps_working(fw: FwLab) -> None:
    # The namespace has no conntrack before the first load, like a freshly booted guest: the flow
    # is picked up mid-stream, and here the client speaks first after the load (the hard case).
    early = fw.connect(BLOCKED, 80)
    with early:
        assert _echo(early, b"before") == b"before"
        fw.load(policy())
        assert _echo(early, b"after") == b"after"
        assert _echo(early, b"again") == b"again"
    assert fw.refused(BLOCKED, 80) < 0.5


@pytest.mark.root
def test_saved_rules_match_and_tampering_shows(fw: FwLab) -> None:
    fw.load(REPRESENTATIVE)
    for version in (4, 6):
        expected = rules(REPRESENTATIVE, version)
        saved = fw.saved(version)
        assert differences(expected, saved) == []
        # Stronger than normalized equality: the renderer writes what iptables-save prints.
        assert [line for line in saved.splitlines() if not line.startswith("#")] == (
            expected.splitlines()
        )
    sh("ip", "netns", "exec", fw.client, "ip6tables", "-D", "OUTPUT", "-j", "SBX-BLOCK")
    assert differences(rules(REPRESENTATIVE, 6), fw.saved(6)) == ["missing: -A OUTPUT -j SBX-BLOCK"]
    assert differences(rules(REPRESENTATIVE, 4), fw.saved(4)) == []


@dataclass(frozen=True)
class Logged:
    """One packet an NFLOG rule logged, as nfnetlink_log hands it to a listener."""

    prefix: str
    dst: str
    dport: int | None
    uid: int | None


_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_CONFIG = 1
_NFULA_CFG_CMD, _NFULA_CFG_MODE, _NFULA_CFG_QTHRESH = 1, 2, 5
_NFULNL_CFG_CMD_BIND = 1
_NFULNL_COPY_PACKET = 2
_NFULA_PAYLOAD, _NFULA_PREFIX, _NFULA_UID = 9, 10, 11


def _nl_attr(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def _nl_attrs(data: bytes) -> dict[int, bytes]:
    attrs = {}
    while len(data) >= 4:
        length, kind = struct.unpack("=HH", data[:4])
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[4:length]
        data = data[(length + 3) & ~3 :]
    return attrs


def _logged(family: int, attrs: dict[int, bytes]) -> Logged | None:
    payload = attrs.get(_NFULA_PAYLOAD, b"")
    prefix = attrs.get(_NFULA_PREFIX, b"").rstrip(b"\0").decode()
    uid = struct.unpack(">I", attrs[_NFULA_UID])[0] if _NFULA_UID in attrs else None
    if family == socket.AF_INET and len(payload) >= 20:
        l4, proto, dst = (payload[0] & 0x0F) * 4, payload[9], str(IPv4Address(payload[16:20]))
    elif family == socket.AF_INET6 and len(payload) >= 40:
        l4, proto, dst = 40, payload[6], str(IPv6Address(payload[24:40]))
    else:
        return None
    ports = proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and len(payload) >= l4 + 4
    dport = struct.unpack(">H", payload[l4 + 2 : l4 + 4])[0] if ports else None
    return Logged(prefix, dst, dport, uid)


@contextmanager
def nflog_records(netns: str) -> Iterator[list[Logged]]:
    """The packets the firewall's NFLOG rules logged in `netns` while inside: a listener on
    NFLOG_GROUP (nfnetlink_log, the netlink protocol ulogd speaks)."""
    with inside(netns):
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    records: list[Logged] = []
    try:
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        nl.bind((0, 0))
        kind = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG
        for attr in (
            _nl_attr(_NFULA_CFG_CMD, bytes([_NFULNL_CFG_CMD_BIND])),
            _nl_attr(_NFULA_CFG_MODE, struct.pack(">IBx", 0xFFFF, _NFULNL_COPY_PACKET)),
            # one packet a message (the default batches 100, or 1 s)
            _nl_attr(_NFULA_CFG_QTHRESH, struct.pack(">I", 1)),
        ):
            body = struct.pack(">BBH", socket.AF_UNSPEC, 0, NFLOG_GROUP) + attr
            nl.send(struct.pack("=IHHII", 16 + len(body), kind, 0x1 | 0x4, 0, 0) + body)
        yield records
        time.sleep(0.1)
        while True:
            try:
                data = nl.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            while len(data) >= 16:
                length, msg_type = struct.unpack("=IH", data[:6])
                if msg_type == _NFNL_SUBSYS_ULOG << 8:  # NFULNL_MSG_PACKET
                    record = _logged(data[16], _nl_attrs(data[20:length]))
                    if record is not None:
                        records.append(record)
                data = data[(length + 3) & ~3 :]
    finally:
        nl.close()


@pytest.mark.root
def test_log_records_one_per_new_attempt(fw: FwLab) -> None:
    fw.load(policy(ALLOWED))
    with nflog_records(fw.client) as mine:
        with fw.connect(ALLOWED, 80) as s:
            for _ in range(3):
                _echo(s, b"x")
        fw.refused(BLOCKED, 80)
        fw.udp_exchange(str(RESOLVER))

    def count(prefix: str, dst: str, dpt: int) -> int:
        return sum(r.prefix == prefix and r.dst == dst and r.dport == dpt for r in mine)

    assert count(LOG_ALLOW, ALLOWED, 80) == 1, mine
    assert count(LOG_BLOCK, BLOCKED, 80) == 1, mine
    assert count(LOG_DNS, str(RESOLVER), 53) == 1, mine
    assert all(r.uid == os.getuid() for r in mine), mine


@pytest.mark.root
def test_a_new_socket_on_a_live_udp_flow_is_logged(fw: FwLab) -> None:
    """A UDP socket that gets the source port of an answered flow conntrack still holds rides that
    flow (ESTABLISHED, never NEW): the established-flow rules log it, by the flow's verdict, for
    the flow's first ESTABLISHED_LOG_PACKETS packets."""
    fw.load(policy(BLOCKED))  # the server answers UDP on BLOCKED:53; allowed here

    def exchange(host: str, port: int, datagrams: int = 1) -> int:
        """A new socket from source port `port` (0: any); the port it used."""
        with fw.sock(host, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            u.bind(("0.0.0.0", port))
            u.connect((host, 53))
            for _ in range(datagrams):
                u.send(b"query")
                u.recv(2048)
            port_used: int = u.getsockname()[1]
            return port_used

    with nflog_records(fw.client) as mine:
        for host in (BLOCKED, str(RESOLVER)):
            port = exchange(host, 0)
            exchange(host, port)
            exchange(host, port)
        exchange(BLOCKED, 0, datagrams=ESTABLISHED_LOG_PACKETS + 4)

    def count(prefix: str, dst: str) -> int:
        return sum(r.prefix == prefix and r.dst == dst and r.dport == 53 for r in mine)

    assert (count(LOG_ALLOW, BLOCKED), count(LOG_DNS, str(RESOLVER))) == (2, 1), mine
    # Two reusing sockets each, and packets 2..ESTABLISHED_LOG_PACKETS of the long exchange.
    assert count(LOG_ALLOW_EST, BLOCKED) == 2 + ESTABLISHED_LOG_PACKETS - 1, mine
    assert count(LOG_DNS_EST, str(RESOLVER)) == 2, mine

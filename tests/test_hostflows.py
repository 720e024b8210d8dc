"""The host-side flow record (hostflows.py): tcpdump's lines parsed, flows folded, compared with
the guest's record; and the real tcpdump on a veth in a namespace of the test's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.capture import hostflows, payload, pcap
from orchestrator.capture.hostflows import Flow
from orchestrator.capture.records import Attempt, Verdict

MLD = "HBH ICMP6, multicast listener report v2, 2 group record(s), length 48"
LINES = f"""\
1796461664.068816 IP6 :: > ff02::16: {MLD}
1796461664.416641 IP 10.9.0.1.49870 > 10.9.0.2.80: tcp 0
1796461664.417002 IP6 2001:db8:9::1.58536 > 2001:db8:9::2.443: tcp 0
1796461664.417360 IP 10.9.0.1.42552 > 10.9.0.2.53: UDP, length 1
1796461664.417447 IP 10.9.0.1.42552 > 10.9.0.2.53: UDP, length 1
1796461665.000000 IP 10.9.0.1 > 203.0.113.9: ICMP echo request, id 7, seq 1, length 64
1796461665.100000 IP6 2001:db8:9::1 > 2001:db8::9: ICMP6, echo request, id 7, seq 1, length 64
1796461665.200000 IP 10.9.0.1.68 > 255.255.255.255.67: UDP, length 300
1796461665.300000 IP 10.9.0.1 > 198.51.100.4:  ip-proto-132 20
1796461665.400000 IP 10.9.0.1.99999 > 10.9.0.2.80: tcp 0
1796461665.500000 IP 10.9.0.1.1² > 10.9.0.2.80: tcp 0
1796461665.600000 IP 10.9.0.1.49870 > 10.9.0.2.80: tcp 72
garbage \x1b[31m from a hostile name
"""


def test_parse_line() -> None:
    parsed = [hostflows.parse_line(line) for line in LINES.splitlines()]
    assert parsed[1] == Flow(1796461664.416641, "tcp", "10.9.0.1", "10.9.0.2", 49870, 80)
    assert parsed[2] == Flow(1796461664.417002, "tcp", "2001:db8:9::1", "2001:db8:9::2", 58536, 443)
    assert parsed[3] is not None and parsed[3].proto == "udp" and parsed[3].dport == 53
    assert parsed[5] == Flow(1796461665.0, "icmp", "10.9.0.1", "203.0.113.9")
    assert parsed[6] == Flow(1796461665.1, "icmpv6", "2001:db8:9::1", "2001:db8::9")
    assert parsed[8] == Flow(1796461665.3, "other", "10.9.0.1", "198.51.100.4")
    # A port out of range, a non-ASCII digit, and anything that is not a packet line: nothing.
    assert parsed[9] is None and parsed[10] is None and parsed[12] is None
    # A TCP segment with data (a request's first, FLOW_FILTER keeps it) starts no flow.
    assert parsed[11] is None


def test_first_packets_folds_flows_and_drops_housekeeping() -> None:
    packets = [f for f in map(hostflows.parse_line, LINES.splitlines()) if f is not None]
    flows = hostflows.first_packets(packets)
    # The multicast report and DHCP go; the second datagram of one UDP exchange is folded.
    assert [(f.proto, f.dst, f.dport) for f in flows] == [
        ("tcp", "10.9.0.2", 80),
        ("tcp", "2001:db8:9::2", 443),
        ("udp", "10.9.0.2", 53),
        ("icmp", "203.0.113.9", None),
        ("icmpv6", "2001:db8::9", None),
        ("other", "198.51.100.4", None),
    ]
    # The same flow again after the window is a new one.
    later = Flow(
        1796461664.416641 + hostflows.FLOW_WINDOW + 1, "tcp", "10.9.0.1", "10.9.0.2", 49870, 80
    )
    assert len(hostflows.first_packets([*packets, later])) == len(flows) + 1


def attempt(dst: str, dport: int | None, proto: str = "tcp", n: int = 0) -> Attempt:
    return Attempt(
        id=f"a{n}{dst}{dport}",
        time="2026-12-05T09:00:00.000Z",
        verdict=Verdict.ALLOWED,
        proto=proto,
        family=6 if ":" in dst else 4,
        dst=dst,
        dport=dport,
    )


def test_unrecorded_counts_per_destination() -> None:
    flows = [
        Flow(1.0, "tcp", "10.0.0.5", "203.0.113.7", 40000, 80),
        Flow(2.0, "tcp", "10.0.0.5", "203.0.113.7", 40001, 80),
        Flow(3.0, "udp", "10.0.0.5", "10.0.0.1", 40002, 53),
        Flow(4.0, "tcp", "10.0.0.5", "198.51.100.9", 40003, 443),
        Flow(5.0, "icmp", "10.0.0.5", "203.0.113.7"),
    ]
    guest = [
        attempt("203.0.113.7", 80),
        attempt("203.0.113.7", 443),
        attempt("203.0.113.7", None, "icmp"),
    ]
    missing = hostflows.unrecorded(flows, guest, resolver=["10.0.0.1"])
    assert [(m.proto, m.dst, m.dport, m.host_flows, m.guest_attempts) for m in missing] == [
        ("tcp", "203.0.113.7", 80, 2, 1),
        ("tcp", "198.51.100.9", 443, 1, 0),
    ]
    assert missing[1].describe() == "tcp 198.51.100.9:443: 1 on the host, 0 in the guest's record"
    # Everything recorded: nothing to report. DNS to the resolver is the DNS log's business.
    guest += [attempt("203.0.113.7", 80, n=1), attempt("198.51.100.9", 443)]
    assert hostflows.unrecorded(flows, guest, resolver=["10.0.0.1"]) == []


def test_tcpdump_args_keep_headers_only_and_bound_the_ring() -> None:
    args = hostflows.tcpdump_args("vnet7", Path("/x/host-flows.pcap"), file_mib=8, files=4)
    assert args[args.index("-s") + 1] == str(hostflows.SNAPLEN)
    assert args[args.index("-C") + 1] == "8" and args[args.index("-W") + 1] == "4"
    assert args[args.index("-Q") + 1] == "in" and args[args.index("-i") + 1] == "vnet7"
    assert args[-1] == hostflows.FLOW_FILTER


# ---- the real tcpdump --------------------------------------------------------------------------


@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """A "guest" namespace whose veth peer lives in a "host" namespace, with its own addresses."""
    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        pytest.skip("needs root and tcpdump")
    host, guest = f"hf-host-{os.getpid()}", f"hf-guest-{os.getpid()}"
    for ns in (host, guest):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:

        def run(ns: str, *argv: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)

        run(host, "ip", "link", "add", "hf-tap", "type", "veth", "peer", "name", "hf-guest")
        run(host, "ip", "link", "set", "hf-guest", "netns", guest)
        run(host, "ip", "addr", "add", "10.214.0.1/24", "dev", "hf-tap")
        run(host, "ip", "link", "set", "hf-tap", "up")
        run(guest, "ip", "addr", "add", "10.214.0.2/24", "dev", "hf-guest")
        run(guest, "ip", "link", "set", "hf-guest", "up")
        run(guest, "ip", "route", "add", "default", "via", "10.214.0.1")
        yield host, guest
    finally:
        for ns in (host, guest):
            subprocess.run(["ip", "netns", "del", ns], check=False)


SEND = r"""
import socket
for port in (80, 443):
    s = socket.socket(); s.settimeout(0.5)
    try: s.connect(("203.0.113.9", port))
    except OSError: pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3): u.sendto(b"x" * 2000, ("198.51.100.9", 5353))
# Two connections to the host's listener: an HTTP request, and bytes that start no request.
for first in (b"GET /a/b?c=1 HTTP/1.1\r\nHost: h.example\r\nUser-Agent: t\r\n\r\n", b"HELLO raw"):
    s = socket.create_connection(("10.214.0.1", 8080), timeout=5)
    s.sendall(first)
    s.recv(10)
    s.close()
"""
# The host's listener for SEND: reads each connection's first bytes, answers, closes.
LISTEN = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.214.0.1", 8080)); s.listen(4); s.settimeout(20)
print("listening", flush=True)
for _ in range(2):
    c, _ = s.accept(); c.settimeout(5); c.recv(4096); c.sendall(b"ok"); c.close()
"""


@pytest.mark.root
def test_real_tcpdump_records_first_packets_only(veth: tuple[str, str], tmp_path: Path) -> None:
    host, guest = veth
    started = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            host,
            sys.executable,
            "-c",
            f"from orchestrator.capture import hostflows; from pathlib import Path; "
            f"print(hostflows.start('hf-tap', Path({str(tmp_path)!r})))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(started.stdout)
    listener = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-c", LISTEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
        subprocess.run(["ip", "netns", "exec", guest, sys.executable, "-c", SEND], check=True)
        assert listener.wait(timeout=30) == 0
        # The host's own packets out of the tap (its SYN-ACKs, resets) are not the guest's.
        subprocess.run(
            ["ip", "netns", "exec", host, "ping", "-c", "1", "-W", "1", "10.214.0.2"],
            capture_output=True,
        )
    finally:
        listener.kill()
        listener.wait()
        assert pcap.stop_pcap(pid)
    flows = hostflows.read_flows(tmp_path)
    got = [(f.proto, f.src, f.dst, f.dport) for f in flows]
    assert ("tcp", "10.214.0.2", "203.0.113.9", 80) in got
    assert ("tcp", "10.214.0.2", "203.0.113.9", 443) in got
    assert got.count(("udp", "10.214.0.2", "198.51.100.9", 5353)) == 1
    # Each connection to the listener is one flow: its request segment is no flow of its own.
    assert got.count(("tcp", "10.214.0.2", "10.214.0.1", 8080)) == 2
    assert all(f.src == "10.214.0.2" for f in flows), got
    # At most SNAPLEN bytes of each packet are on disk: no full-size datagram.
    limit = b"x" * hostflows.SNAPLEN
    assert all(limit not in p.read_bytes() for p in hostflows.capture_files(tmp_path))
    # The request's first segment is kept, and read back; the bytes that start no request not.
    segments = payload.read_segments(hostflows.capture_files(tmp_path))
    assert [(s.dport, s.payload.http) for s in segments] == [(8080, "GET h.example /a/b?c=1")]
    assert all(b"HELLO raw" not in p.read_bytes() for p in hostflows.capture_files(tmp_path))

"""The host's own record of the flows a guest starts: what `sandbox logs --host` shows, and what
the guest's record is checked against.

Root in the guest can blind the guest's own records (unload the capture, flush the firewall that
logs blocked attempts); it cannot reach the host side of its interface. There tcpdump, started
by `up` for the sandbox's life, keeps the first packet of every flow the guest sends (TCP SYN,
UDP datagrams, ICMP echo requests, any other IP protocol), whether the host-side filter then
lets it through or drops it: a packet socket sees a frame when the tap device receives it,
before the bridge and its ebtables rules. Only the headers are kept (snaplen), in a size-bounded
ring of files (`SNAPLEN`). Reading goes through tcpdump too (`-r`, numeric, one line per
packet): nothing here dissects packets by hand.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from orchestrator.capture.logview import destination
from orchestrator.capture.pcap import ring_files, start_tcpdump
from orchestrator.capture.records import Attempt, Verdict, iso_time
from orchestrator.errors import SandboxError

# Where a TCP segment's payload starts, in the guest's IPv4 and IPv6 (no extension headers) packets.
_TCP4_DATA = "((tcp[12] & 0xf0) >> 2)"
_TCP6_DATA = "(40 + ((ip6[52] & 0xf0) >> 2))"
# The first bytes of a TLS ClientHello (a handshake record, version 3.x, message type 1) and of
# an HTTP/1 request (its method and the space after it, as 4 bytes): the segments whose first
# bytes payload.py reads for the server name, or the method, Host and path (issue 16 item 2).
_REQUEST_STARTS = tuple(
    int.from_bytes(method[:4].ljust(4, b" "), "big")
    for method in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT")
)


def _request_starts(base: str, offset: str) -> str:
    """The pcap-filter test that a TCP payload at `base`[`offset`] starts a request. Pure."""
    tls = f"({base}[{offset}:2] = 0x1603 and {base}[{offset} + 5] = 1)"
    http = " or ".join(f"{base}[{offset}:4] = {value:#010x}" for value in _REQUEST_STARTS)
    return f"({tls} or {http})"


# A flow's first packet: a TCP SYN without ACK (IPv4; IPv6 without extension headers), any UDP
# datagram, an ICMP/ICMPv6 echo request, and any other IP protocol. Replies (SYN-ACK, the
# guest's answers to the host's SSH session) are not flows the guest starts. And the segment
# that starts a TLS or HTTP request (its first bytes, for the server name or the request line).
FLOW_FILTER = (
    "(ip and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn)"
    " or (ip6 and ip6[6] == 6 and ip6[53] & 0x12 == 0x02)"
    " or udp"
    " or (ip and icmp[icmptype] == icmp-echo)"
    " or (ip6 and ip6[6] == 58 and ip6[40] == 128)"
    " or (ip and not tcp and not udp and not icmp)"
    " or (ip6 and not ip6[6] == 6 and not ip6[6] == 17 and not ip6[6] == 58)"
    f" or (ip and tcp and {_request_starts('tcp', _TCP4_DATA)})"
    f" or (ip6 and ip6[6] == 6 and {_request_starts('ip6', _TCP6_DATA)})"
)
# Ethernet, IPv6 and TCP headers with the most options (14 + 40 + 60) and the first PAYLOAD_BYTES
# of a request's first segment: a ClientHello (about 520 bytes from OpenSSL 3.0) or a request
# line and its headers. A SYN or an ICMP echo is shorter; a UDP datagram is kept up to as much.
PAYLOAD_BYTES = 1024
SNAPLEN = 14 + 40 + 60 + PAYLOAD_BYTES
FLOW_WINDOW = 60.0
FILE_PREFIX = "host-flows.pcap"
READ_TIMEOUT = 60.0
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
# The ring: at most FILES files of FILE_MIB each (~60,000 flows a MiB, or ~600 requests' first
# segments), the oldest overwritten.
FILE_MIB = 8
FILES = 4

_LINE = re.compile(r"^(\d{1,12}\.\d{1,9}) (IP6?) (\S{1,80}) > (\S{1,80}): (.{0,200})$")


class HostFlowError(SandboxError):
    """The host-side flow record could not be read."""


@dataclass(frozen=True)
class Flow:
    """One flow the guest started, as the host saw its first packet."""

    time: float
    proto: str  # "tcp" | "udp" | "icmp" | "icmpv6" | "other"
    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None

    @property
    def key(self) -> tuple[str, str, str, int | None, int | None]:
        return (self.proto, self.src, self.dst, self.sport, self.dport)

    @property
    def destination(self) -> tuple[str, str, int | None]:
        return (self.proto, self.dst, self.dport)

    def to_dict(self) -> dict[str, object]:
        return {
            "time": iso_time(self.time),
            "proto": self.proto,
            "src": self.src,
            "sport": self.sport,
            "dst": self.dst,
            "dport": self.dport,
        }


def tcpdump_args(interface: str, path: PurePath, *, file_mib: int, files: int) -> list[str]:
    """tcpdump's arguments (without the program) for the flow record of `interface`. Pure."""
    return [
        # tcpdump drops root after opening its first file, and opens the ring's next files
        # later: as user tcpdump it could not write into the sandbox's logs directory.
        "-Z",
        "root",
        "-i",
        interface,
        "-Q",
        "in",  # what the tap device receives: what the guest sends
        "-s",
        str(SNAPLEN),
        "-n",
        "-U",
        "--immediate-mode",
        "-C",
        str(file_mib),
        "-W",
        str(files),
        "-w",
        str(path),
        FLOW_FILTER,
    ]


def _split(endpoint: str, with_port: bool) -> tuple[str, int | None] | None:
    address, port = endpoint, None
    if with_port:
        address, _, text = endpoint.rpartition(".")
        if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
            return None
        port = int(text)
    try:
        return str(ipaddress.ip_address(address)), port
    except ValueError:
        return None


def parse_line(line: str) -> Flow | None:
    """One line of `tcpdump -r FILE -nn -tt -q`, or None for anything else. Pure."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    stamp, _family, src_text, dst_text, rest = m.groups()
    if rest.startswith("tcp "):
        if rest != "tcp 0":
            return None  # a request's first segment (FLOW_FILTER), not the start of a flow
        proto = "tcp"
    elif rest.startswith("UDP"):
        proto = "udp"
    elif rest.startswith("ICMP echo request"):
        proto = "icmp"
    elif rest.startswith("ICMP6, echo request"):
        proto = "icmpv6"
    else:
        proto = "other"
    ported = proto in ("tcp", "udp")
    src, dst = _split(src_text, ported), _split(dst_text, ported)
    if src is None or dst is None:
        return None
    return Flow(float(stamp), proto, src[0], dst[0], src[1], dst[1])


def _infrastructure(flow: Flow) -> bool:
    """Link housekeeping, not a flow to anywhere: DHCP, multicast, broadcast, link-local."""
    dst = ipaddress.ip_address(flow.dst)
    if flow.proto == "udp" and flow.dport in (67, 547):
        return True
    return dst.is_multicast or dst.is_link_local or dst == BROADCAST


def first_packets(flows: Iterable[Flow], window: float = FLOW_WINDOW) -> list[Flow]:
    """One Flow per flow: packets of the same flow within `window` seconds of its previous
    packet are dropped, as is the link's housekeeping. Pure."""
    last_seen: dict[tuple[str, str, str, int | None, int | None], float] = {}
    out: list[Flow] = []
    for flow in sorted(flows, key=lambda f: f.time):
        if _infrastructure(flow):
            continue
        previous = last_seen.get(flow.key)
        last_seen[flow.key] = flow.time
        if previous is not None and flow.time - previous < window:
            continue
        out.append(flow)
    return out


@dataclass(frozen=True)
class Unrecorded:
    """A destination the host saw the guest start more flows to than the guest's record holds."""

    proto: str
    dst: str
    dport: int | None
    host_flows: int
    guest_attempts: int
    first: float
    last: float

    def describe(self) -> str:
        return (
            f"{self.proto} {destination(self.dst, self.dport)}: {self.host_flows} on the host, "
            f"{self.guest_attempts} in the guest's record"
        )


def _guest_destination(attempt: Attempt) -> tuple[str, str, int | None]:
    proto = attempt.proto if attempt.proto in ("tcp", "udp", "icmp", "icmpv6") else "other"
    return (proto, attempt.dst, attempt.dport if proto in ("tcp", "udp") else None)


def unrecorded(
    flows: Sequence[Flow], attempts: Iterable[Attempt], *, resolver: Iterable[str] = ()
) -> list[Unrecorded]:
    """Destinations with more host-side flows than guest-side attempts: what the guest's record
    lost or was made to lose. DNS to the sandbox's resolver (`resolver` addresses) is left out:
    the host's DNS log already records every query. Pure."""
    skip = set(resolver)
    guest = Counter(_guest_destination(a) for a in attempts if a.verdict is not Verdict.LOOPBACK)
    seen: dict[tuple[str, str, int | None], list[Flow]] = {}
    for flow in flows:
        if flow.dst in skip and flow.dport == 53:
            continue
        seen.setdefault(flow.destination, []).append(flow)
    out = []
    for (proto, dst, dport), group in sorted(seen.items(), key=lambda kv: kv[1][0].time):
        if len(group) > guest[(proto, dst, dport)]:
            out.append(
                Unrecorded(
                    proto,
                    dst,
                    dport,
                    len(group),
                    guest[(proto, dst, dport)],
                    group[0].time,
                    group[-1].time,
                )
            )
    return out


def start(interface: str, directory: Path) -> int:
    """Start the host-side flow record of `interface` into `directory`; tcpdump's pid, for
    pcap.stop_pcap. Call from `up` once the domain's interface exists."""
    first = directory / f"{FILE_PREFIX}0"
    args = tcpdump_args(interface, directory / FILE_PREFIX, file_mib=FILE_MIB, files=FILES)
    return start_tcpdump(interface, args, first)


def capture_files(directory: Path) -> list[Path]:
    """The ring's files, oldest first (tcpdump -W numbers them FILE0, FILE1, ...)."""
    return ring_files(directory / FILE_PREFIX)


def read_flows(directory: Path) -> list[Flow]:
    """Every flow in the sandbox's host-side record (the files in `directory`)."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise HostFlowError("tcpdump is not installed", "install it (scripts/install.sh)")
    packets: list[Flow] = []
    for path in capture_files(directory):
        try:
            proc = subprocess.run(
                [tcpdump, "-r", str(path), "-nn", "-tt", "-q"],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=READ_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise HostFlowError(
                f"reading {path} took longer than {READ_TIMEOUT:.0f} s", "check the file"
            ) from None
        # A file cut short by a stopped capture still gives its whole packets (and exit 1).
        packets += [f for f in map(parse_line, proc.stdout.splitlines()) if f is not None]
    return first_packets(packets)

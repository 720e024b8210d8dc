"""What a connection's first bytes say: the server name of a TLS ClientHello, the method, Host and
path of an HTTP/1 request, or just the bytes (as hex) for anything else.

The bytes come from the guest, so from an attacker: dpkt parses them (a maintained dissector of
pcap files, Ethernet, IP, TCP, HTTP/1 and TLS records, pure Python, in Debian and on PyPI; the
ClientHello's extensions it leaves as (type, bytes) pairs, so only the server_name list, RFC 6066
section 3, is read here). Whatever dpkt refuses is kept as capped hex. Every string kept is
bounded, and printed through safetext like anything else from a guest.
"""

from __future__ import annotations

import io
import ipaddress
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import dpkt

from orchestrator.capture.records import Attempt, parse_time

# At most this many of a connection's first bytes are read, and this many kept as hex.
READ_BYTES = 4096
HEX_BYTES = 64
MAX_NAME = 253  # a DNS name
MAX_PATH = 256
MAX_HEADERS = 16
MAX_HEADER_VALUE = 128
_SNI_HOST_NAME = 0  # server_name extension type, and its host_name name type
# A TLS record header: handshake (22), version 3.x; then a handshake header: ClientHello (1).
_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
# What dpkt raises on bytes it cannot take: its own errors, and those of the struct, slicing and
# decoding it does on the way (found by fuzzing the recorded ClientHello, tests/test_payload.py).
_REFUSED = (
    dpkt.Error,
    dpkt.ssl.SSL3Exception,
    struct.error,
    IndexError,
    KeyError,
    ValueError,
    TypeError,
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


@dataclass(frozen=True)
class Payload:
    """A summary of a connection's first bytes."""

    kind: str  # "tls" | "http" | "raw"
    sni: str | None = None  # the ClientHello's server name
    method: str | None = None
    host: str | None = None  # the request's Host header
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # the request's other headers, capped
    size: int = 0  # bytes seen (at most READ_BYTES)
    hex: str = ""  # the first HEX_BYTES as hex

    @property
    def http(self) -> str | None:
        """`METHOD HOST PATH`, as the logs show an HTTP request."""
        if self.method is None:
            return None
        return " ".join(p for p in (self.method, self.host or "-", self.path or "") if p)

    def describe(self) -> str:
        if self.kind == "tls":
            return f"TLS ClientHello, server name {self.sni or '(none)'}"
        if self.kind == "http":
            return f"HTTP {self.http}"
        return f"{self.size} bytes: {self.hex}" if self.size else "no bytes"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _server_name(extensions: Iterable[tuple[int, bytes]]) -> str | None:
    """The host_name of a server_name extension (RFC 6066 3), or None."""
    for ext_type, data in extensions:
        if ext_type != _SNI_HOST_NAME:
            continue
        if len(data) < 5:
            return None
        (list_len,) = struct.unpack("!H", data[:2])
        body = data[2 : 2 + list_len]
        while len(body) >= 3:
            name_type = body[0]
            (name_len,) = struct.unpack("!H", body[1:3])
            name = body[3 : 3 + name_len]
            if name_type == _SNI_HOST_NAME and len(name) == name_len:
                text = name.decode("ascii", "replace")
                return text if _NAME.match(text) else _clip(text, MAX_NAME)
            body = body[3 + name_len :]
        return None
    return None


def _tls(data: bytes) -> Payload | None:
    if len(data) < 6 or data[0] != _TLS_HANDSHAKE or data[1] != 3 or data[5] != _CLIENT_HELLO:
        return None
    try:
        records, _ = dpkt.ssl.tls_multi_factory(data)
        if not records:
            return None
        handshake = dpkt.ssl.TLSHandshake(records[0].data)
    except _REFUSED:
        return None
    hello = handshake.data
    if not isinstance(hello, dpkt.ssl.TLSClientHello):
        return None
    try:
        sni = _server_name(getattr(hello, "extensions", ()))
    except _REFUSED:
        sni = None
    return Payload("tls", sni=sni, size=len(data), hex=data[:HEX_BYTES].hex())


def _http(data: bytes) -> Payload | None:
    # The request line alone first (dpkt checks the method), then the headers: given the whole
    # head, dpkt would also want the body a Content-Length announces, which is not here.
    line, _, rest = data.partition(b"\r\n")
    head = rest.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    try:
        request = dpkt.http.Request(line + b"\r\n\r\n")
        fields = dpkt.http.parse_headers(io.BytesIO(head))
    except _REFUSED:
        return None
    headers: list[tuple[str, str]] = []
    host = None
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if key == "host" and host is None:
                host = _clip(str(item), MAX_NAME)
            elif len(headers) < MAX_HEADERS:
                headers.append((_clip(str(key), 64), _clip(str(item), MAX_HEADER_VALUE)))
    return Payload(
        "http",
        method=_clip(str(request.method), 16),
        host=host,
        path=_clip(str(request.uri), MAX_PATH),
        headers=tuple(headers),
        size=len(data),
        hex=data[:HEX_BYTES].hex(),
    )


def summarize(data: bytes) -> Payload:
    """What `data`, a connection's first bytes, are: a ClientHello, an HTTP request, or raw
    bytes. Pure; never raises on any input."""
    first = bytes(data[:READ_BYTES])
    return (
        _tls(first) or _http(first) or Payload("raw", size=len(first), hex=first[:HEX_BYTES].hex())
    )


@dataclass(frozen=True)
class Segment:
    """The first segment of a request the guest sent, from the host-side flow record."""

    time: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: Payload

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)


def _segments(packets: Iterable[tuple[float, bytes]]) -> Iterator[Segment]:
    for stamp, frame in packets:
        try:
            eth = dpkt.ethernet.Ethernet(frame)
        except _REFUSED:
            continue
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
            continue
        tcp = ip.data
        if not isinstance(tcp, dpkt.tcp.TCP) or not tcp.data:
            continue
        try:
            src, dst = ipaddress.ip_address(bytes(ip.src)), ipaddress.ip_address(bytes(ip.dst))
        except ValueError:
            continue
        payload = summarize(bytes(tcp.data))
        if payload.kind == "raw":
            continue  # the flow record keeps only requests' first segments; this is something else
        yield Segment(float(stamp), str(src), tcp.sport, str(dst), tcp.dport, payload)


def read_segments(paths: Sequence[Path]) -> list[Segment]:
    """Every request's first segment in the pcap files `paths` (the host-side flow record). A
    file cut short by a stopped capture gives its whole packets."""
    found: list[Segment] = []
    for path in paths:
        try:
            with path.open("rb") as handle:
                reader = dpkt.pcap.Reader(handle)
                packets: list[tuple[float, bytes]] = []
                try:
                    for stamp, frame in reader:
                        packets.append((stamp, frame))
                except _REFUSED:
                    pass  # a torn last packet
        except (OSError, *_REFUSED):
            continue
        found.extend(_segments(packets))
    return found


# A request's first segment is sent this soon after the connect the guest recorded (both clocks
# read on one machine: the guest's is synchronised to the host's at `up`).
JOIN_WINDOW = 120.0


def attach(attempts: Sequence[Attempt], segments: Sequence[Segment]) -> list[Attempt]:
    """The attempts, each TCP one given the server name or HTTP request of the first segment
    the host saw on its connection (same addresses and ports, nearest in time). Pure."""
    by_key: dict[tuple[str, int, str, int], list[Segment]] = {}
    for segment in segments:
        by_key.setdefault(segment.key, []).append(segment)
    out = []
    for attempt in attempts:
        if attempt.proto != "tcp" or attempt.src is None or attempt.sport is None:
            out.append(attempt)
            continue
        candidates = by_key.get((attempt.src, attempt.sport, attempt.dst, attempt.dport or 0), [])
        when = parse_time(attempt.time).timestamp()
        near = [s for s in candidates if abs(s.time - when) <= JOIN_WINDOW]
        if not near:
            out.append(attempt)
            continue
        best = min(near, key=lambda s: abs(s.time - when)).payload
        out.append(replace(attempt, sni=best.sni or attempt.sni, http=best.http or attempt.http))
    return out

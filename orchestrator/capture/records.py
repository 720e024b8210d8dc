"""The records `sandbox logs` keeps: connection attempts and DNS queries, one JSON line each.

Both producers (the guest-side capture in monitor.py and the host-side DNS log reader) write these
shapes, and the readers never see anything else: a record is its own schema. `id` is the dedupe key
a re-collection checks before appending, so it must be derived from the source's own sequence
numbers and clocks (the guest capture's counts and clock, the resolver's log line), never from a
counter of ours.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Self

from orchestrator import jsontext
from orchestrator.errors import GuestError, SandboxError

_CORRUPT_HINT = (
    "the sandbox's log file is damaged or was written by another version; "
    "move it aside (or run `sandbox logs --purge`) and collect again"
)


class LogRecordError(SandboxError):
    """A JSON line that is not a record of the expected kind."""


class Verdict(Enum):
    ALLOWED = "allowed"
    BLOCKED = "blocked"
    DNS = "dns"  # a query to the sandbox's resolver, let through by the DNS rule
    LOOPBACK = "loopback"  # never leaves the guest, never reaches the firewall
    BOOT = "boot"  # refused by the boot-time default-deny, before the policy was loaded
    # A TCP connect the capture saw that the guest's firewall never logged: its rules were
    # changed (guest root flushed them) or bypassed. What the host-side filter made of it:
    UNLOGGED = "unlogged"  # the policy allows the destination: the host let it through
    HOST_BLOCKED = "host-blocked"  # it does not: the host-side filter dropped it
    # The guest's firewall or capture changed under it (a record of its own, not an attempt).
    TAMPER = "tamper"
    # A UDP socket connected to an outside address that sent nothing: no packet left, but the
    # software meant to talk there (stream_socket_client("udp://...") never written to).
    UNSENT = "unsent"
    # The same from glibc's getaddrinfo sorting a lookup's answers (RFC 6724: it connects a UDP
    # socket to each address to learn the source it would use, and never sends): the lookup's,
    # not the software's own intent. Hidden by `sandbox logs` unless asked (--probes).
    PROBE = "probe"
    # Sinkhole mode: a connection to the sinkhole the name the software asked for led it to;
    # nothing left the machine (egress/sinkhole.py).
    SINKHOLED = "sinkholed"


def iso_time(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, the one time format of every record."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_GUEST_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


def guest_seconds(text: str, what: str) -> float:
    """A clock reading the guest printed (`date +%s.%N`, /proc/uptime); GuestError when it is
    not one: guest root may have replaced date ("1e400", "nan" and "²" are floats to Python)."""
    value = text.strip()
    if not _GUEST_SECONDS.fullmatch(value):
        raise GuestError(
            f"the guest printed {value[:40]!r} for a clock reading while {what}",
            "guest root may have replaced date or /proc/uptime; destroy the sandbox if it goes on",
        )
    return float(value)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _load(line: str, kind: str) -> dict[str, Any]:
    try:
        return jsontext.parse_object(line)
    except jsontext.JsonObjectError as error:
        raise LogRecordError(
            f"not a JSON {kind} record: {line[:80]!r} ({error})", _CORRUPT_HINT
        ) from None


def _known_fields(cls: type[Any], value: dict[str, Any], kind: str) -> dict[str, Any]:
    try:
        return jsontext.known_fields(cls, value)
    except jsontext.JsonObjectError as error:
        raise LogRecordError(
            f"{kind} record with {error}: {json.dumps(value)[:80]}", _CORRUPT_HINT
        ) from None


@dataclass(frozen=True)
class Frame:
    """One PHP stack frame behind an attempt: the function and the place it was called from."""

    function: str  # "fsockopen", "Client->send", "{main}"
    file: str  # the guest path of the calling file ("" for {main})
    line: int  # the calling line (0 for {main})
    args: str | None = None  # the call's arguments as xdebug printed them (innermost frame only)

    def describe(self) -> str:
        name = "main" if self.function == "{main}" else f"{self.function}()"
        if not self.file:
            return name
        return f"{name} at {self.file.rsplit('/', 1)[-1]}:{self.line}"


@dataclass(frozen=True)
class Attempt:
    """One connection attempt; a line of logs/connections.jsonl."""

    id: str
    time: str
    verdict: Verdict
    proto: str  # "tcp" | "udp" | "icmp" | "icmpv6" | another protocol name
    family: int  # 4 | 6
    dst: str
    dport: int | None
    src: str | None = None
    sport: int | None = None
    uid: int | None = None
    pid: int | None = None
    ppid: int | None = None
    exe: str | None = None
    cmdline: str | None = None
    # For a query to the resolver (verdict dns): the name asked. For another attempt: the name
    # a DNS lookup returned this dst for, if any.
    dns_name: str | None = None
    dns_type: str | None = None  # a query's types asked, "A" or "A, AAAA" (verdict dns only)
    evidence: str = ""  # "connect+firewall" | "firewall" | "connect"
    stack: tuple[Frame, ...] = ()  # PHP frames, innermost first, from the xdebug trace
    run: str | None = None  # the `sandbox run` this attempt belongs to
    # The HTTP request being served when it was made (`sandbox serve`): "GET /path?query".
    request: str | None = None
    # What the connection sent first, read on the host (capture/payload.py): a TLS ClientHello's
    # server name; an HTTP request as "METHOD HOST PATH"; for a sinkholed connection, its first
    # bytes as the sinkhole saw them ("TLS ClientHello, server name x", "12 bytes: 48454c...").
    sni: str | None = None
    http: str | None = None
    payload: str | None = None

    def to_json(self) -> str:
        value = asdict(self)
        value["verdict"] = self.verdict.value
        if not self.stack:
            del value["stack"]
        if self.run is None:
            del value["run"]
        if self.dns_type is None:
            del value["dns_type"]
        for optional in ("request", "sni", "http", "payload"):
            if value[optional] is None:
                del value[optional]
        return json.dumps(value, sort_keys=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Self:
        value = _known_fields(cls, _load(line, "connection"), "connection")
        try:
            value["verdict"] = Verdict(value["verdict"])
        except ValueError:
            raise LogRecordError(
                f"connection record with unknown verdict {value['verdict']!r}", _CORRUPT_HINT
            ) from None
        try:
            value["stack"] = tuple(Frame(**frame) for frame in value.get("stack", ()))
        except TypeError:
            raise LogRecordError(
                f"connection record with a malformed stack: {line[:80]!r}", _CORRUPT_HINT
            ) from None
        return cls(**value)


@dataclass(frozen=True)
class DnsQuery:
    """One query the sandbox network's resolver received; a line of logs/dns.jsonl."""

    id: str
    time: str
    client: str
    name: str
    qtype: str
    result: str  # "203.0.113.7, 2001:db8::7" | "REFUSED" | "NXDOMAIN" | "NODATA" ...
    # The client's source port: with `client`, the guest socket that asked (None: a record
    # stored before it was kept).
    port: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Self:
        return cls(**_known_fields(cls, _load(line, "DNS"), "DNS"))

    def addresses(self) -> tuple[str, ...]:
        """The addresses in `result`; empty for REFUSED, NXDOMAIN and the like."""
        found = []
        for part in self.result.split(","):
            try:
                found.append(str(ipaddress.ip_address(part.strip())))
            except ValueError:
                continue
        return tuple(found)

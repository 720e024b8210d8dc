"""`sandbox policy suggest`: a policy file from what a sandbox's software tried. Pure: records ->
a model (`suggest`) -> YAML text (`render`), which `sandbox up --policy` loads unchanged.

Everything here comes from the guest: a DNS name is used only when it is a valid host name (else
the address it was asked for stands in), and the comments naming the process and PHP line behind
each entry are reduced to printable ASCII on one line, so that no guest text can end a comment
and become YAML.

A sinkholed attempt (learn mode under the sinkhole, or sinkhole mode) went to the sinkhole on the
sandbox network's gateway: it becomes a `host:` entry for the name it was resolved from, never
an entry for the gateway's address, which is inside the sandbox network (`up --policy` refuses
that range). Without a name it cannot be expressed, and the header says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator.capture.records import Attempt, Verdict
from orchestrator.egress.policy import _HOSTNAME_RE, IPNetwork

# What the software tried to reach outside: attempts whatever the verdict (a policy learned
# from an enforcing sandbox's log suggests what it blocked too). Not: queries to the sandbox's
# own resolver (dns: true covers them), loopback, the boot's own traffic, tamper rows, and
# glibc's address-sorting probes (the lookup's, not the software's).
_WANTED = frozenset(
    {
        Verdict.ALLOWED,
        Verdict.BLOCKED,
        Verdict.UNLOGGED,
        Verdict.HOST_BLOCKED,
        Verdict.UNSENT,
        Verdict.SINKHOLED,
    }
)
_PORTED = frozenset({"tcp", "udp"})
_ICMP = frozenset({"icmp", "icmpv6"})
# Comments show at most this many distinct origins per entry, each at most this long.
MAX_ORIGINS = 3
MAX_COMMENT = 160


@dataclass(frozen=True)
class Entry:
    """One suggested allow entry: a host name (as asked) or an address, a protocol and port."""

    host: str | None
    address: str | None
    proto: str  # "tcp" | "udp" | "icmp"
    port: int | None
    count: int
    origins: tuple[str, ...]  # "php (412) fsockopen() at fetch.php:7", first seen first

    def to_yaml_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {"host": self.host} if self.host else {"address": self.address}
        value["proto"] = self.proto
        if self.port is not None:
            value["port"] = self.port
        return value

    def sort_key(self) -> tuple[int, str, str, int]:
        return (0 if self.host else 1, self.host or self.address or "", self.proto, self.port or 0)


@dataclass(frozen=True)
class Suggestion:
    entries: tuple[Entry, ...]
    dns: bool  # the software asked the sandbox's resolver: keep it answering
    skipped: tuple[str, ...]  # what could not be expressed as an entry, said in the header


def comment_text(value: object) -> str:
    """Guest text made safe for a YAML comment: printable ASCII on one line (anything else
    escaped as \\xNN or \\uNNNN, including every character YAML or a reader might take as a line
    break), capped. Pure."""
    out: list[str] = []
    for char in str(value):
        code = ord(char)
        if 0x20 <= code < 0x7F and char != "\\":
            out.append(char)
        elif char == "\\":
            out.append("\\\\")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    text = "".join(out)
    return text if len(text) <= MAX_COMMENT else text[: MAX_COMMENT - 3] + "..."


def _host(name: str | None) -> str | None:
    if not name:
        return None
    host = name.strip().lower().rstrip(".")
    if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        return None
    return host


def _address(dst: str) -> str | None:
    try:
        address = ipaddress.ip_address(dst)
    except ValueError:
        return None
    if address.is_loopback or address.is_multicast or address.is_unspecified:
        return None
    if address.is_link_local:
        return None
    return str(address)


def _asked(attempt: Attempt, address: str) -> str | None:
    """The host name to allow for this attempt: the DNS name its address was looked up under,
    unless the PHP call itself named the address and not that name (a literal address in the
    code, which a lookup elsewhere happened to return too)."""
    host = _host(attempt.dns_name)
    if host is None or not attempt.stack or not attempt.stack[0].args:
        return host
    args = attempt.stack[0].args.lower()
    return None if address in args and host not in args else host


def _origin(attempt: Attempt) -> str:
    """Who made the attempt: the process, and the PHP call with the frame that called it."""
    name = (attempt.exe or "?").rsplit("/", 1)[-1]
    who = name if attempt.pid is None else f"{name} ({attempt.pid})"
    frames = [f.describe() for f in attempt.stack[:2] if f.file]
    return f"{who}: {' <- '.join(frames)}" if frames else who


def _inside(address: str, inside: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip.version == net.version and ip in net for net in inside)


def suggest(attempts: Iterable[Attempt], inside: Sequence[IPNetwork] = ()) -> Suggestion:
    """The entries that would let these attempts through: one per (name or address, protocol,
    port), names where a DNS name was asked. `inside`: the sandbox networks' ranges, whose
    addresses (the gateway, the sinkhole on it, another sandbox) never become address entries.
    Pure."""
    counts: dict[tuple[str | None, str | None, str, int | None], int] = {}
    origins: dict[tuple[str | None, str | None, str, int | None], list[str]] = {}
    skipped: set[str] = set()
    dns = False
    for attempt in attempts:
        if attempt.verdict is Verdict.DNS:
            dns = True
            continue
        if attempt.verdict not in _WANTED:
            continue
        address = _address(attempt.dst)
        if address is None:
            continue
        if attempt.proto in _PORTED:
            proto, port = attempt.proto, attempt.dport
        elif attempt.proto in _ICMP:
            proto, port = "icmp", None
        else:
            skipped.add(f"protocol {attempt.proto} to {address}")
            continue
        host = _asked(attempt, address)
        where = f"{proto} port {port}" if port is not None else proto
        if host is None and attempt.verdict is Verdict.SINKHOLED:
            # The sinkhole's own address, reached without a name (a literal in the code, or a
            # name the guest's record lost): no entry would let this through.
            skipped.add(f"sinkholed {where} without a name (the sinkhole's own address)")
            continue
        if host is None and _inside(address, inside):
            skipped.add(f"{where} to {address}, inside the sandbox network")
            continue
        key = (host, None if host else address, proto, port)
        counts[key] = counts.get(key, 0) + 1
        seen = origins.setdefault(key, [])
        origin = _origin(attempt)
        if origin not in seen:
            seen.append(origin)
    entries = [Entry(*key, counts[key], tuple(origins[key])) for key in counts]
    if any(e.host for e in entries):
        dns = True
    return Suggestion(
        entries=tuple(sorted(entries, key=Entry.sort_key)),
        dns=dns,
        skipped=tuple(sorted(skipped)),
    )


def render(suggestion: Suggestion, header: Sequence[str] = ()) -> str:
    """The suggestion as a policy file: each entry a YAML flow mapping written by the YAML
    library, under comments that say who made the attempts. Pure."""
    lines = [f"# {comment_text(line)}" for line in header]
    for what in suggestion.skipped:
        lines.append(f"# not expressible as an allow entry: {comment_text(what)}")
    lines.append(yaml.safe_dump({"dns": suggestion.dns}, default_flow_style=False).rstrip())
    if not suggestion.entries:
        lines.append("allow: []")
        return "\n".join(lines) + "\n"
    lines.append("allow:")
    for entry in suggestion.entries:
        shown = entry.origins[:MAX_ORIGINS]
        more = len(entry.origins) - len(shown)
        times = "1 attempt" if entry.count == 1 else f"{entry.count} attempts"
        lines.append(f"  # {times}" + (f", {more} more origin(s)" if more > 0 else ""))
        for origin in shown:
            lines.append(f"  #   {comment_text(origin)}")
        item = yaml.safe_dump(
            [entry.to_yaml_value()], default_flow_style=True, sort_keys=False, width=1000
        ).strip()
        # safe_dump writes a one-item flow list "[{...}]": as a block item "- {...}".
        lines.append(f"  - {item[1:-1]}")
    return "\n".join(lines) + "\n"

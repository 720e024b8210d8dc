"""The egress policy: what a sandbox may reach. Pure: parsing and validation, no side effects
except host-name resolution, which is injected."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UsageError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Sequence[str]]

ALLOW_EXAMPLES = (
    "examples: 203.0.113.7, 198.51.100.0/24, 203.0.113.7:443, udp:203.0.113.7:5353, "
    "[2001:db8::1]:443, example.org:443, '*.example.org:443'"
)
WILDCARD_PREFIX = "*."
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)
_ALLOW_KEYS = {"address", "host", "proto", "port"}
_POLICY_KEYS = {"allow", "dns", "blocked", "sinkhole"}


class Proto(Enum):
    ANY = "any"
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"


class Learn(Enum):
    """Whether the sandbox learns what the software tries rather than enforcing a policy
    (`--learn`, then `sandbox policy suggest`). ALLOW_ALL lets every outside destination through
    in both layers and the resolver answers every name. SINKHOLE (`--learn --sinkhole`) lets
    nothing out: every name resolves to the sinkhole (sinkhole mode, EgressPolicy.sinkhole),
    which records what the software sends, and literal addresses are blocked as usual. The
    records and `policy suggest` do not depend on which."""

    OFF = "off"
    ALLOW_ALL = "allow-all"
    SINKHOLE = "sinkhole"


LEARN_WARNING = (
    "LEARN MODE: this sandbox allows ALL egress (both layers) and its resolver answers every "
    "name; the software can reach and send anything anywhere. Use it only to learn a policy "
    "(`sandbox policy suggest`), never for software you would not run unconfined"
)
LEARN_SINKHOLE_NOTE = (
    "learn mode under the sinkhole: every name the software asked for resolved to the sinkhole, "
    "which recorded what it sent and forwarded nothing; literal addresses were blocked. Nothing "
    "left the machine, and no verdict here is what a policy would have done"
)


class Blocked(Enum):
    """What happens to a blocked attempt: REJECT fails it fast (ECONNREFUSED), as the recipe did;
    DROP lets it time out, which tells a probing program less."""

    REJECT = "reject"
    DROP = "drop"


@dataclass(frozen=True)
class Allow:
    """One allowed destination: a network, optionally narrowed to a protocol and a port. A port
    without a protocol allows TCP and UDP."""

    network: IPNetwork
    proto: Proto = Proto.ANY
    port: int | None = None
    # Where it came from: the text the user gave, and the host name it was resolved from.
    source: str = field(default="", compare=False)
    host: str | None = field(default=None, compare=False)

    @property
    def version(self) -> int:
        return self.network.version

    def sort_key(self) -> tuple[int, int, int, str, int]:
        net = self.network
        return (
            net.version,
            int(net.network_address),
            net.prefixlen,
            self.proto.value,
            self.port or 0,
        )

    def describe(self) -> str:
        addr = (
            str(self.network)
            if self.network.num_addresses > 1
            else str(self.network.network_address)
        )
        if self.version == 6 and self.port is not None:
            addr = f"[{addr}]"
        text = addr if self.port is None else f"{addr}:{self.port}"
        if self.proto is not Proto.ANY:
            text = f"{self.proto.value}:{text}"
        return text + (f" ({self.host})" if self.host else "")


@dataclass(frozen=True)
class Wildcard:
    """`*.example.org:443`: every name under a domain (not the domain itself), on one port (TCP
    and UDP unless a protocol is given). Nothing is resolved at `up`: the sandbox's resolver
    forwards such names when the guest asks, and the addresses of each answer become allowed for
    that sandbox, on that protocol and port, in both layers, before the guest reads the answer
    (egress/wildcards.py)."""

    domain: str  # "example.org": lower case, no trailing dot
    proto: Proto
    port: int
    source: str = field(default="", compare=False)

    def matches(self, name: str) -> bool:
        return name.lower().rstrip(".").endswith("." + self.domain)

    @property
    def protos(self) -> tuple[str, ...]:
        return ("tcp", "udp") if self.proto is Proto.ANY else (self.proto.value,)

    def describe(self) -> str:
        text = f"{WILDCARD_PREFIX}{self.domain}:{self.port}"
        return text if self.proto is Proto.ANY else f"{self.proto.value}:{text}"


@dataclass(frozen=True)
class EgressPolicy:
    allow: tuple[Allow, ...] = ()
    # The guest may ask the sandbox network's own resolver (only); never an outside server.
    dns: bool = True
    blocked: Blocked = Blocked.REJECT
    # Host names from the allowlist and the addresses they resolved to at `up`; the sandbox's
    # resolver answers these names and nothing else.
    names: tuple[tuple[str, tuple[str, ...]], ...] = ()
    learn: Learn = Learn.OFF
    # Sinkhole mode (`up --sinkhole`): every name the guest asks for resolves to the sandbox
    # network's gateway (allowed names keep their addresses), whose TCP ports all lead to the
    # sinkhole (egress/sinkhole.py), which records what the guest sends and forwards nothing.
    # The one switch: the resolver, both filters and the host's guard read it from here.
    sinkhole: bool = False
    # Names under a domain, allowed as the resolver answers them (Wildcard).
    wildcards: tuple[Wildcard, ...] = ()

    def for_version(self, version: int) -> tuple[Allow, ...]:
        return tuple(a for a in self.allow if a.version == version)

    def allows(self, proto: str, dst: str, dport: int | None) -> bool:
        """Whether the host-side filter lets a packet of `proto` to dst:dport out. Pure."""
        try:
            address = ipaddress.ip_address(dst)
        except ValueError:
            return False
        for entry in self.allow:
            if address.version != entry.version or address not in entry.network:
                continue
            if entry.proto is Proto.ICMP:
                if proto in ("icmp", "icmpv6"):
                    return True
                continue
            if entry.proto is not Proto.ANY and entry.proto.value != proto:
                continue
            if entry.port is None and entry.proto is Proto.ANY:
                return True
            if proto in ("tcp", "udp") and entry.port in (None, dport):
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow": [
                {
                    "network": str(a.network),
                    "proto": a.proto.value,
                    "port": a.port,
                    "source": a.source,
                    "host": a.host,
                }
                for a in self.allow
            ],
            "dns": self.dns,
            "blocked": self.blocked.value,
            "names": {name: list(addrs) for name, addrs in self.names},
            "learn": self.learn.value,
            "sinkhole": self.sinkhole,
            "wildcards": [
                {"domain": w.domain, "proto": w.proto.value, "port": w.port, "source": w.source}
                for w in self.wildcards
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressPolicy:
        return cls(
            allow=tuple(
                Allow(
                    network=ipaddress.ip_network(a["network"]),
                    proto=Proto(a["proto"]),
                    port=a["port"],
                    source=a.get("source", ""),
                    host=a.get("host"),
                )
                for a in data.get("allow", [])
            ),
            dns=bool(data.get("dns", True)),
            blocked=Blocked(data.get("blocked", "reject")),
            names=tuple((n, tuple(v)) for n, v in sorted(data.get("names", {}).items())),
            learn=Learn(data.get("learn", "off")),
            sinkhole=bool(data.get("sinkhole", False)),
            wildcards=tuple(
                Wildcard(
                    domain=str(w["domain"]),
                    proto=Proto(w["proto"]),
                    port=int(w["port"]),
                    source=str(w.get("source", "")),
                )
                for w in data.get("wildcards", [])
            ),
        )

    def with_sinkhole(self, gateway: ipaddress.IPv4Address) -> EgressPolicy:
        """The policy both filters enforce on a network whose gateway is `gateway`: in sinkhole
        mode, the gateway (every port, TCP and UDP) is allowed, so that the guest's connections
        to the names it resolved reach the sinkhole there; otherwise the policy itself. Pure."""
        if not self.sinkhole:
            return self
        entry = Allow(ipaddress.ip_network(gateway), source="sinkhole", host=None)
        return replace(self, allow=tuple(sorted({*self.allow, entry}, key=Allow.sort_key)))

    def with_wildcard_ports(self) -> EgressPolicy:
        """The policy the host-side nwfilter enforces: a wildcard's protocol and port open to
        every address, because the addresses are not known until the resolver hands them out.
        What is reached on those ports is then the host's guard's to decide (hostguard.py: its
        forward chain lets through only the addresses handed out, and the allow entries). Pure."""
        if not self.wildcards:
            return self
        wide: set[Allow] = set(self.allow)
        for wildcard in self.wildcards:
            for everything in ("0.0.0.0/0", "::/0"):
                net = ipaddress.ip_network(everything)
                wide.add(Allow(net, wildcard.proto, wildcard.port, source=wildcard.describe()))
        return replace(self, allow=tuple(sorted(wide, key=Allow.sort_key)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def system_resolver(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"cannot resolve host name {name!r} on this machine: {exc}",
            "check the name, or allow its address instead",
        ) from None
    return sorted({str(info[4][0]) for info in infos})


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"--allow {text!r}: {why}", ALLOW_EXAMPLES)


def _port(text: str, value: str) -> int:
    # isdigit() alone takes "²" and other Unicode digits, which int() then refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 5:
        raise _bad(text, f"port {value!r} is not a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise _bad(text, f"port {port} is out of range (1-65535)")
    return port


def _network(text: str, value: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "/" in value:
            # A CIDR with host bits set is almost always a typo: say so instead of widening it.
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise _bad(text, f"{value!r} is not a valid address or CIDR") from None
            raise _bad(text, f"{exc}") from None
        return None


def _refuse_ambiguous_ipv6(text: str, value: str) -> None:
    """`2001:db8::1:443` is an IPv6 address, and also reads as 2001:db8::1 port 443: refuse it
    rather than guess. An address whose last group cannot be a port is not ambiguous."""
    head, sep, last = value.rpartition(":")
    if not sep or "/" in value or not (last.isascii() and last.isdigit()):
        return
    try:
        ipaddress.IPv6Address(value)
        ipaddress.IPv6Address(head)
    except ValueError:
        return
    if 1 <= int(last) <= 65535:
        raise _bad(
            text,
            f"ambiguous: write [{head}]:{last} for port {last} of {head}, "
            f"or [{value}] for the address {value}",
        )


def parse_wildcard(text: str) -> Wildcard | None:
    """One --allow value if it is a wildcard (`*.example.org:443`, `tcp:*.example.org:443`),
    else None. Pure."""
    raw = text.strip()
    head, sep, tail = raw.partition(":")
    proto = Proto.ANY
    rest = raw
    if sep and head.lower() in {p.value for p in Proto}:
        proto, rest = Proto(head.lower()), tail
    if not rest.startswith(WILDCARD_PREFIX):
        if "*" in raw:
            raise _bad(text, "a wildcard is a whole first label: '*.example.org:443'")
        return None
    name, sep, port_text = rest[len(WILDCARD_PREFIX) :].partition(":")
    domain = name.lower().rstrip(".")
    if not _HOSTNAME_RE.match(domain) or domain.replace(".", "").isdigit() or "*" in domain:
        raise _bad(text, f"{name!r} after '*.' is not a domain name")
    if "." not in domain:
        raise _bad(text, f"'*.{domain}' would allow a whole top-level domain: name a domain")
    if proto is Proto.ICMP:
        raise _bad(text, "a wildcard allows a port, and ICMP has none")
    if not sep:
        raise _bad(
            text,
            "a wildcard needs a port: the host's filter opens that port to the addresses the "
            "resolver hands out, never every port",
        )
    return Wildcard(domain, proto, _port(text, port_text), source=raw)


def parse_allow(text: str, resolve: Resolver = system_resolver) -> list[Allow]:
    """Parse one --allow value. A host name expands to one entry per address it resolves to."""
    raw = text.strip()
    if not raw:
        raise _bad(text, "empty")
    rest = raw
    proto = Proto.ANY
    head, sep, tail = rest.partition(":")
    if sep and head.lower() in {p.value for p in Proto}:
        proto = Proto(head.lower())
        rest = tail
    port: int | None = None
    if rest.startswith("["):
        addr, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise _bad(text, "missing ']' after the IPv6 address")
        if after:
            if not after.startswith(":"):
                raise _bad(text, f"unexpected {after!r} after ']'")
            port = _port(text, after[1:])
        host_part = addr
    elif rest.count(":") == 1:
        host_part, _, port_text = rest.partition(":")
        port = _port(text, port_text)
    else:
        host_part = rest  # an IPv6 address or CIDR without a port, an IPv4 one, or a name
        _refuse_ambiguous_ipv6(text, rest)
    if port is not None and proto is Proto.ICMP:
        raise _bad(text, "ICMP has no ports")
    net = _network(text, host_part)
    if net is not None:
        if net.version == 6 and port is not None and not rest.startswith("["):
            raise _bad(text, "write an IPv6 address with a port in brackets: [2001:db8::1]:443")
        return [Allow(net, proto, port, source=raw)]
    name = host_part.lower().rstrip(".")
    if not _HOSTNAME_RE.match(name) or name.replace(".", "").isdigit():
        raise _bad(text, f"{host_part!r} is neither an IP address, a CIDR nor a host name")
    addresses = resolve(name)
    if not addresses:
        raise _bad(text, f"host name {name!r} resolved to no address")
    return [Allow(ipaddress.ip_network(a), proto, port, source=raw, host=name) for a in addresses]


def _entry_text(entry: Any, where: str) -> str:
    """A policy-file allow entry: a string like on the command line, or a mapping."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: an allow entry must be a string or a mapping", ALLOW_EXAMPLES)
    unknown = set(entry) - _ALLOW_KEYS
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
            f"known keys: {', '.join(sorted(_ALLOW_KEYS))}",
        )
    target = entry.get("address", entry.get("host"))
    if ("address" in entry) == ("host" in entry):
        raise UsageError(f"{where}: give exactly one of address or host", ALLOW_EXAMPLES)
    text = str(target)
    if "port" in entry:
        text = f"[{text}]:{entry['port']}" if ":" in text else f"{text}:{entry['port']}"
    if "proto" in entry:
        text = f"{entry['proto']}:{text}"
    return text


@dataclass(frozen=True)
class PolicyFile:
    allow: tuple[str, ...] = ()
    dns: bool | None = None
    blocked: Blocked | None = None
    sinkhole: bool | None = None


def load_policy_file(path: Path) -> PolicyFile:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"policy file {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise UsageError(f"policy file {path} is a directory", "name the YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read policy file {path}: {exc}", "check the path and its permissions"
        ) from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}", "fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a YAML mapping", "see `sandbox up --help`")
    unknown = set(data) - _POLICY_KEYS
    if unknown:
        raise UsageError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}",
            f"known keys: {', '.join(sorted(_POLICY_KEYS))}",
        )
    allow = data.get("allow") or []
    if not isinstance(allow, list):
        raise UsageError(f"{path}: allow must be a list", ALLOW_EXAMPLES)
    dns = data.get("dns")
    if dns is not None and not isinstance(dns, bool):
        raise UsageError(f"{path}: dns must be true or false", "dns: true")
    blocked = data.get("blocked")
    try:
        blocked_value = Blocked(blocked) if blocked is not None else None
    except ValueError:
        raise UsageError(f"{path}: blocked must be reject or drop", "blocked: reject") from None
    sinkhole = data.get("sinkhole")
    if sinkhole is not None and not isinstance(sinkhole, bool):
        raise UsageError(f"{path}: sinkhole must be true or false", "sinkhole: true")
    return PolicyFile(
        allow=tuple(_entry_text(e, f"{path}: allow[{i}]") for i, e in enumerate(allow)),
        dns=dns,
        blocked=blocked_value,
        sinkhole=sinkhole,
    )


def build_policy(
    allow: Iterable[str],
    *,
    dns: bool = True,
    blocked: Blocked = Blocked.REJECT,
    resolve: Resolver = system_resolver,
    sinkhole: bool = False,
) -> EgressPolicy:
    entries: list[Allow] = []
    wildcards: list[Wildcard] = []
    for text in allow:
        wildcard = parse_wildcard(text)
        if wildcard is None:
            entries.extend(parse_allow(text, resolve))
        elif wildcard not in wildcards:
            wildcards.append(wildcard)
    unique = sorted(set(entries), key=Allow.sort_key)
    names: dict[str, set[str]] = {}
    for entry in entries:
        if entry.host:
            names.setdefault(entry.host, set()).add(str(entry.network.network_address))
    return EgressPolicy(
        allow=tuple(unique),
        dns=dns,
        blocked=blocked,
        names=tuple((n, tuple(sorted(a))) for n, a in sorted(names.items())),
        sinkhole=sinkhole,
        wildcards=tuple(sorted(wildcards, key=lambda w: (w.domain, w.proto.value, w.port))),
    )


def learn_policy(
    policy: EgressPolicy, exclude: Iterable[IPNetwork], *, mode: Learn = Learn.ALLOW_ALL
) -> EgressPolicy:
    """`policy` made a learn-mode one. ALLOW_ALL widens it: every address except `exclude` (the
    sandbox networks' ranges: one sandbox must not reach another, learning or not) is allowed,
    any protocol and port, in both layers, which render these entries like any others. SINKHOLE
    keeps the sinkhole policy as it is, which must allow nothing (nothing may leave). Raises
    UsageError for the combinations that would not learn what they say (check_learn)."""
    check_learn(policy, mode)
    if mode is Learn.OFF:
        return policy
    if mode is Learn.SINKHOLE:
        return dataclasses.replace(policy, learn=mode)
    wide: list[Allow] = []
    for everything in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        rest: list[IPNetwork] = [everything]
        for hole in exclude:
            if hole.version != everything.version:
                continue
            split: list[IPNetwork] = []
            for net in rest:
                if hole.subnet_of(net):  # type: ignore[arg-type]
                    split.extend(net.address_exclude(hole))  # type: ignore[arg-type]
                elif not net.subnet_of(hole):  # type: ignore[arg-type]
                    split.append(net)
            rest = split
        wide.extend(Allow(net, source="learn") for net in rest)
    return dataclasses.replace(
        policy, allow=tuple(sorted(set(policy.allow) | set(wide), key=Allow.sort_key)), learn=mode
    )


def check_learn(policy: EgressPolicy, mode: Learn) -> None:
    """Refuse a learn mode that would not learn what it says. Pure.

    - Learning needs the sandbox's resolver: the names it answers are what a suggested policy is
      made of (under allow-all, --no-dns would send lookups to outside resolvers instead, and
      the policy would name addresses; under the sinkhole, no name would reach the sinkhole).
    - Allow-all learning with sinkhole mode on (from a policy file) contradicts itself: the
      user says which with --sinkhole or --no-sinkhole.
    - Sinkhole learning lets nothing leave the machine, so it takes no allow entries (from the
      config file, a policy file or --allow). `up --sinkhole --policy FILE` enforces a policy and
      sinkholes every other name, and `policy suggest` reads its logs too."""
    if mode is Learn.OFF:
        return
    if not policy.dns:
        raise UsageError(
            "learn mode learns names at the sandbox's resolver, and --no-dns (or dns: false in "
            "the policy file) turns it off",
            "drop --no-dns; the suggested policy says dns: false if the software asked no name",
        )
    if mode is Learn.ALLOW_ALL and policy.sinkhole:
        raise UsageError(
            "--learn alone lets every destination out, and the policy file turns sinkhole mode on",
            "add --sinkhole to learn under the sinkhole (nothing leaves the machine), or "
            "--no-sinkhole to learn with everything allowed",
        )
    if mode is Learn.SINKHOLE:
        if not policy.sinkhole:
            raise UsageError(
                "learning under the sinkhole needs sinkhole mode, and it is off",
                "use --learn --sinkhole, without --no-sinkhole or sinkhole: false",
            )
        if policy.allow:
            given = ", ".join(sorted({a.source or a.describe() for a in policy.allow}))
            raise UsageError(
                "learning under the sinkhole lets nothing leave the machine, and the allow list "
                f"would let these out: {given}",
                "drop them (--allow, the policy file's allow:, the config file's allow:); or, to "
                "enforce a policy and sinkhole every other name, use --sinkhole --policy FILE "
                "without --learn: `sandbox policy suggest` reads those logs too",
            )


def check_wildcards(policy: EgressPolicy, learn: Learn = Learn.OFF) -> None:
    """Refuse wildcards where the resolver could not hand out their addresses. Pure."""
    if not policy.wildcards:
        return
    given = ", ".join(w.source or w.describe() for w in policy.wildcards)
    if not policy.dns:
        raise UsageError(
            f"wildcard entries ({given}) are resolved at the sandbox's resolver, and --no-dns "
            "(or dns: false in the policy file) turns it off",
            "drop --no-dns, or allow the addresses instead of the names",
        )
    if policy.sinkhole:
        raise UsageError(
            f"sinkhole mode answers every name with the sinkhole, wildcards ({given}) included",
            "drop --sinkhole, or allow the names one by one (example.org:443), which keep "
            "their own addresses under the sinkhole",
        )
    if learn is not Learn.OFF:
        raise UsageError(
            f"learn mode records what the software asks for, and wildcards ({given}) would "
            "make the resolver decide instead",
            "drop the wildcard entries while learning; `policy suggest` names the hosts",
        )

"""The egress policy model: --allow syntax, policy files, host names, JSON round trip."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.egress.policy import (
    Allow,
    Blocked,
    EgressPolicy,
    Proto,
    build_policy,
    load_policy_file,
    parse_allow,
)
from orchestrator.errors import UsageError


def fake_resolver(name: str) -> Sequence[str]:
    table = {"allowed.example": ["203.0.113.7", "2001:db8:1::7"], "v4only.example": ["203.0.113.8"]}
    if name not in table:
        raise UsageError(f"cannot resolve host name {name!r}", "check the name")
    return table[name]


@pytest.mark.parametrize(
    ("text", "network", "proto", "port"),
    [
        ("203.0.113.7", "203.0.113.7/32", Proto.ANY, None),
        ("198.51.100.0/24", "198.51.100.0/24", Proto.ANY, None),
        ("203.0.113.7:443", "203.0.113.7/32", Proto.ANY, 443),
        ("udp:203.0.113.7:5353", "203.0.113.7/32", Proto.UDP, 5353),
        ("TCP:203.0.113.7:80", "203.0.113.7/32", Proto.TCP, 80),
        ("[2001:db8::1]:443", "2001:db8::1/128", Proto.ANY, 443),
        ("2001:db8::1", "2001:db8::1/128", Proto.ANY, None),
        ("2001:db8::/32", "2001:db8::/32", Proto.ANY, None),
        ("tcp:[2001:db8::1]:22", "2001:db8::1/128", Proto.TCP, 22),
        ("icmp:203.0.113.7", "203.0.113.7/32", Proto.ICMP, None),
        ("[2001:db8::1]", "2001:db8::1/128", Proto.ANY, None),
    ],
)
def test_allow_syntax(text: str, network: str, proto: Proto, port: int | None) -> None:
    (entry,) = parse_allow(text, fake_resolver)
    assert entry == Allow(ipaddress.ip_network(network), proto, port)
    assert entry.source == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("203.0.113.7:0", "out of range"),
        ("203.0.113.7:65536", "out of range"),
        ("203.0.113.7:http", "not a number"),
        ("203.0.113.300", "neither an IP address"),
        ("198.51.100.1/24", "host bits set"),
        ("10.0.0.0/40", "not a valid address or CIDR"),
        ("icmp:203.0.113.7:80", "ICMP has no ports"),
        ("[2001:db8::1", "missing ']'"),
        ("[2001:db8::1]x", "unexpected"),
        ("bad_name!", "neither an IP address"),
        ("nowhere.example", "cannot resolve"),
        ("", "empty"),
    ],
)
def test_bad_allow_is_a_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_allow(text, fake_resolver)
    assert info.value.hint


def test_host_names_expand_and_are_recorded() -> None:
    policy = build_policy(["allowed.example:443", "203.0.113.7:443"], resolve=fake_resolver)
    # The literal and the resolved v4 address are the same rule: kept once.
    assert [a.describe() for a in policy.allow] == [
        "203.0.113.7:443 (allowed.example)",
        "[2001:db8:1::7]:443 (allowed.example)",
    ]
    assert policy.names == (("allowed.example", ("2001:db8:1::7", "203.0.113.7")),)
    assert [a.version for a in policy.for_version(6)] == [6]


def test_json_round_trip() -> None:
    policy = build_policy(
        ["allowed.example", "udp:198.51.100.0/24:53"],
        dns=False,
        blocked=Blocked.DROP,
        resolve=fake_resolver,
    )
    again = EgressPolicy.from_dict(policy.to_dict())
    assert again == policy
    assert [a.host for a in again.allow] == [a.host for a in policy.allow]


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.yaml"
    path.write_text(
        "allow:\n"
        "  - 203.0.113.7\n"
        "  - {address: 198.51.100.0/24, proto: udp, port: 5353}\n"
        "  - {address: '2001:db8::1', port: 443}\n"
        "  - {host: allowed.example}\n"
        "dns: false\n"
        "blocked: drop\n"
    )
    pf = load_policy_file(path)
    assert pf.allow == (
        "203.0.113.7",
        "udp:198.51.100.0/24:5353",
        "[2001:db8::1]:443",
        "allowed.example",
    )
    assert pf.dns is False and pf.blocked is Blocked.DROP
    policy = build_policy(pf.allow, resolve=fake_resolver)
    assert len(policy.allow) == 4  # allowed.example resolves to 203.0.113.7, given already


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("allow: 203.0.113.7\n", "allow must be a list"),
        ("allow: [{address: 203.0.113.7, host: a.example}]\n", "exactly one of"),
        ("allow: [{adress: 203.0.113.7}]\n", "unknown key"),
        ("dns: maybe\n", "dns must be true or false"),
        ("blocked: ignore\n", "blocked must be reject or drop"),
        ("alow: []\n", "unknown key"),
        ("- 1\n", "must be a YAML mapping"),
    ],
)
def test_bad_policy_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_policy_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("203.0.113.7:²", "port '²' is not a number"),
        ("203.0.113.7:٤٤٣", "is not a number"),  # Arabic-Indic digits
        ("203.0.113.7:0000443", "is not a number"),
        ("2001:db8::1:443", r"ambiguous: write \[2001:db8::1\]:443"),
        ("tcp:::1:80", r"ambiguous"),
    ],
)
def test_hostile_or_ambiguous_allow_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_allow(text, resolve=lambda name: [])


def test_unambiguous_ipv6_forms_stay_accepted() -> None:
    for text, described in [
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1:443]", "2001:db8::1:443"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("2001:db8:1::9", "2001:db8:1::9"),
    ]:
        assert [a.describe() for a in parse_allow(text, resolve=lambda name: [])] == [described]


def test_policy_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        load_policy_file(tmp_path)


def test_allows_matches_the_host_filter() -> None:
    p = build_policy(
        [
            "203.0.113.7:443",
            "udp:198.51.100.0/24:53",
            "icmp:203.0.113.9",
            "[2001:db8::1]:80",
            "192.0.2.5",
        ],
        dns=True,
        resolve=lambda name: [],
    )
    assert p.allows("tcp", "203.0.113.7", 443) and p.allows("udp", "203.0.113.7", 443)
    assert not p.allows("tcp", "203.0.113.7", 80)
    assert p.allows("udp", "198.51.100.77", 53) and not p.allows("tcp", "198.51.100.77", 53)
    assert p.allows("icmp", "203.0.113.9", None) and not p.allows("tcp", "203.0.113.9", 1)
    assert p.allows("tcp", "2001:db8::1", 80) and not p.allows("tcp", "2001:db8::2", 80)
    assert p.allows("tcp", "192.0.2.5", 1) and p.allows("icmp", "192.0.2.5", None)
    assert not p.allows("tcp", "not an address", 1)

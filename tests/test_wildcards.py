"""Wildcard entries (`*.example.org:443`, issue 16 item 3): parsing, what each layer renders, the
resolver's pure parts (egress/wildcards.py), the read-back's tolerance of exactly the rules the
resolver recorded, the collection's accounting of its loads, and the lab's DNS server. The whole
path runs on a real VM in tests/test_e2e_wildcards.py; the rules' exact form in a real kernel here
(test_real_iptables_prints_the_rule_as_rendered)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dpkt
import pytest

from orchestrator import paths
from orchestrator.capture.records import Attempt, Verdict
from orchestrator.config import load_settings
from orchestrator.egress import firewall, hostguard, wildcards
from orchestrator.egress.policy import (
    Blocked,
    Learn,
    Proto,
    Wildcard,
    build_policy,
    check_wildcards,
    parse_wildcard,
)
from orchestrator.errors import UsageError
from orchestrator.lifecycle.collection import _own_loads
from orchestrator.vm.domain import NetworkSpec, render_network
from sandbox_lab import dns as labdns

from .conftest import Golden


def _no_names(name: str) -> list[str]:
    raise AssertionError(f"unexpected name lookup: {name}")


POLICY = build_policy(
    ["*.cdn.example.org:443", "udp:*.stun.example.net:3478", "203.0.113.7:443", "198.51.100.0/24"],
    resolve=_no_names,
)


# --- parsing -----------------------------------------------------------------------------------


def test_wildcards_parse_and_never_resolve() -> None:
    assert POLICY.wildcards == (
        Wildcard("cdn.example.org", Proto.ANY, 443),
        Wildcard("stun.example.net", Proto.UDP, 3478),
    )
    assert [str(a.network) for a in POLICY.allow] == ["198.51.100.0/24", "203.0.113.7/32"]
    assert POLICY.names == ()
    assert parse_wildcard("tcp:*.Example.ORG.:80") == Wildcard("example.org", Proto.TCP, 80)
    assert parse_wildcard("example.org:443") is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("*.example.org", "needs a port"),
        ("*.org:443", "top-level domain"),
        ("icmp:*.example.org:1", "ICMP has none"),
        ("a.*.example.org:443", "whole first label"),
        ("*example.org:443", "whole first label"),
        ("*.exa_mple.org:443", "not a domain name"),
        ("*.*.example.org:443", "not a domain name"),
        ("*.example.org:99999", "out of range"),
    ],
)
def test_bad_wildcards_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_wildcard(text)
    assert why in caught.value.message


def test_matching_is_below_the_domain_only() -> None:
    w = Wildcard("cdn.example.org", Proto.ANY, 443)
    assert w.matches("a.cdn.example.org") and w.matches("x.y.CDN.example.org.")
    assert not w.matches("cdn.example.org")
    assert not w.matches("evilcdn.example.org")
    assert not w.matches("cdn.example.org.evil.test")


def test_the_policy_round_trips_through_state() -> None:
    from orchestrator.egress.policy import EgressPolicy

    again = EgressPolicy.from_dict(json.loads(POLICY.to_json()))
    assert again == POLICY and again.wildcards == POLICY.wildcards


@pytest.mark.parametrize(
    ("changes", "learn", "why"),
    [
        ({"dns": False}, Learn.OFF, "--no-dns"),
        ({"sinkhole": True}, Learn.OFF, "sinkhole"),
        ({}, Learn.ALLOW_ALL, "learn mode"),
    ],
)
def test_wildcards_are_refused_where_the_resolver_cannot_hand_out(
    changes: dict[str, bool], learn: Learn, why: str
) -> None:
    import dataclasses

    with pytest.raises(UsageError) as caught:
        check_wildcards(dataclasses.replace(POLICY, **changes), learn)  # type: ignore[arg-type]
    assert why in caught.value.message
    check_wildcards(POLICY)


def test_config_names_the_upstream_resolvers(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("network:\n  resolvers: [198.51.100.53]\n")
    assert load_settings(config, tmp_path / "default.yaml", {}).network.resolvers == (
        "198.51.100.53",
    )
    config.write_text("network:\n  resolvers: [not-an-address]\n")
    with pytest.raises(UsageError):
        load_settings(config, tmp_path / "default.yaml", {})


# --- what each layer renders ---------------------------------------------------------------------


def test_guest_rules_jump_to_the_resolvers_chain_before_the_block() -> None:
    text = firewall.render_rules(POLICY, version=4, resolver=IPv4Address("192.0.2.1"))
    lines = text.splitlines()
    assert ":SBX-WILD - [0:0]" in lines
    assert lines.index("-A OUTPUT -j SBX-WILD") == lines.index("-A OUTPUT -j SBX-BLOCK") - 1
    assert not [line for line in lines if line.startswith("-A SBX-WILD")]  # empty at load
    plain = build_policy(["203.0.113.7"], resolve=_no_names)
    assert "SBX-WILD" not in firewall.render_rules(
        plain, version=4, resolver=IPv4Address("192.0.2.1")
    )


def test_the_host_filter_opens_the_wildcards_ports_to_every_address() -> None:
    wide = POLICY.with_wildcard_ports()
    opened = {(str(a.network), a.proto.value, a.port) for a in wide.allow} - {
        (str(a.network), a.proto.value, a.port) for a in POLICY.allow
    }
    assert opened == {
        ("0.0.0.0/0", "any", 443),
        ("::/0", "any", 443),
        ("0.0.0.0/0", "udp", 3478),
        ("::/0", "udp", 3478),
    }


def _guard() -> hostguard.Wildcards:
    return hostguard.Wildcards(
        ports=tuple((proto, w.port) for w in POLICY.wildcards for proto in w.protos),
        allow=POLICY.allow,
        reject=POLICY.blocked is Blocked.REJECT,
    )


def test_host_guard_golden(golden: Golden) -> None:
    golden.check("hostguard-wildcards.nft", hostguard.render_ruleset("sbr0123", None, _guard()))


def test_network_sends_only_the_wildcard_domains_to_the_resolver() -> None:
    spec = NetworkSpec(
        name="sandbox-w",
        bridge="sbrw",
        subnet=ipaddress.IPv4Network("192.168.208.16/28"),
        wildcard_domains=("cdn.example.org", "stun.example.net"),
        wildcard_port=5300,
    )
    xml = render_network(spec)
    assert "server=/cdn.example.org/127.0.0.1#5300" in xml
    assert "server=/stun.example.net/127.0.0.1#5300" in xml
    assert "no-resolv" in xml  # nothing else is ever forwarded


# --- the resolver's pure parts ------------------------------------------------------------------


def _query(name: str, qtype: int = 1, qid: int = 7) -> bytes:
    return bytes(dpkt.dns.DNS(id=qid, qd=[dpkt.dns.DNS.Q(name=name, type=qtype)]))


def test_question_and_refusal() -> None:
    assert wildcards.question(_query("A.Cdn.Example.org")) == (7, "a.cdn.example.org", 1)
    assert wildcards.question(b"\x00garbage") is None
    refused = dpkt.dns.DNS(wildcards.reply_with(_query("x.test"), 5))
    assert refused.qr == dpkt.dns.DNS_R and refused.rcode == 5 and refused.id == 7
    assert refused.an == []


def test_answer_addresses_reads_a_and_aaaa_bounded_and_checks_the_id() -> None:
    reply = labdns.answer(_query("a.cdn.inet.test", 1, qid=9))
    assert reply is not None
    assert wildcards.answer_addresses(reply, 9) == ["203.0.113.7"]
    assert wildcards.answer_addresses(reply, 10) is None  # another query's answer
    assert wildcards.answer_addresses(_query("a.cdn.inet.test"), 7) is None  # not an answer
    msg = dpkt.dns.DNS(reply)
    many = []
    for i in range(wildcards.MAX_ADDRESSES + 10):
        rr = dpkt.dns.DNS.RR(name="a.cdn.inet.test", type=1, cls=1, ttl=60)
        rr.rdata = ipaddress.IPv4Address(f"203.0.113.{i % 250}").packed
        rr.rlen = 4
        many.append(rr)
    msg.an = many
    assert len(wildcards.answer_addresses(bytes(msg), 9) or []) <= wildcards.MAX_ADDRESSES


def test_handed_out_records_make_the_rules_and_loads_they_name(tmp_path: Path) -> None:
    lines = [
        {"time": 1.0, "name": "a.x.org", "address": "203.0.113.7", "proto": "tcp", "port": 80,
         "nonce": "aa11"},
        {"time": 1.0, "name": "a.x.org", "address": "2001:db8::7", "proto": "udp", "port": 80,
         "nonce": "bb22"},
    ]  # fmt: skip
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"cut short'
    (tmp_path / wildcards.HANDED_OUT_FILE).write_text(text)
    assert wildcards.handed_out_rules(tmp_path) == {
        "-A SBX-WILD -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j SBX-ALLOW",
        "-A SBX-WILD -d 2001:db8::7/128 -p udp -m udp --dport 80 -j SBX-ALLOW",
    }
    assert wildcards.own_loads(tmp_path) == {
        "iptables-restore -w --noflush /run/sandbox-wild/aa11.v4",
        "ip6tables-restore -w --noflush /run/sandbox-wild/bb22.v6",
    }
    assert wildcards.read_handed_out(tmp_path / "nothing") == []


def test_read_back_tolerates_exactly_the_recorded_rules() -> None:
    expected = firewall.render_rules(POLICY, version=4, resolver=IPv4Address("192.0.2.1"))
    ours = firewall.wildcard_rule(IPv4Address("203.0.113.7"), "tcp", 443)
    other = firewall.wildcard_rule(IPv4Address("192.0.2.99"), "tcp", 443)
    saved = expected.replace("COMMIT", f"{ours}\nCOMMIT")
    assert firewall.differences(expected, saved) == [f"unexpected: {ours}"]
    assert firewall.differences(expected, saved, {ours}) == []
    forged = expected.replace("COMMIT", f"{ours}\n{other}\nCOMMIT")
    assert firewall.differences(expected, forged, {ours}) == [f"unexpected: {other}"]
    assert firewall.wildcard_rule(IPv6Address("2001:db8::1"), "udp", 53) == (
        "-A SBX-WILD -d 2001:db8::1/128 -p udp -m udp --dport 53 -j SBX-ALLOW"
    )


def _tamper(cmdline: str) -> Attempt:
    return Attempt(
        id=f"t{uuid.uuid4().hex}",
        time="2026-12-06T00:00:00Z",
        verdict=Verdict.TAMPER,
        proto="",
        family=4,
        dst="",
        dport=None,
        pid=5,
        cmdline=cmdline,
    )


def test_collection_takes_each_of_the_resolvers_loads_once_ever(tmp_path: Path) -> None:
    record = {"time": 1.0, "name": "a.x.org", "address": "203.0.113.7", "proto": "tcp",
              "port": 80, "nonce": "aa11"}  # fmt: skip
    (tmp_path / wildcards.HANDED_OUT_FILE).write_text(json.dumps(record) + "\n")
    load = "iptables-restore -w --noflush /run/sandbox-wild/aa11.v4"
    root = _tamper("iptables -F OUTPUT")
    first = [_tamper(load), root]
    assert _own_loads(first, tmp_path, POLICY) == [root]
    assert (tmp_path / paths.WILDCARD_LOADS_SEEN).read_text() == load + "\n"
    replayed = _tamper(load)  # the guest running the same command line again
    assert _own_loads([replayed], tmp_path, POLICY) == [replayed]
    plain = build_policy(["203.0.113.7"], resolve=_no_names)
    again = _tamper(load)
    assert _own_loads([again], tmp_path, plain) == [again]


# --- the lab's DNS server ------------------------------------------------------------


def test_lab_dns_answers_its_zone_only() -> None:
    for name, qtype, rcode, count in (
        ("a.cdn.inet.test", 1, 0, 1),
        ("a.cdn.inet.test", 28, 0, 1),
        ("b.cdn.inet.test", 28, 0, 0),
        ("nothing.inet.test", 1, 3, 0),
        ("example.org", 1, 5, 0),
    ):
        reply = labdns.answer(_query(name, qtype))
        assert reply is not None
        msg = dpkt.dns.DNS(reply)
        assert (msg.rcode, len(msg.an)) == (rcode, count), name
    assert labdns.answer(b"junk") is None


# --- a real kernel ------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("iptables-restore") is None or shutil.which("ip") is None:
        pytest.skip("needs iptables and iproute2")
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"sbx-wild-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.root
def test_real_iptables_prints_the_rule_as_rendered(netns: str) -> None:
    """The resolver's load, run as the guest runs it, prints back as `wildcard_rule` says: the
    read-back's tolerance compares lines, so a different spelling would be tampering."""
    for version, address in ((4, "203.0.113.7"), (6, "2001:db8:1::9")):
        tool = "iptables" if version == 4 else "ip6tables"
        rendered = firewall.render_rules(
            POLICY,
            version=version,
            resolver=IPv4Address("192.0.2.1"),
            resolver6=IPv6Address("2001:db8:f::1"),
        )
        run = ["ip", "netns", "exec", netns]
        subprocess.run([*run, f"{tool}-restore"], input=rendered, text=True, check=True)
        rule = firewall.wildcard_rule(ipaddress.ip_address(address), "tcp", 443)
        load = wildcards.restore_text([rule])
        subprocess.run(
            [*run, f"{tool}-restore", "-w", "--noflush"], input=load, text=True, check=True
        )
        saved = subprocess.run(
            [*run, f"{tool}-save", "-t", "filter"], capture_output=True, text=True, check=True
        ).stdout
        assert rule in saved.splitlines()
        assert firewall.differences(rendered, saved, {rule}) == []
        assert firewall.differences(rendered, saved) == [f"unexpected: {rule}"]


def test_an_unlogged_attempt_to_a_handed_out_address_is_not_host_blocked() -> None:
    from orchestrator.lifecycle.collection import _host_verdict

    def unlogged(dst: str, port: int) -> Attempt:
        return Attempt(
            id="k1", time="t", verdict=Verdict.UNLOGGED, proto="tcp", family=4, dst=dst,
            dport=port,
        )  # fmt: skip

    handed = {("192.0.2.80", "tcp", 443)}
    assert _host_verdict(unlogged("192.0.2.80", 443), POLICY, handed).verdict is Verdict.UNLOGGED
    assert _host_verdict(unlogged("192.0.2.80", 80), POLICY, handed).verdict is (
        Verdict.HOST_BLOCKED
    )
    assert _host_verdict(unlogged("192.0.2.81", 443), POLICY, handed).verdict is (
        Verdict.HOST_BLOCKED
    )

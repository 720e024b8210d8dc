"""Sinkhole mode (egress/sinkhole.py and the switch in EgressPolicy): the resolver's, both
filters' and the host guard's parts rendered; the join of the sinkhole's records to the guest's
attempts; and the real sinkhole process on loopback, answering a recorded ClientHello, an HTTP
request and raw bytes."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.capture.records import Attempt, Frame, Verdict
from orchestrator.egress import firewall, hostfilter, hostguard, sinkhole
from orchestrator.egress.policy import EgressPolicy, build_policy, load_policy_file
from orchestrator.vm.domain import render_network

from .conftest import Golden
from .test_payload import _client_hello
from .test_renderers import net_spec

GATEWAY = ipaddress.IPv4Address("192.168.208.17")
DNSMASQ = "{http://libvirt.org/schemas/network/dnsmasq/1.0}option"


def _resolve(name: str) -> list[str]:
    return {"www.inet.test": ["203.0.113.7"]}[name]


def test_the_switch_is_one_field_of_the_policy(tmp_path: Path) -> None:
    plain = build_policy(["www.inet.test"], resolve=_resolve)
    sunk = build_policy(["www.inet.test"], resolve=_resolve, sinkhole=True)
    assert plain.with_sinkhole(GATEWAY) == plain
    assert [a.describe() for a in sunk.with_sinkhole(GATEWAY).allow] == [
        "192.168.208.17",
        "203.0.113.7 (www.inet.test)",
    ]
    assert EgressPolicy.from_dict(json.loads(sunk.to_json())) == sunk
    # A state written before the switch existed loads as no sinkhole.
    assert EgressPolicy.from_dict({"allow": [], "dns": True}).sinkhole is False
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("sinkhole: true\nallow: [www.inet.test]\n")
    assert load_policy_file(policy_file).sinkhole is True


def test_the_resolver_answers_every_other_name_with_the_gateway() -> None:
    spec = net_spec()
    plain = {o.get("value") for o in ET.fromstring(render_network(spec)).iter(DNSMASQ)}
    assert not any(v and v.startswith("address=") for v in plain)
    sunk = ET.fromstring(render_network(spec.__class__(**{**spec.__dict__, "sinkhole": True})))
    options = {o.get("value") for o in sunk.iter(DNSMASQ)}
    assert "address=/#/192.168.208.17" in options
    assert {"no-resolv", "no-hosts"} <= options  # still nothing forwarded
    # The allowed names keep their own addresses.
    assert sunk.find("dns/host[@ip='203.0.113.7']") is not None


def test_both_filters_let_the_guest_reach_the_gateway_only_in_sinkhole_mode() -> None:
    for on in (False, True):
        policy = build_policy([], sinkhole=on).with_sinkhole(GATEWAY)
        rules = firewall.render_rules(policy, version=4, resolver=GATEWAY, resolver6=None)
        assert ("-d 192.168.208.17/32 -j SBX-ALLOW" in rules) is on, rules
        host = hostfilter.filter_rules(policy, gateway=GATEWAY, gateway6=None)
        allowed = [r for r in host if r.priority == hostfilter.PRIO_ALLOW]
        assert bool(allowed) is on
        assert all(
            ("dstipaddr", "192.168.208.17") in r.match
            for r in allowed
            if r.direction.value == "out"
        )


def test_guard_golden(golden: Golden) -> None:
    ruleset = hostguard.render_ruleset("virbr-sandbox", hostguard.Sinkhole("192.168.208.17", 40123))
    golden.check("hostguard-sinkhole.nft", ruleset)
    assert "tcp dport != 53 redirect to :40123" in ruleset
    # Without the sinkhole, the guard is as before.
    assert "redirect" not in hostguard.render_ruleset("virbr-sandbox")


def _attempt(n: int, verdict: Verdict, dport: int, **kw: object) -> Attempt:
    base: dict[str, object] = {
        "id": f"k{n}",
        "time": f"2026-12-05T21:00:0{n}.000Z",
        "verdict": verdict,
        "proto": "udp" if dport == 53 else "tcp",
        "family": 4,
        "dst": str(GATEWAY),
        "dport": dport,
        "src": "192.168.208.18",
        "sport": 40000 + n,
        "pid": 300,
    }
    base.update(kw)
    return Attempt(**base)  # type: ignore[arg-type]


def test_attach_marks_names_and_fills_what_was_sent() -> None:
    frame = Frame("fsockopen", "/tmp/x.php", 3)
    attempts = [
        _attempt(0, Verdict.DNS, 53, dns_name="a.evil.test"),
        _attempt(1, Verdict.ALLOWED, 80, stack=(frame,)),
        _attempt(2, Verdict.DNS, 53, dns_name="b.evil.test"),
        _attempt(3, Verdict.ALLOWED, 7777),
        _attempt(4, Verdict.ALLOWED, 443, dst="203.0.113.7"),  # an allowed address: left alone
        _attempt(5, Verdict.ALLOWED, 9, pid=301),  # another process: no name of its own
    ]
    stamp = attempts[1].time.replace("Z", "+00:00")
    when = __import__("datetime").datetime.fromisoformat(stamp).timestamp()
    records = [
        sinkhole.Sinkholed(
            when + 0.2,
            "192.168.208.18",
            40001,
            80,
            None,
            "GET a.evil.test /",
            "HTTP GET a.evil.test /",
        ),
        sinkhole.Sinkholed(
            when + 2.1, "192.168.208.18", 40003, 7777, None, None, "3 bytes: 616263"
        ),
        # Same socket, but far from the attempt in time: another connection.
        sinkhole.Sinkholed(when + 900, "192.168.208.18", 40005, 9, None, None, "1 bytes: 00"),
    ]
    joined = sinkhole.attach(attempts, records, str(GATEWAY))
    assert [a.verdict for a in joined] == [
        Verdict.DNS,
        Verdict.SINKHOLED,
        Verdict.DNS,
        Verdict.SINKHOLED,
        Verdict.ALLOWED,
        Verdict.SINKHOLED,
    ]
    assert (joined[1].dns_name, joined[1].http, joined[1].payload) == (
        "a.evil.test",
        "GET a.evil.test /",
        "HTTP GET a.evil.test /",
    )
    assert joined[1].stack == (frame,)
    assert (joined[3].dns_name, joined[3].payload) == ("b.evil.test", "3 bytes: 616263")
    assert (joined[5].dns_name, joined[5].payload) == (None, None)
    assert joined[4] == attempts[4]
    # The queries may have come in an earlier collection.
    later = sinkhole.attach(attempts[3:4], records, str(GATEWAY), history=attempts[:3])
    assert later[0].dns_name == "b.evil.test"


def test_records_from_the_file_are_checked() -> None:
    lines = [
        json.dumps({"time": 1.5, "src": "10.0.0.2", "sport": 5, "dport": 80, "summary": "x" * 999}),
        json.dumps({"time": "soon", "src": "10.0.0.2", "sport": 5, "dport": 80}),
        json.dumps({"time": 1.5, "src": "10.0.0.2", "sport": "5", "dport": 80}),
        "not json",
        '{"time": 2, "src": "10.0.0.2", "sport": 6, "dport": null}',
    ]
    found = sinkhole.parse_records("\n".join(lines))
    assert [(r.sport, r.dport, len(r.summary)) for r in found] == [(5, 80, 400)]


# ---- the real sinkhole, on loopback ------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[sinkhole.Started, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (the sinkhole gives up root to nobody)")
    started = sinkhole.start(ipaddress.IPv4Address("127.0.0.1"), tmp_path)
    try:
        yield started, tmp_path
    finally:
        sinkhole.stop(started.pid)


def _talk(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        if data:
            conn.sendall(data)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.root
def test_the_real_sinkhole_answers_minimally_and_records(
    service: tuple[sinkhole.Started, Path],
) -> None:
    started, logs = service
    status = Path(f"/proc/{started.pid}/status").read_text()
    assert "Uid:\t65534" in status  # no longer root once it holds its socket and log
    assert (
        _talk(started.port, b"GET /c?id=1 HTTP/1.1\r\nHost: t.evil.test\r\n\r\n")
        == sinkhole.HTTP_OK
    )
    assert _talk(started.port, _client_hello()) == sinkhole.TLS_ALERT
    begun = time.monotonic()
    assert _talk(started.port, b"HELLO") == b""  # raw bytes: no answer, closed when idle
    assert _talk(started.port, b"") == b""  # nothing sent: closed after READ_SECONDS
    assert time.monotonic() - begun < sinkhole.READ_SECONDS + 3
    lines = [json.loads(line) for line in (logs / sinkhole.RECORDS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["summary"]) for r in lines] == [
        ("http", "HTTP GET t.evil.test /c?id=1"),
        ("tls", "TLS ClientHello, server name www.inet.test"),
        ("raw", "5 bytes: 48454c4c4f"),
        ("raw", "no bytes"),
    ]
    assert sinkhole.stop(started.pid) is True
    assert sinkhole.stop(started.pid) is False


def test_the_report_says_sinkhole_mode_and_reads_older_files() -> None:
    from orchestrator.capture import report

    sunk = report._policy(build_policy([], sinkhole=True).to_dict())
    assert sunk is not None and sunk.sinkhole is True
    older = {"allow": [], "names": [], "dns": True, "blocked": "reject"}  # before the field
    assert report._typed(report.PolicyInfo, older).sinkhole is False

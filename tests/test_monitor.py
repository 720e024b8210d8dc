"""Connection capture: parsing and the join on real samples from a guest (tests/data/monitor/,
captured with the VM test below), loss detection, exactly-once, and one real VM in the lab."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from orchestrator.capture import logview, monitor
from orchestrator.capture.records import Attempt, DnsQuery, Verdict
from orchestrator.egress import dnslog, firewall
from orchestrator.errors import GuestError
from orchestrator.waits import Deadline, wait_for
from sandbox_lab import in_lab

from .conftest import Golden
from .e2e_support import Cli

DATA = Path(__file__).parent / "data" / "monitor"


def _snapshot(name: str) -> monitor.Snapshot:
    raw = (DATA / name).read_bytes()
    return monitor.parse_snapshot((gzip.decompress(raw) if name.endswith(".gz") else raw).decode())


def _jsonl(attempts: list[Attempt]) -> str:
    return "".join(a.to_json() + "\n" for a in attempts)


# ---- pure: samples from a real guest ----------------------------------------------------------


def test_golden_join_of_a_real_collection(golden: Golden) -> None:
    collected = monitor.process(_snapshot("collect-1.txt"), monitor.Cursor(), final=True)
    golden.check("monitor/collect-1.jsonl", _jsonl(collected.attempts))
    assert collected.warnings == []


def test_golden_firewall_changes_of_a_real_collection(golden: Golden) -> None:
    """A real guest (tests/data/monitor/fwchange-1.txt): iptables-restore before the mark (as
    `up`'s push), then a flush by a copy of iptables under /tmp/evil and its undo, a legacy
    rule added and deleted, and changes in other network namespaces (root's `unshare -n`, an
    unprivileged user's `unshare -rn` with iptables-legacy). `iptables -L` (an empty commit)
    came between them and is not a change."""
    snapshot = _snapshot("fwchange-1.txt")
    cursor = monitor.Cursor().marked(monitor.Mark(snapshot.boot_id, 203_267_355_626))
    collected = monitor.process(snapshot, cursor, final=True)
    rows = [a for a in collected.attempts if a.verdict is Verdict.TAMPER]
    golden.check("monitor/fwchange-1.jsonl", _jsonl(rows))
    assert [r.pid for r in rows] == [749, 750, 751, 752, 753, 761]
    assert rows[0].exe == "/tmp/evil/iptables" and rows[-1].uid == 1000
    assert (snapshot.fwchanges_seq, snapshot.fwchanges_dropped) == (7, 0)
    assert collected.warnings == []


def test_real_sample_attributes_every_attempt_of_the_script() -> None:
    attempts = monitor.process(_snapshot("collect-1.txt"), monitor.Cursor(), final=True).attempts
    php = [a for a in attempts if a.exe and a.exe.startswith("/usr/bin/php")]
    summary = sorted((a.verdict.value, a.proto, a.dst, a.dport) for a in php)
    assert summary == sorted(
        [("allowed", "tcp", "203.0.113.7", 80)] * 3
        + [("blocked", "tcp", "198.51.100.9", 80)] * 2
        + [("blocked", "udp", "198.51.100.9", 53), ("blocked", "tcp", "2001:db8:1::9", 80)]
    )
    assert len({a.pid for a in php}) == 1
    assert all(a.evidence == "connect+firewall" and a.uid == 0 for a in php)
    assert all(a.cmdline and a.cmdline.startswith("php ") for a in php)
    bash = [a for a in attempts if a.exe == "/usr/bin/bash"]
    assert [(a.verdict, a.dst, a.dport, a.uid) for a in bash] == [
        (Verdict.BLOCKED, "198.51.100.9", 80, 1000)
    ]


def test_parse_event_line_decodes_addresses_exe_and_argv() -> None:
    # As sbx-capture prints them (taken from a real guest, then one with a name with a space).
    lines = [
        "c 0 504955132900 1648 1648 1645 0 -115 4 6 203.0.113.7 80 /usr/bin/php8.2 "
        'php\\x00-r\\x00fsockopen("203.0.113.7",80);\\x20@fsockopen("198.51.100.9",80);\\x00',
        "c 2 504973355250 1648 1649 1645 1000 -101 6 17 2001:db8:1::9 53 /usr/bin/php8.2 -",
        "c 6 509707782160 1663 1663 1660 0 -111 4 6 198.51.100.9 81 /dev/shm/a/b/my\\x20bash "
        "/dev/shm/a/b/my\\x20bash\\x00-c\\x00echo\\x20>\\x20/dev/tcp/198.51.100.9/81\\x00",
        "c 7 510234162630 1664 1664 1660 0 0 6 99 ::ffff:203.0.113.7 53 - -",
        "c 8 510234162630 1664 1664 1660 0 0 6 17 not-an-address 53 - -",
        "c 9 1 2 3",
    ]
    events = [monitor.parse_event_line(line, 1000.0) for line in lines]
    assert events[4] is None and events[5] is None
    php, v6, bash, mapped = (e for e in events if e is not None)
    assert (php.pid, php.tid, php.ppid, php.uid, php.exit) == (1648, 1648, 1645, 0, -115)
    assert (php.family, php.dst, php.dport, php.exe) == (4, "203.0.113.7", 80, "/usr/bin/php8.2")
    assert (php.proto, v6.proto, mapped.proto) == ("tcp", "udp", "99")
    assert php.cmdline == 'php -r \'fsockopen("203.0.113.7",80); @fsockopen("198.51.100.9",80);\''
    assert php.time == pytest.approx(1000.0 + 504.9551329)
    assert (v6.family, v6.dst, v6.tid, v6.uid, v6.cmdline) == (6, "2001:db8:1::9", 1649, 1000, None)
    assert bash.exe == "/dev/shm/a/b/my bash"
    assert bash.cmdline == "'/dev/shm/a/b/my bash' -c 'echo > /dev/tcp/198.51.100.9/81'"
    # An IPv4-mapped destination is what leaves the guest: IPv4.
    assert (mapped.family, mapped.dst, mapped.exe) == (4, "203.0.113.7", None)
    assert len({e.key for e in (php, v6, bash, mapped)}) == 4


def _record(
    seq: int, t: float, dst: str = "198.51.100.9", sport: int = 40000, ident: int | None = None
) -> str:
    """A firewall record of the events file as sbx-capture writes it: a blocked TCP SYN at
    monotonic time t (_output's clocks: wall = 900 + t)."""
    ident = seq * 7919 % 65536 if ident is None else ident
    return f"f {seq} {round(t * 1e9)} 0 4 6 192.168.122.5 {sport} {dst} 80 {ident} SBX-BLOCK\\x20"


def _event(
    seq: int,
    t: float,
    dst: str = "198.51.100.9",
    port: int = 80,
    ret: int = -111,
    protocol: int = 6,
) -> str:
    """An events-file line as sbx-capture writes it: bash (pid `seq`) connect()ing at wall time
    `t` (_output's clocks: wall = 900 + monotonic)."""
    mono_ns = round((t - 900.0) * 1e9)
    return (
        f"c {seq} {mono_ns} {seq} {seq} 1 0 {ret} 4 {protocol} {dst} {port} /usr/bin/bash "
        "bash\\x00-c\\x00true\\x00\n"
    )


def _output(
    records: list[str],
    events: str = "",
    *,
    wall: float = 1000.0,
    uptime: float = 100.0,
    boot: str = "b00710ad-0000-0000-0000-000000000000",
    capture: str | None = None,
    events_pos: tuple[int, int] | None = None,
) -> str:
    """collect_script's output around the given events-file lines: firewall records (`f`) and
    connect events (`c`), as read this time."""
    body = "".join(line + "\n" for line in records) + events
    connects, packets = events.count("\n"), len(records)
    size = events_pos or (7, len(body))
    return "\n".join(
        [
            f"@@boot {boot}",
            capture or f"@@capture ok {connects + packets} {connects} 0 {packets} 0",
            f"@@captureclock {uptime:.9f} {wall:.9f}",
            f"@@eventspos {size[0]} {size[1]}",
            "@@events",
            body.rstrip("\n"),
            f"@@clock {wall:.9f} {uptime:.2f}",
            "@@end",
            "",
        ]
    )


# Guest booted at wall 900.0: monotonic time t ↔ wall 900 + t.
def test_join_pairs_in_order_within_a_key_and_uses_each_event_once() -> None:
    records = [
        _record(10, 50.0, sport=1),
        _record(11, 50.004, sport=2),
        _record(12, 50.008, sport=3),
    ]
    events = _event(1, 950.001) + _event(2, 950.003) + _event(3, 950.009)
    out = monitor.process(monitor.parse_snapshot(_output(records, events)), monitor.Cursor())
    assert [(a.sport, a.pid) for a in out.attempts] == [(1, 1), (2, 2), (3, 3)]
    assert {a.evidence for a in out.attempts} == {"connect+firewall"}


def test_retries_of_one_flow_are_one_attempt_and_do_not_steal_events() -> None:
    # SYN of flow 1, its resend one second later, then a new connect: the resend is not an
    # attempt and must not take the second connect's event.
    records = [
        _record(10, 50.0, sport=1, ident=500),
        _record(11, 51.0, sport=1, ident=501),
        _record(12, 51.5, sport=2),
    ]
    events = _event(1, 950.0) + _event(2, 951.5)
    out = monitor.process(monitor.parse_snapshot(_output(records, events)), monitor.Cursor())
    assert [(a.sport, a.pid) for a in out.attempts] == [(1, 1), (2, 2)]
    # A resend collected later is still the same attempt.
    again = monitor.process(
        monitor.parse_snapshot(
            _output(
                [_record(13, 54.0, sport=1, ident=502)],
                wall=1005,
                uptime=105,
                capture="@@capture ok 6 2 0 4 0",  # counts go on: the same capture
            )
        ),
        out.cursor,
    )
    assert again.attempts == []


def test_a_new_connect_reusing_a_port_is_an_attempt_of_its_own() -> None:
    # Thousands of connects to one address reuse source ports: same flow, own connect() each.
    records = [
        _record(10, 50.0, sport=7, ident=100),
        _record(11, 51.5, sport=7, ident=30000),
        _record(12, 53.0, sport=7, ident=30001),
    ]
    events = _event(1, 950.0) + _event(2, 951.5)
    out = monitor.process(monitor.parse_snapshot(_output(records, events)), monitor.Cursor())
    # The third record has no connect of its own: a resend of the second.
    assert [(a.id.split("-")[0], a.pid) for a in out.attempts] == [("k10", 1), ("k11", 2)]


def test_a_new_connect_taken_for_a_resend_loses_nothing_in_a_real_burst() -> None:
    """The burst test's 1-in-10,000 miss, on real records. burst-slice.txt.gz: 5,041 blocked
    connects from one PHP process, cut from a 10,000 burst (TCG) of which the old join got 9,999.
    A quarter of the connects of such a burst get a source port used before (2,232 there); a new
    socket starts at a random IPv4 ID, and the resend check took it for a resend when that ID
    followed the flow's last one by 1..16: record 15714 reuses the port of record 12404 with an ID
    7 above. The old join then shifted every later pair of the burst by one place and lost the
    last connect. With the ID as captured, and made to follow by 1 (a possible resend for the
    check still), every connect keeps its own record. (Captured when the process half came from
    auditd: its connect events carried over field by field into sbx-capture's format.)"""
    snapshot = _snapshot("burst-slice.txt.gz")
    cursor = monitor.Cursor()
    records = {r.seq: r for r in snapshot.firewall}
    first, again = records[12404], records[15714]
    assert again.flow() == first.flow()
    assert again.ident is not None and first.ident is not None
    assert (again.ident - first.ident) % 65536 == 7

    def attempts(firewall: tuple[monitor.FirewallRecord, ...]) -> list[Attempt]:
        out = monitor.process(replace(snapshot, firewall=firewall), cursor, final=True)
        assert out.warnings == []
        return [a for a in out.attempts if a.dst == "198.51.100.9"]

    captured = attempts(snapshot.firewall)
    assert len(captured) == len(records) == 5041
    assert {(a.verdict, a.evidence) for a in captured} == {(Verdict.BLOCKED, "connect+firewall")}
    # In order: the n-th record with the n-th connect (the events' times follow the records').
    by_record = sorted(captured, key=lambda a: int(a.id[1:].split("-")[0]))
    assert [a.time for a in by_record] == sorted(a.time for a in captured)
    unlucky = replace(again, ident=(first.ident + 1) % 65536)
    resent = attempts(tuple(unlucky if r.seq == again.seq else r for r in snapshot.firewall))
    assert [(a.id, a.time, a.pid) for a in resent] == [(a.id, a.time, a.pid) for a in captured]


def _record6(seq: int, t: float, sport: int) -> str:
    return (
        f"f {seq} {round(t * 1e9)} 0 6 6 2001:db8:d5::5 {sport} 2001:db8:1::9 80 0 SBX-BLOCK\\x20"
    )


def test_an_ipv6_burst_that_reuses_ports_loses_nothing() -> None:
    # IPv6 has no ID: a record of a flow seen 0.5 s or more before is a possible resend. In a
    # burst over 500 ports, some reuses come sooner than that and some later; each is a connect.
    n = 3000
    ports = random.Random(4)
    records = [_record6(i, 50.0 + i * 0.002, 30000 + ports.randrange(500)) for i in range(n)]
    events = "".join(
        _event(i + 1, 950.001 + i * 0.002, dst="2001:db8:1::9", ret=-115).replace(
            " 4 6 2001", " 6 6 2001"
        )
        for i in range(n)
    )
    text = _output(records, events, wall=970.0, uptime=70.0)
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor())
    assert [(a.id.split("-")[0], a.pid) for a in out.attempts] == [
        (f"k{i}", i + 1) for i in range(n)
    ]
    assert {a.dst for a in out.attempts} == {"2001:db8:1::9"}


def _udp_record(seq: int, t: float, sport: int, ident: int, prefix: str) -> str:
    escaped = prefix.replace(" ", "\\x20")
    return (
        f"f {seq} {round(t * 1e9)} 0 4 17 192.168.122.5 {sport} 203.0.113.7 5353 {ident} {escaped}"
    )


def test_established_records_are_attempts_only_with_a_connect_of_their_own() -> None:
    allow, again = "SBX-ALLOW ", firewall.LOG_ALLOW_EST
    records = [
        _udp_record(10, 50.0, 7, 100, allow),  # a connect, answered
        _udp_record(11, 50.2, 7, 101, again),  # that socket's next datagram
        _udp_record(12, 51.0, 7, 30000, again),  # a new socket that got port 7
        _udp_record(13, 51.5, 7, 30001, again),  # its next datagram
        _udp_record(14, 56.0, 7, 9000, again),  # a socket with no connect (unconnected sendto)
    ]
    udp = "203.0.113.7"
    events = (
        _event(1, 950.0, udp, 5353, 0, 17)
        + _event(2, 950.2, udp, 0, 0, 17)  # a lone socket that sends nothing, port 0
        + _event(3, 951.0, udp, 5353, 0, 17)
        + _event(4, 951.4, udp, 5353, 0, 17)  # sends nothing
    )
    out = monitor.process(monitor.parse_snapshot(_output(records, events)), monitor.Cursor())
    assert [(a.id.split("-")[0], a.pid, a.verdict, a.proto, a.dport) for a in out.attempts] == [
        ("k10", 1, Verdict.ALLOWED, "udp", 5353),
        ("c50200000000", 2, Verdict.UNSENT, "udp", 0),
        ("k12", 3, Verdict.ALLOWED, "udp", 5353),
        ("c51400000000", 4, Verdict.UNSENT, "udp", 5353),
    ]


def test_udp_connects_on_a_live_flow_are_attempts_in_a_real_guest() -> None:
    """udp-probes-reuse.txt.gz (README.md here): 1,000 allowed UDP connects (+ one datagram
    each) from one PHP process (pid 389). The fake internet answers UDP, so conntrack keeps each
    flow 30 s; 23 sockets got the source port of a flow still held and sent on it as
    ESTABLISHED, never NEW (SBX-ALLOW-EST). Each is an attempt of its own."""
    snapshot = _snapshot("udp-probes-reuse.txt.gz")
    out = monitor.process(snapshot, monitor.Cursor(), final=True)
    mine = [a for a in out.attempts if a.pid == 389]
    assert len(mine) == 1000
    assert {(a.verdict, a.proto, a.dst, a.dport, a.evidence) for a in mine} == {
        (Verdict.ALLOWED, "udp", "203.0.113.7", 5353, "connect+firewall")
    }
    established = [r for r in snapshot.firewall if r.established]
    assert len(established) == 23
    assert len({a.sport for a in mine}) <= 1000 - 23
    # Without those records they would be sockets that sent nothing: what completeness missed.
    before = replace(snapshot, firewall=tuple(r for r in snapshot.firewall if not r.established))
    lost = [
        a for a in monitor.process(before, monitor.Cursor(), final=True).attempts if a.pid == 389
    ]
    assert len([a for a in lost if a.verdict is Verdict.ALLOWED]) == 1000 - 23


def test_getaddrinfo_probes_are_probe_rows_in_a_real_guest() -> None:
    """udp-probes-reuse.txt.gz: 300 times stream_socket_client("udp://multi.test:5353") and a
    datagram, from one PHP process (pid 352), multi.test having two addresses in /etc/hosts
    (203.0.113.7 allowed, 198.51.100.9 blocked). glibc sorts the two by connect()ing a UDP
    socket to each (port 0) and sends nothing: 600 connects with no packet. The 300 real
    connects are attempts; the 600 are probes (a burst of one thread to two addresses on one
    port), rows `sandbox logs` hides unless --probes."""
    snapshot = _snapshot("udp-probes-reuse.txt.gz")
    php = [e for e in snapshot.events if e.pid == 352]
    assert sorted({(e.dst, e.dport, e.proto) for e in php}) == [
        ("198.51.100.9", 0, "udp"),
        ("203.0.113.7", 0, "udp"),
        ("203.0.113.7", 5353, "udp"),
    ]
    assert len(php) == 900
    out = monitor.process(snapshot, monitor.Cursor(), final=True)
    mine = [a for a in out.attempts if a.pid == 352]
    assert Counter((a.verdict, a.dst, a.dport) for a in mine) == {
        (Verdict.ALLOWED, "203.0.113.7", 5353): 300,
        (Verdict.PROBE, "203.0.113.7", 0): 300,
        (Verdict.PROBE, "198.51.100.9", 0): 300,
    }
    assert len(logview.apply(logview.Filter(), mine)) == 300


def _named(name: str) -> tuple[monitor.Snapshot, list[Attempt], list[DnsQuery]]:
    """A recorded collection and its resolver's log, through the collection's steps: join,
    queries named by their socket, probes confirmed by the answers, destinations named."""
    snapshot = _snapshot(f"{name}.txt")
    log = (DATA / f"{name}.dnsmasq.log").read_text()
    queries = dnslog.parse(log, year=2026, tz=UTC)
    attempts = monitor.process(snapshot, monitor.Cursor(), final=True).attempts
    attempts = monitor.name_queries(attempts, queries)
    attempts = monitor.attach_dns_names(monitor.confirm_probes(attempts, queries), queries)
    return snapshot, attempts, queries


def test_every_query_row_carries_the_name_and_types_asked_in_a_real_guest() -> None:
    """dns-names.txt (+ .dnsmasq.log): four runs of `php -r` in a real guest (README.md here)
    with www.inet.test allowed: curl_exec of http://www.inet.test/ (curl resolves in a thread of
    its own: A and AAAA on one socket), gethostbyname("api.inet.test") (the main thread; refused,
    asked twice), and stream_socket_client("udp://198.51.100.9:53") never written to. Every
    query row names what it asked, whichever thread asked: the resolver's log gives each query's
    client port, the row its socket's. Before: attach_dns_names alone named none of the 12."""
    snapshot, attempts, _ = _named("dns-names")
    # curl's lookups were made by a thread of their own.
    threaded = {e.pid for e in snapshot.events if e.dport == 53 and e.tid != e.pid}
    assert threaded == {353, 499, 572, 680}
    rows = [a for a in attempts if a.verdict is Verdict.DNS]
    assert len(rows) == 12
    assert sorted((a.pid, a.dns_name, a.dns_type) for a in rows) == sorted(
        [(pid, "www.inet.test", "A, AAAA") for pid in threaded]
        + [(pid, "api.inet.test", "A") for pid in threaded] * 2
    )
    # Each attempt to an address the answer gave carries the name.
    connects = [a for a in attempts if a.verdict is Verdict.ALLOWED]
    assert {(a.dst, a.dport, a.dns_name) for a in connects} == {
        ("2001:db8:1::9", 80, "www.inet.test")
    }
    assert len(connects) == 4
    # The table shows the name (and types) beside the resolver's address.
    console = Console(width=250, record=True)
    console.print(logview.render_table(rows))
    assert "www.inet.test (A, AAAA)" in console.export_text()


def test_unused_udp_sockets_are_intent_and_probes_are_told_apart_in_a_real_guest() -> None:
    """dns-names.txt: glibc's getaddrinfo in curl's resolver thread connected a UDP socket to
    each of www.inet.test's two addresses (port 80) and sent nothing: probes. PHP's
    stream_socket_client("udp://198.51.100.9:53") in the main thread, never written to: unsent.
    sshd's checks of its listening address (UDP to 0.0.0.0) are no attempt. Before: none of
    these were rows."""
    _, attempts, queries = _named("dns-names")
    silent = [a for a in attempts if a.verdict in (Verdict.PROBE, Verdict.UNSENT)]
    assert sorted((a.verdict.value, a.dst, a.dport) for a in silent) == sorted(
        [("probe", "203.0.113.7", 80), ("probe", "2001:db8:1::9", 80)] * 4
        + [("unsent", "198.51.100.9", 53)] * 4
    )
    assert all(a.exe == "/usr/bin/php8.2" and a.evidence == "connect" for a in silent)
    assert not [a for a in attempts if a.dst == "0.0.0.0"]
    # Hidden by default, shown when asked.
    shown = logview.apply(logview.Filter(), attempts)
    assert Verdict.PROBE not in {a.verdict for a in shown}
    assert Verdict.UNSENT in {a.verdict for a in shown}
    assert len(logview.apply(logview.Filter(probes=True), attempts)) == len(attempts)
    # A probe whose addresses no answer gave is the software's own: two unused sockets of its
    # own back to back look like glibc's to the capture; the resolver's log tells them apart.
    unanswered = [q for q in queries if "203.0.113.7" not in q.result]
    probes = [a for a in attempts if a.verdict is Verdict.PROBE]
    again = monitor.confirm_probes(probes, unanswered)
    assert {(a.verdict, a.dst) for a in again} == {
        (Verdict.UNSENT, "203.0.113.7"),
        (Verdict.PROBE, "2001:db8:1::9"),
    }


def test_an_answer_logged_on_a_clock_ahead_of_the_guests_still_names_the_connect() -> None:
    """From a real run (tests/test_e2e_dns.py): the resolver logged www.inet.test's answer at
    18:22:20 on the host's clock; the guest's connect to the address came at 18:22:19.664 on
    its own, after the answer."""
    query = DnsQuery(
        "d1",
        "2026-12-05T18:22:20.000Z",
        "192.168.208.2",
        "www.inet.test",
        "AAAA",
        "2001:db8:1::9",
        51105,
    )
    connect = Attempt(
        id="k2",
        time="2026-12-05T18:22:19.664Z",
        verdict=Verdict.ALLOWED,
        proto="tcp",
        family=6,
        dst="2001:db8:1::9",
        dport=80,
    )
    [named] = monitor.attach_dns_names([connect], [query])
    assert named.dns_name == "www.inet.test"
    # A name given for the address only well after the connect is not its name.
    later = replace(query, time="2026-12-05T18:22:25.000Z")
    assert monitor.attach_dns_names([connect], [later])[0].dns_name is None


def test_probes_are_a_burst_of_one_thread_to_two_addresses_on_one_port() -> None:
    """glibc connects one socket to each of two or more answers, back to back, in one thread,
    with the port asked for; a lone unused socket is the software's."""

    def line(seq: int, t: float, tid: int, dst: str, port: int, ret: int = 0) -> str:
        family = 6 if ":" in dst else 4
        mono_ns = round((t - 900.0) * 1e9)
        return f"c {seq} {mono_ns} 7 {tid} 1 0 {ret} {family} 17 {dst} {port} /usr/bin/php -\n"

    events = (
        line(1, 950.0, 8, "203.0.113.7", 80)
        + line(2, 950.01, 8, "2001:db8:1::9", 80, ret=-101)  # no IPv6 route: refused
        + line(3, 950.02, 7, "198.51.100.9", 80)  # another thread: its own
        + line(4, 953.0, 8, "198.51.100.10", 80)  # the same thread, seconds later: its own
        + line(5, 953.1, 8, "198.51.100.11", 53)  # another port: its own
    )
    out = monitor.process(monitor.parse_snapshot(_output([], events)), monitor.Cursor(), final=True)
    assert [(a.verdict, a.dst) for a in out.attempts] == [
        (Verdict.PROBE, "203.0.113.7"),
        (Verdict.PROBE, "2001:db8:1::9"),
        (Verdict.UNSENT, "198.51.100.9"),
        (Verdict.UNSENT, "198.51.100.10"),
        (Verdict.UNSENT, "198.51.100.11"),
    ]


def test_a_probe_held_back_stays_a_probe_when_its_burst_went_out_before() -> None:
    """No IPv6 route: the kernel refuses the v6 probe (a row at once), the v4 one waits for a
    datagram that never comes; at the next collection it is still the burst's."""
    events = (
        "c 1 50000000000 7 8 1 0 0 4 17 203.0.113.7 80 /usr/bin/php -\n"
        "c 2 50010000000 7 8 1 0 -101 6 17 2001:db8:1::9 80 /usr/bin/php -\n"
    )
    first = monitor.process(
        monitor.parse_snapshot(_output([], events, wall=950.5, uptime=50.5)), monitor.Cursor()
    )
    assert [(a.verdict, a.dst) for a in first.attempts] == [(Verdict.PROBE, "2001:db8:1::9")]
    later = _output(
        [], "", wall=1000.0, uptime=100.0, events_pos=(7, 0), capture="@@capture ok 2 2 0 0 0"
    )
    second = monitor.process(monitor.parse_snapshot(later), first.cursor)
    assert [(a.verdict, a.dst) for a in second.attempts] == [(Verdict.PROBE, "203.0.113.7")]
    assert monitor.Cursor.from_json(first.cursor.to_json()) == first.cursor


def test_firewall_records_the_buffer_dropped_are_reported_not_ignored() -> None:
    first = monitor.process(monitor.parse_snapshot(_output([_record(10, 50.0)])), monitor.Cursor())
    assert first.warnings == []
    # The buffer was full for 14 records in between (the capture counts them).
    text = _output(
        [_record(25, 60.0, sport=9)], wall=1010, uptime=110, capture="@@capture ok 1 0 0 26 14"
    )
    second = monitor.process(monitor.parse_snapshot(text), first.cursor)
    assert len(second.warnings) == 1 and "14 firewall records were dropped" in second.warnings[0]
    assert second.cursor.losses == tuple(second.warnings)
    # Counted once: the next collection compares with what the cursor kept.
    text = _output(
        [_record(26, 61.0, sport=10)], wall=1020, uptime=120, capture="@@capture ok 1 0 0 27 14"
    )
    assert monitor.process(monitor.parse_snapshot(text), second.cursor).warnings == []


def test_dropped_events_and_a_missing_or_reloaded_capture_are_reported() -> None:
    def warnings(cursor: monitor.Cursor, capture: str) -> list[str]:
        text = _output([_record(10, 50.0)], capture=capture)
        return monitor.process(monitor.parse_snapshot(text), cursor).warnings

    cursor = monitor.Cursor(capture_seq=500, capture_dropped=2, packets_seq=70)
    assert warnings(cursor, "@@capture ok 3 800 2 71 0") == []
    [dropped] = warnings(cursor, "@@capture ok 3 800 5 71 0")
    assert "3 connect events were dropped" in dropped
    [missing] = warnings(cursor, "@@capture missing")
    assert "was not attached" in missing and "attached it again" in missing
    failed = "@@capture missing\nsbx-capture: cannot open /run/x: No space left on device"
    assert "No space left on device" in warnings(cursor, failed)[0]
    # Attached again by someone else between two collections: its counts went back.
    [reloaded] = warnings(cursor, "@@capture ok 3 40 0 1 0")
    assert "loaded again" in reloaded
    # What the cursor keeps is the new count: the next collection compares with it.
    text = _output([_record(10, 50.0)], capture="@@capture ok 3 40 0 1 0")
    after = monitor.process(monitor.parse_snapshot(text), cursor).cursor
    assert (after.capture_seq, after.capture_dropped, after.packets_seq) == (40, 0, 1)


def test_exactly_once_across_collections_with_a_late_connect_event() -> None:
    # Collection 1 sees a fresh firewall record whose connect() has not returned yet: it waits.
    first_text = _output([_record(10, 99.5, sport=1)], wall=1000.0, uptime=100.0)
    first = monitor.process(monitor.parse_snapshot(first_text), monitor.Cursor())
    assert first.attempts == [] and len(first.cursor.pending) == 1
    cursor = monitor.Cursor.from_json(first.cursor.to_json())
    assert cursor == first.cursor
    # Collection 2: a new record, and the late event of the first one with its own.
    records = [_record(11, 100.5, sport=2)]
    events = _event(40, 999.5) + _event(41, 1000.5)
    second_text = _output(records, events, wall=1010.0, uptime=110.0)
    second = monitor.process(monitor.parse_snapshot(second_text), cursor)
    assert [(a.id.split("-")[0], a.pid) for a in second.attempts] == [("k10", 40), ("k11", 41)]
    # Collection 3 finds nothing new.
    third_text = _output(
        [],
        "",
        wall=1020.0,
        uptime=120.0,
        events_pos=(7, len(events)),
        capture="@@capture ok 0 2 0 2 0",
    )
    third = monitor.process(monitor.parse_snapshot(third_text), second.cursor)
    assert third.attempts == [] and third.warnings == []


def test_a_connect_that_waits_pairs_with_its_first_syn_and_the_resends_are_not_attempts() -> None:
    # A blocking connect to a dropped destination: the SYN at 50.0 (logged), and the event as
    # tcp_v4_connect returns, just after; connect() then waits. The SYN is sent again at 51.0
    # and 53.0 (NEW each time: the dropped one was never confirmed), its IPv4 ID the next one.
    records = [_record(10, 50.0, sport=4, ident=10), _record(11, 51.0, sport=4, ident=11)]
    first = monitor.process(
        monitor.parse_snapshot(
            _output(records, _event(7, 950.001, ret=0), wall=1005.0, uptime=105.0)
        ),
        monitor.Cursor(),
    )
    assert [(a.id.split("-")[0], a.pid, a.evidence) for a in first.attempts] == [
        ("k10", 7, "connect+firewall")
    ]
    # Still waiting at the next collection: its third SYN is not an attempt either.
    text = _output(
        [_record(12, 53.0, sport=4, ident=12)],
        "",
        wall=1010.0,
        uptime=110.0,
        capture="@@capture ok 1 1 0 3 0",
    )
    second = monitor.process(monitor.parse_snapshot(text), first.cursor, final=True)
    assert second.attempts == [] and second.warnings == []


def test_a_datagram_sent_without_connect_is_attributed_from_its_own_record() -> None:
    # As sbx-capture prints them: sendto() on an unconnected UDP socket and an ICMP echo from a
    # raw socket carry their sender; a TCP SYN does not (its connect event says), nor a record
    # from a capture that did not know it (12 fields).
    python = "/usr/bin/python3.11 python3\\x00-c\\x00import\\x20socket\\x00"
    lines = [
        f"f 0 50000000000 0 4 17 192.168.122.5 40000 198.51.100.9 53 17 SBX-BLOCK\\x20 "
        f"700 701 699 {python}",
        f"f 1 50100000000 0 4 1 192.168.122.5 0 198.51.100.9 0 18 SBX-BLOCK\\x20 700 700 699 "
        f"{python}",
        "f 2 50200000000 0 4 6 192.168.122.5 40002 198.51.100.9 80 19 SBX-BLOCK\\x20 0 0 0 - -",
        "f 3 50300000000 0 4 17 192.168.122.5 40003 198.51.100.9 54 20 SBX-BLOCK\\x20",
        "f 4 50400000000 0 4 17 192.168.122.5 40004 198.51.100.9 55 21 SBX-BLOCK\\x20 x 0 0 - -",
    ]
    records = [monitor.parse_packet_line(line, 900.0) for line in lines]
    assert records[4] is None
    udp = records[0]
    assert udp is not None
    assert (udp.pid, udp.ppid, udp.exe, udp.cmdline) == (
        700,
        699,
        "/usr/bin/python3.11",
        "python3 -c 'import socket'",
    )
    collected = monitor.process(
        monitor.parse_snapshot(_output(lines[:4], "", wall=1005.0, uptime=105.0)),
        monitor.Cursor(),
        final=True,
    )
    assert [(a.proto, a.dport, a.pid, a.ppid, a.exe, a.evidence) for a in collected.attempts] == [
        ("udp", 53, 700, 699, "/usr/bin/python3.11", "firewall"),
        ("icmp", None, 700, 699, "/usr/bin/python3.11", "firewall"),
        ("tcp", 80, None, None, None, "firewall"),
        ("udp", 54, None, None, None, "firewall"),
    ]


def test_connect_only_attempts_loopback_refused_and_udp_without_packets() -> None:
    events = (
        _event(1, 950.0, dst="127.0.0.1", ret=-115)  # loopback
        + _event(2, 950.1, ret=-101)  # ENETUNREACH: nothing sent
        + _event(3, 950.2, ret=0, protocol=17)  # a UDP connect that never sent
        + _event(4, 950.3, dst="::1", ret=0, protocol=17).replace(" 4 17 ", " 6 17 ")  # probe
        + _event(5, 950.4, dst="2001:db8::1", ret=-101, protocol=17).replace(" 4 17 ", " 6 17 ")
    )
    out = monitor.process(monitor.parse_snapshot(_output([], events)), monitor.Cursor(), final=True)
    assert [(a.verdict, a.proto, a.pid, a.evidence) for a in out.attempts] == [
        (Verdict.LOOPBACK, "tcp", 1, "connect"),
        (Verdict.BLOCKED, "tcp", 2, "connect"),
        (Verdict.UNSENT, "udp", 3, "connect"),
        (Verdict.BLOCKED, "udp", 5, "connect"),
    ]


def test_a_tcp_connect_the_firewall_never_logged_is_kept_as_unlogged() -> None:
    """Guest root flushed the guest's firewall: its SYNs are no longer logged, but the capture
    still sees the connects. Each is an attempt (once settled), never dropped."""
    events = (
        _event(1, 950.0, ret=-115)  # EINPROGRESS: a SYN went out, no firewall record
        + _event(2, 950.1, dst="203.0.113.7", ret=0)  # it even connected
        + _event(3, 950.2, ret=0, protocol=17)  # UDP that never sent: unsent, not unlogged
    )
    snapshot = monitor.parse_snapshot(_output([], events, wall=950.3, uptime=50.3))
    # Young: kept back for its firewall record (which may be drained later)...
    early = monitor.process(snapshot, monitor.Cursor())
    assert early.attempts == [] and len(early.cursor.pending_events) == 3
    # ...and an attempt once settled (or at destroy), with the verdict "unlogged".
    later = _output(
        [], "", wall=1000.0, uptime=100.0, events_pos=(7, 0), capture="@@capture ok 3 3 0 0 0"
    )
    settled = monitor.process(monitor.parse_snapshot(later), early.cursor)
    assert [(a.verdict, a.dst, a.pid, a.evidence) for a in settled.attempts] == [
        (Verdict.UNLOGGED, "198.51.100.9", 1, "connect"),
        (Verdict.UNLOGGED, "203.0.113.7", 2, "connect"),
        (Verdict.UNSENT, "198.51.100.9", 3, "connect"),
    ]
    final = monitor.process(snapshot, monitor.Cursor(), final=True)
    assert [a.verdict for a in final.attempts] == [
        Verdict.UNLOGGED,
        Verdict.UNLOGGED,
        Verdict.UNSENT,
    ]


def test_a_detached_or_reloaded_capture_is_a_tamper_row() -> None:
    first = monitor.process(
        monitor.parse_snapshot(_output([], _event(1, 950.0, ret=-111))), monitor.Cursor()
    )
    detached = monitor.parse_snapshot(
        _output([], "", wall=1010.0, uptime=110.0, capture="@@capture missing 0 0 0 0 0")
    )
    out = monitor.process(detached, first.cursor)
    rows = [a for a in out.attempts if a.verdict is Verdict.TAMPER]
    assert [(r.time, r.evidence) for r in rows] == [
        (
            "1970-01-01T00:16:50.000Z",
            "the connection capture was detached in the guest (attached again now)",
        )
    ]
    # The same collection again (a re-read) gives the same row id: stored once.
    assert monitor.process(detached, first.cursor).attempts[0].id == rows[0].id


# A firewall change as sbx-capture writes it (a real line, from the guest's iptables-nft).
_NFT_FLUSH = (
    "w 5 {mono} 812 812 790 0 nft 0 /usr/sbin/xtables-nft-multi iptables\\x00-F\\x00OUTPUT\\x00"
)
_BOOT = "b00710ad-0000-0000-0000-000000000000"


def _change(t: float, seq: int = 5, pid: int = 812) -> str:
    """A firewall change at monotonic time t (_output's clocks: wall = 900 + t)."""
    return _NFT_FLUSH.format(mono=round(t * 1e9)).replace(" 812 812 ", f" {pid} {pid} ") + "\n"


def _with_changes(text: str, seq: int, dropped: int = 0) -> str:
    """_output's text with no connects or packets counted, and the capture's counts of firewall
    changes."""
    line = next(x for x in text.splitlines() if x.startswith("@@capture ok"))
    return text.replace(line, f"@@capture ok 0 0 0 0 0 {seq} {dropped}")


def test_parse_fwchange_line_names_the_process_and_the_kind_of_change() -> None:
    change = monitor.parse_fwchange_line(_NFT_FLUSH.format(mono=50_000_000_000), 900.0)
    assert change is not None
    assert (change.seq, change.pid, change.tid, change.ppid, change.uid) == (5, 812, 812, 790, 0)
    assert (change.time, change.what, change.netns) == (950.0, "nft", 0)
    assert (change.exe, change.cmdline) == ("/usr/sbin/xtables-nft-multi", "iptables -F OUTPUT")
    assert change.describe() == (
        "the guest's firewall was changed (nftables commit) by /usr/sbin/xtables-nft-multi "
        "(pid 812, parent 790, uid 0): iptables -F OUTPUT"
    )
    legacy = monitor.parse_fwchange_line(
        "w 0 7 9 9 1 0 ip6t 4026532311 /usr/sbin/xtables-legacy-multi ip6tables-legacy\\x00-F\\x00",
        0.0,
    )
    assert legacy is not None
    assert "legacy ip6tables table replaced" in legacy.describe()
    assert "another network namespace of the guest (inode 4026532311)" in legacy.describe()
    # A process with no executable (a kernel thread) or argv.
    bare = monitor.parse_fwchange_line("w 0 7 9 9 1 0 ipt 0 - -", 0.0)
    assert bare is not None and (bare.exe, bare.cmdline) == (None, None)
    assert "by ? (pid 9, parent 1, uid 0)" in bare.describe()


@pytest.mark.parametrize(
    "line",
    [
        "w 5 1 812 812 790 0 nft 0 /usr/sbin/x",  # a field short
        "w 5 1 812 812 790 0 nft 0 /usr/sbin/x a b",  # one too many
        "w 5 1 812 812 790 0 drop 0 /usr/sbin/x a",  # no such kind of change
        "w 5 1 4294967296 812 790 0 nft 0 /usr/sbin/x a",  # pid past 32 bits
        "w 5 1 812 812 790 -1 nft 0 /usr/sbin/x a",  # a negative uid
        "w 5 1e9 812 812 790 0 nft 0 /usr/sbin/x a",
        "w ² 1 812 812 790 0 nft 0 /usr/sbin/x a",
        "w 5 " + "9" * 20 + " 812 812 790 0 nft 0 /usr/sbin/x a",
        "w 5 1 812 812 790 0 nft 0 usr/sbin/x a",  # not a path
        "w 5 1 812 812 790 0 nft 0 /" + "a" * 2000 + " a",  # longer than sbx-capture writes
        "w 5 1 812 812 790 0 nft 0 /usr/sbin/x " + "\\x41" * 200,
        "c 5 1 812 812 790 0 nft 0 /usr/sbin/x a",
    ],
)
def test_a_malformed_fwchange_line_is_not_one(line: str) -> None:
    assert monitor.parse_fwchange_line(line, 0.0) is None


def test_hostile_fwchange_lines_are_dropped_with_a_warning_and_guest_text_stays_data() -> None:
    """Guest root writes lines into its events file: the malformed ones are dropped and counted
    in a warning; a well-formed one with control characters in its names is kept as data (each
    view escapes it) and bounded by what sbx-capture can write."""
    hostile = (
        "w 6 60000000000 666 666 1 0 nft 0 /tmp/\\x1b[2J\\x1b]0;pwned\\x07[bold]x "
        "x\\x00\\x1b[31m\\x00\n"
    )
    garbage = "w 1 1 1 1 1 1 nft 0\nw 1 1 1 1 1 1 rm 0 /x y\nzzz\n"
    text = _with_changes(_output([], garbage + hostile + _change(70.0)), 7)
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor(), final=True)
    rows = [a for a in out.attempts if a.verdict is Verdict.TAMPER]
    assert [r.pid for r in rows] == [666, 812]
    assert rows[0].exe == "/tmp/\x1b[2J\x1b]0;pwned\x07[bold]x"
    assert rows[0].cmdline == "x '\x1b[31m'"
    assert any("3 line(s) of the guest's events file are no record" in w for w in out.warnings)
    assert all(len(r.evidence) <= 1000 for r in rows)


def test_every_firewall_change_after_up_is_a_tamper_row_naming_its_process() -> None:
    """`up`'s push (before its mark) is ours; a flush and its undo after it are two rows, though
    the rules match again by the collection."""
    mark = monitor.Mark(_BOOT, 40 * 10**9)
    cursor = monitor.Cursor().marked(mark)
    push = _change(30.0, pid=300) + _change(31.0, pid=301)
    evil = _change(50.0, pid=812) + _change(50.2, pid=813)
    text = _with_changes(_output([], push + evil), 4)
    out = monitor.process(monitor.parse_snapshot(text), cursor)
    rows = [a for a in out.attempts if a.verdict is Verdict.TAMPER]
    assert [(r.pid, r.ppid, r.uid, r.exe, r.cmdline) for r in rows] == [
        (812, 790, 0, "/usr/sbin/xtables-nft-multi", "iptables -F OUTPUT"),
        (813, 790, 0, "/usr/sbin/xtables-nft-multi", "iptables -F OUTPUT"),
    ]
    assert [r.time for r in rows] == ["1970-01-01T00:15:50.000Z", "1970-01-01T00:15:50.200Z"]
    assert rows[0].evidence.startswith("the guest's firewall was changed (nftables commit) by ")
    assert len({r.id for r in rows}) == 2 and out.warnings == []
    # Exactly once: the next collection reads on from where this one ended.
    again = _with_changes(_output([], "", wall=1010.0, events_pos=(7, 10**6)), 4)
    assert monitor.process(monitor.parse_snapshot(again), out.cursor).attempts == []
    assert out.cursor.policy_mono_ns == mark.mono_ns


def test_the_mark_holds_only_for_its_own_boot() -> None:
    """After a reboot every change is the guest's: the mark's clock is another boot's."""
    cursor = monitor.Cursor(boot_id="0ther000-0000").marked(monitor.Mark("0ther000-0000", 10**15))
    text = _with_changes(_output([], _change(30.0)), 1)
    out = monitor.process(monitor.parse_snapshot(text), cursor)
    assert [a.pid for a in out.attempts if a.verdict is Verdict.TAMPER] == [812]
    # A sandbox from before the mark existed: its cursor has none, and every change counts.
    loaded = monitor.Cursor.from_json(json.dumps({"boot_id": _BOOT}))
    assert (loaded.policy_boot_id, loaded.policy_mono_ns) == ("", 0)
    out = monitor.process(monitor.parse_snapshot(text), loaded)
    assert [a.pid for a in out.attempts if a.verdict is Verdict.TAMPER] == [812]


def test_dropped_firewall_changes_and_a_reloaded_count_are_reported() -> None:
    cursor = replace(monitor.Cursor(boot_id=_BOOT), fwchanges_seq=9, fwchanges_dropped=1)
    dropped = _with_changes(_output([], ""), 12, dropped=3)
    out = monitor.process(monitor.parse_snapshot(dropped), cursor)
    assert any("2 firewall changes were dropped" in w for w in out.warnings), out.warnings
    assert (out.cursor.fwchanges_seq, out.cursor.fwchanges_dropped) == (12, 3)
    reloaded = _with_changes(_output([], ""), 1)
    out = monitor.process(monitor.parse_snapshot(reloaded), cursor)
    assert [a.evidence for a in out.attempts] == [
        "the connection capture was loaded again in the guest"
    ]


def test_a_link_of_the_capture_unpinned_alone_is_a_tamper_row() -> None:
    """Guest root unpins one link (its program detaches, the rest stays): the drain names it,
    the collection loads the capture again, and the next counts start at 0 without another
    row. A forged marker in the events file or a name that is no pin's is not taken."""
    cursor = replace(monitor.Cursor(boot_id=_BOOT), capture_seq=40, fwchanges_seq=3)
    forged = "@@capturepartial link_sbx_connect_tcp4\n"
    text = _with_changes(_output([], forged), 5).replace(
        "@@captureclock",
        "@@capturepartial link_sbx_fwchange_nft\n@@capturepartial ../x\n@@captureclock",
    )
    snapshot = monitor.parse_snapshot(text)
    assert snapshot.capture_partial == ("link_sbx_fwchange_nft",)
    out = monitor.process(snapshot, cursor)
    assert [a.evidence for a in out.attempts] == [
        "part of the connection capture was detached in the guest (link_sbx_fwchange_nft; "
        "attached again now)"
    ]
    assert any("part of the capture was detached" in w for w in out.warnings)
    assert (out.cursor.capture_seq, out.cursor.fwchanges_seq) == (0, 0)
    after = _with_changes(_output([], "", wall=1010.0, events_pos=(7, 10**6)), 1)
    assert monitor.process(monitor.parse_snapshot(after), out.cursor).attempts == []
    assert "@@capturepartial" in monitor.events_script(0, 0)


def test_the_capture_checked_after_the_push_reports_its_failure() -> None:
    ok = f"@@boot {_BOOT}\n@@captureclock 115.570099639 1796477816.9\n"
    assert monitor.started(0, ok) == monitor.parse_mark(ok)
    with pytest.raises(GuestError, match=r"could not start connection capture: .*not going"):
        monitor.started(1, "the capture's copy to the host is not going\n")
    with pytest.raises(GuestError, match="could not start connection capture"):
        monitor.started(0, "garbage")


def test_parse_mark_takes_the_boot_and_the_capture_clock() -> None:
    mark = monitor.parse_mark(f"@@boot {_BOOT}\n@@captureclock 115.570099639 1796477816.9\n")
    assert mark == monitor.Mark(_BOOT, 115_570_099_639)
    for bad in (
        f"@@boot {_BOOT}\n",
        "@@captureclock 115.570099639 1.0\n",
        f"@@boot {_BOOT}\n@@captureclock 1e9 1.0\n",
        f"@@boot {_BOOT}\n@@captureclock 115.5 1.0\n",
    ):
        with pytest.raises(GuestError):
            monitor.parse_mark(bad)
    cursor = monitor.Cursor().marked(mark)
    assert monitor.Cursor.from_json(cursor.to_json()) == cursor


def test_a_reboot_restarts_positions_and_ids_stay_unique() -> None:
    first = monitor.process(
        monitor.parse_snapshot(_output([_record(10, 50.0)])), monitor.Cursor(), final=True
    )
    text = _output(
        [_record(10, 20.0, sport=5)], wall=2000, uptime=30, boot="5ec0d000-0000-0000-0000-0000"
    )
    second = monitor.process(monitor.parse_snapshot(text), first.cursor, final=True)
    assert len(second.attempts) == 1
    assert second.attempts[0].id != first.attempts[0].id
    assert any("rebooted" in w for w in second.warnings)


def _read_events(directory: Path, cursor: monitor.Cursor) -> tuple[list[int], monitor.Cursor]:
    """Runs events_script on a real file, with a stand-in for sbx-capture that drains nothing;
    the seqs of the events it printed, and the cursor after it."""
    script = monitor.events_script(cursor.events_inode, cursor.events_offset)
    stub = 'sbx_capture() { echo "@@capture ok 0 0 0 0 0"; }\n'
    script = stub + script.replace(monitor.CAPTURE_TOOL, "sbx_capture")
    script = script.replace(monitor.EVENTS_DIR, str(directory))
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    text = "@@boot b\n" + result.stdout + "\n@@clock 1000.0 100.0\n@@end\n"
    snapshot = monitor.parse_snapshot(text)
    assert snapshot.capture_loaded
    return [e.seq for e in snapshot.events], monitor.process(snapshot, cursor).cursor


def test_the_events_file_is_read_from_where_the_last_collection_ended(tmp_path: Path) -> None:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    log = tmp_path / f"{boot}.log"
    log.write_text("".join(_event(s, 950.0 + s / 1000, ret=-101) for s in range(1, 11)))
    first, cursor = _read_events(tmp_path, monitor.Cursor(boot_id="b"))
    assert first == list(range(1, 11))
    assert (cursor.events_inode, cursor.events_offset) == (log.stat().st_ino, log.stat().st_size)
    with log.open("a") as f:
        f.write("".join(_event(s, 950.0 + s / 1000, ret=-101) for s in range(11, 14)))
    second, cursor = _read_events(tmp_path, cursor)
    assert second == [11, 12, 13]
    third, cursor = _read_events(tmp_path, cursor)
    assert third == []
    # Another file in its place (guest root removed it): read whole.
    log.unlink()
    log.write_text(_event(20, 951.0, ret=-101))
    fourth, _ = _read_events(tmp_path, cursor)
    assert fourth == [20]


def test_a_huge_events_file_is_read_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest root can make the events file any size, with lines of any length: one collection
    reads at most EVENTS_CHUNK_BYTES of it, ending on a whole line, and the next goes on; a line
    longer than a chunk is skipped, malformed lines are no records and raise nothing."""
    monkeypatch.setattr(monitor, "EVENTS_CHUNK_BYTES", 1000)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    log = tmp_path / f"{boot}.log"
    lines = [_event(s, 950.0 + s / 1000, ret=-101) for s in range(1, 13)]
    assert all(len(line) < 250 for line in lines)
    garbage = "c \x1b[2J \u00b2 x\nf 99999999999999999999999 y\n" + "c " + "9" * 3000 + "\n"
    log.write_text("".join(lines[:6]) + garbage + "".join(lines[6:]))
    seen: list[int] = []
    cursor = monitor.Cursor(boot_id="b")
    offsets = []
    for _ in range(20):
        seqs, cursor = _read_events(tmp_path, cursor)
        seen += seqs
        offsets.append(cursor.events_offset)
        if cursor.events_offset == log.stat().st_size:
            break
    assert seen == list(range(1, 13))
    steps = [b - a for a, b in zip([0, *offsets], offsets, strict=False)]
    assert all(0 < step <= 1000 for step in steps), steps
    assert len(steps) >= 5


def test_a_collection_that_leaves_part_of_the_events_file_says_so() -> None:
    text = _output([], _event(1, 950.0, ret=-101), events_pos=(13, 90))
    text = text.replace("@@eventspos 13 90", "@@eventspos 13 90 5000")
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor(boot_id="b"))
    assert out.cursor.events_offset == 90
    assert any("4910 bytes more" in w for w in out.warnings), out.warnings
    assert not any("4910" in loss for loss in out.cursor.losses)


def test_a_reboot_starts_on_the_new_boots_events_file() -> None:
    cursor = monitor.Cursor(boot_id="earlier", events_inode=12, events_offset=3000, capture_seq=9)
    text = _output([], _event(1, 950.0, ret=-101), events_pos=(13, 90))
    out = monitor.process(monitor.parse_snapshot(text), cursor)
    assert [a.pid for a in out.attempts] == [1]
    assert (out.cursor.events_inode, out.cursor.events_offset) == (13, 90)
    assert not any("loaded again" in w for w in out.warnings)  # a new boot counts from 0
    again = monitor.Cursor.from_json(out.cursor.to_json())
    assert again == out.cursor


def test_a_cursor_of_the_auditd_collector_still_loads() -> None:
    old = {
        "boot_id": "b",
        "kmsg_seq": 41,
        "audit_seen": [1, 2],
        "audit_inode": 5,
        "audit_offset": 9,
        "pending_audit": [],
        "losses": ["x"],
    }
    cursor = monitor.Cursor.from_json(json.dumps(old))
    assert (cursor.events_offset, cursor.losses) == (0, ("x",))


# ---- the host's copy (sandbox-capture-stream) ------------------------------------------------
# stream-1.log is the host's file of a real guest's capture port; stream-1.txt a collection over
# SSH of the same guest, made before the copy was taken (README.md says how).


def _stream() -> bytes:
    return (DATA / "stream-1.log").read_bytes()


def _rows(attempts: list[Attempt]) -> list[tuple[Any, ...]]:
    return [(a.id, a.verdict, a.proto, a.dst, a.dport, a.pid, a.exe, a.cmdline) for a in attempts]


def test_the_hosts_copy_gives_what_a_collection_over_ssh_gives() -> None:
    over_ssh = monitor.process(_snapshot("stream-1.txt"), monitor.Cursor(), final=True)
    copied = monitor.collect_stream(monitor.parse_stream(_stream()), monitor.Cursor(), final=True)
    assert copied is not None
    assert copied.warnings == []
    # The copy was taken later: it holds every attempt of the collection, and those after it.
    assert _rows(copied.attempts)[: len(over_ssh.attempts)] == _rows(over_ssh.attempts)
    assert {(a.dst, a.dport) for a in copied.attempts} >= {
        ("203.0.113.7", 80),
        ("198.51.100.9", 81),
        ("198.51.100.9", 53),
        ("2001:db8:1::9", 80),
    }
    assert copied.cursor.boot_id == over_ssh.cursor.boot_id
    assert copied.cursor.events_inode == over_ssh.cursor.events_inode


def test_the_hosts_copy_goes_on_from_the_cursor_of_the_last_collection() -> None:
    over_ssh = monitor.process(_snapshot("stream-1.txt"), monitor.Cursor())
    stream = monitor.parse_stream(_stream())
    rest = monitor.collect_stream(stream, over_ssh.cursor, final=True)
    whole = monitor.collect_stream(stream, monitor.Cursor(), final=True)
    assert rest is not None and whole is not None
    seen = {a.id for a in over_ssh.attempts}
    # Each record once: what the collection took is not taken again.
    assert not seen & {a.id for a in rest.attempts}
    assert {a.id for a in whole.attempts} <= seen | {a.id for a in rest.attempts}
    end = stream.start + len(stream.data)
    assert rest.cursor.events_offset == end and over_ssh.cursor.events_offset <= end


def test_a_copy_whose_beginning_virtlogd_rotated_away_serves_only_later_cursors() -> None:
    raw = _stream()
    over_ssh = monitor.process(_snapshot("stream-1.txt"), monitor.Cursor())
    stream = monitor.parse_stream(raw)
    # Cut where the copy's data reaches past the collection's end: the file's beginning is gone.
    cut = raw.index(b"@@file", raw.index(b"@@data") + 1)
    tail = monitor.parse_stream(raw[cut - 7 :])
    assert tail.inode == stream.inode and tail.start > 0
    assert monitor.collect_stream(tail, monitor.Cursor(), final=True) is None  # SSH must collect
    if tail.start <= over_ssh.cursor.events_offset:
        assert monitor.collect_stream(tail, over_ssh.cursor, final=True) is not None


def test_a_copy_cut_short_or_of_another_boot_is_not_taken_for_whole() -> None:
    raw = _stream()
    stream = monitor.parse_stream(raw)
    # The VM stopped in the middle of a chunk: the chunk is not read, what came before is.
    last = raw.rindex(b"@@data ")
    cut = monitor.parse_stream(raw[: last + 40])
    assert len(cut.data) < len(stream.data) or b"@@data" not in raw[last + 7 :]
    assert monitor.parse_stream(b"") == monitor.Stream("", None, 0, b"", (), None)
    assert monitor.collect_stream(monitor.parse_stream(b""), monitor.Cursor()) is None
    other = monitor.Cursor(boot_id="another-boot", events_inode=stream.inode or 0)
    assert monitor.collect_stream(stream, other, final=True) is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"@@data 0 999999999\n" + b"x" * 100,
        b"@@data -5 3\nabc\n",
        b"@@file x y\n@@round z\n",
        b"@@round 1\n@@captureclock\n",
        b"\xff\xfe@@data 0 3\nc 1\n" * 3,
        b"@@file 1 0\n@@data 0 12\nc \x1b[2J \xb2 x\n@@captureclock 1.0 2.0\n@@round 9 b\n",
    ],
)
def test_a_hostile_copy_is_parsed_without_error(garbage: bytes) -> None:
    stream = monitor.parse_stream(garbage + _stream()[:4000] + garbage)
    with_cursor = monitor.stream_snapshot_text(stream, monitor.Cursor())
    if with_cursor is not None:
        monitor.process(monitor.parse_snapshot(with_cursor), monitor.Cursor(), final=True)


def test_the_last_round_is_read_from_the_end_of_the_copy(tmp_path: Path) -> None:
    copy = tmp_path / "capture.log"
    assert monitor.stream_round(copy) is None
    copy.write_bytes(_stream())
    assert monitor.stream_round(copy) == (monitor.parse_stream(_stream()).round, 0)
    copy.write_bytes(_stream() + b"@@round 900 b 4096\n")
    assert monitor.stream_round(copy) == (900, 4096)
    assert monitor.parse_stream(copy.read_bytes()).left == 4096
    # A copy behind the guest's file does not hold all of it.
    behind = monitor.parse_stream(copy.read_bytes())
    assert monitor.stream_snapshot_text(behind, monitor.Cursor()) is None
    copy.write_bytes(_stream())
    # virtlogd's rotations are read oldest first, then the file itself.
    (tmp_path / "capture.log.1").write_bytes(b"one")
    (tmp_path / "capture.log.0").write_bytes(b"zero")
    assert monitor.read_stream(copy)[:7] == b"onezero"
    assert monitor.read_stream(copy, limit=10) == _stream()[-10:]


def test_incomplete_output_is_an_error() -> None:
    with pytest.raises(GuestError):
        monitor.parse_snapshot(_output([]).replace("@@end", ""))


def test_attach_dns_names_takes_the_latest_answer_before_the_attempt() -> None:
    attempt = Attempt(
        id="k1",
        time="2026-01-01T00:00:10.000Z",
        verdict=Verdict.ALLOWED,
        proto="tcp",
        family=4,
        dst="203.0.113.7",
        dport=443,
    )

    def query(t: str, name: str, result: str) -> DnsQuery:
        return DnsQuery(id=t, time=t, client="192.168.122.5", name=name, qtype="A", result=result)

    queries = [
        query("2026-01-01T00:00:01.000Z", "old.test", "203.0.113.7"),
        query("2026-01-01T00:00:09.000Z", "new.test", "198.51.100.1, 203.0.113.7"),
        query("2026-01-01T00:00:11.000Z", "later.test", "203.0.113.7"),
        query("2026-01-01T00:00:09.500Z", "refused.test", "REFUSED"),
    ]
    [named] = monitor.attach_dns_names([attempt], queries)
    assert named.dns_name == "new.test"
    [unnamed] = monitor.attach_dns_names([replace(attempt, dst="198.51.100.9")], queries)
    assert unnamed.dns_name is None


def test_parsing_speed() -> None:
    """Records per second the pure side handles (printed; the bound only catches a blow-up)."""
    n = 5000
    records = [_record(i, 50.0 + i * 0.001, sport=10000 + i) for i in range(n)]
    events = "".join(_event(i + 1, 950.0 + i * 0.001) for i in range(n))
    text = _output(records, events, wall=960.0, uptime=60.0)
    started = time.perf_counter()
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor())
    seconds = time.perf_counter() - started
    print(f"{n} attempts (firewall + connect) joined in {seconds:.2f} s: {n / seconds:.0f}/s")
    assert len(out.attempts) == n and all(a.evidence == "connect+firewall" for a in out.attempts)
    assert seconds < 30


# ---- a real VM in the lab --------------------------------------------------------------------

# Runs inside the lab namespace (SSH to the guest must start there): start capture or collect
# once, print one JSON object.
_DRIVER = """
import json, os, sys, time
from pathlib import Path
from orchestrator import lifecycle, paths
from orchestrator.capture import monitor
from orchestrator.config import load_settings
action, name, cursor_file = sys.argv[1:4]
dirs = paths.Dirs.from_env()
config = os.environ.get("SANDBOX_CONFIG")
ctx = lifecycle.Context(load_settings(Path(config) if config else None, dirs.config_file), dirs)
with lifecycle.open_guest(ctx, name) as guest:
    started = time.monotonic()
    if action == "start":
        monitor.parse_mark(guest.check(monitor.START_COMMAND, timeout=monitor.START_TIMEOUT))
        print(json.dumps({"seconds": time.monotonic() - started}))
    else:
        path = Path(cursor_file)
        cursor = monitor.Cursor.from_json(path.read_text()) if path.exists() else monitor.Cursor()
        raw = guest.check(["sh", "-c", monitor.collect_script(cursor)])
        seconds = time.monotonic() - started
        out = monitor.process(monitor.parse_snapshot(raw), cursor)
        path.write_text(out.cursor.to_json())
        print(json.dumps({"seconds": seconds, "raw": raw, "warnings": out.warnings,
                          "attempts": [a.to_json() for a in out.attempts]}))
"""

_PHP = r"""
$ok = [];
for ($i = 0; $i < 3; $i++) { $ok[] = @stream_socket_client("tcp://203.0.113.7:80", $e, $m, 5); }
for ($i = 0; $i < 2; $i++) { @stream_socket_client("tcp://198.51.100.9:80", $e, $m, 5); }
$u = @stream_socket_client("udp://198.51.100.9:53", $e, $m, 5);
if ($u) { @fwrite($u, "x"); }
@stream_socket_client("tcp://[2001:db8:1::9]:80", $e, $m, 5);
echo getmypid(), "\n";
"""


def _drive(cli: Cli, action: str, name: str, cursor: Path) -> dict[str, Any]:
    argv = in_lab(cli.lab, [sys.executable, "-c", _DRIVER, action, name, str(cursor)])
    result = subprocess.run(
        argv, env=cli.env(), capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )
    assert result.returncode == 0, result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def _collect_until(
    cli: Cli,
    name: str,
    cursor: Path,
    ready: Callable[[list[Attempt]], bool],
    what: str,
    timeout: float = 120,
) -> dict[str, Any]:
    """Collections until the attempts they brought satisfy `ready`: a record waits for its other
    half up to the capture's settle window, so a test waits for what it expects rather than
    sleeping for a guess at that window. Returns the collections merged (raw: each snapshot)."""
    merged: dict[str, Any] = {"seconds": 0.0, "raw": [], "warnings": [], "attempts": []}

    def attempt() -> bool | None:
        got = _drive(cli, "collect", name, cursor)
        merged["seconds"] += got["seconds"]
        merged["raw"].append(got["raw"])
        merged["warnings"] += got["warnings"]
        merged["attempts"] += got["attempts"]
        return True if ready([Attempt.from_json(a) for a in merged["attempts"]]) else None

    wait_for(attempt, Deadline(timeout, f"the collections of {name!r} to bring {what}"))
    return merged


def _bash_connect(cli: Cli, name: str, port: int) -> int:
    """A blocked TCP attempt by bash as user sandbox, through `exec`; bash's pid."""
    script = f"echo $$; exec 3<>/dev/tcp/198.51.100.9/{port} || true"
    bash = cli.ok(
        "exec", "--name", name, "--", "runuser", "-u", "sandbox", "--", "bash", "-c", script
    )
    return int(bash.stdout.split()[0])


# sendto() with no connect(): a UDP datagram and an ICMP echo (raw socket, as root); the
# firewall's REJECT makes each fail with EPERM.
_SENDTO = """
import contextlib, os, socket
print(os.getpid(), flush=True)
with contextlib.suppress(PermissionError):
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("198.51.100.9", 5353))
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
with contextlib.suppress(PermissionError):
    icmp.sendto(bytes([8, 0, 0xF7, 0xFF, 0, 0, 0, 0]), ("198.51.100.9", 0))
"""


@pytest.mark.vm
@pytest.mark.root
def test_capture_in_a_real_guest(cli: Cli, tmp_path: Path) -> None:
    name = "mon"
    cli.ok("up", "--name", name, "--allow", "203.0.113.7", "--allow", "[2001:db8:1::9]:443")
    cursor = tmp_path / "cursor.json"
    try:
        start = _drive(cli, "start", name, cursor)
        print(f"capture start took {start['seconds']:.2f} s")
        php = cli.ok("exec", "--name", name, "--", "php", "-r", _PHP)
        php_pid = int(php.stdout.split()[-1])
        bash_pid = _bash_connect(cli, name, 80)
        # One pid, two process images: bash connects, then execs php, which connects.
        exec_script = (
            "echo $$; exec 3<>/dev/tcp/198.51.100.9/83 || true; "
            "exec php -r '@fsockopen(\"198.51.100.9\", 84);'"
        )
        execd = cli.ok("exec", "--name", name, "--", "bash", "-c", exec_script)
        execd_pid = int(execd.stdout.split()[0])
        sender = cli.ok("exec", "--name", name, "--", "python3", "-c", _SENDTO)
        sender_pid = int(sender.stdout.split()[0])
        # Both of the sender's datagrams (UDP, ICMP) are awaited: each record without a connect
        # waits out the settle window on its own, so the two can land one collection apart.
        expected = {php_pid: 7, bash_pid: 1, execd_pid: 2, sender_pid: 2}
        first = _collect_until(
            cli,
            name,
            cursor,
            lambda got: all(sum(a.pid == pid for a in got) >= n for pid, n in expected.items()),
            "every process's attempts",
        )
        # Once they are in, another collection adds nothing (each record exactly once).
        second = _drive(cli, "collect", name, cursor)
        # Guest root detaches the capture and an attempt follows: the collection after it (the
        # one `exec` makes) says so and attaches it again, so later attempts are attributed.
        detached = (
            "sbx-capture unload; runuser -u sandbox -- "
            "bash -c 'echo $$; exec 3<>/dev/tcp/198.51.100.9/82' || true"
        )
        removed = cli.ok("exec", "--name", name, "--", "sh", "-c", detached)
        unattributed_pid = int(removed.stdout.split()[0])
        later_pid = _bash_connect(cli, name, 81)
        logged = "\n".join(
            json.dumps(r)
            for r in cli.records_when(
                name, lambda rows: any(r["pid"] == later_pid for r in rows), "bash's attempt"
            )
        )
    finally:
        cli.run("destroy", "--name", name, timeout=300)
    assert "the capture was not attached" in removed.stderr
    healed = [Attempt.from_json(line) for line in logged.splitlines()]
    assert [(a.exe, a.dport, a.evidence) for a in healed if a.pid == later_pid] == [
        ("/usr/bin/bash", 81, "connect+firewall")
    ]
    # The attempt made while it was detached is not recorded (the warning said so).
    assert unattributed_pid not in {a.pid for a in healed}
    assert [a for a in healed if a.dport == 82] == []
    samples = os.environ.get("SANDBOX_MONITOR_SAMPLES")
    if samples:
        # The unit tests replay two snapshots: everything, then nothing new.
        assert len(first["raw"]) == 1, "recording needs the attempts in one collection: rerun"
        Path(samples, "collect-1.txt").write_text(first["raw"][0])
        Path(samples, "collect-2.txt").write_text(second["raw"])
    print(f"collections took {first['seconds']:.2f} s and {second['seconds']:.2f} s")
    assert first["warnings"] == [] and second["warnings"] == []
    assert second["attempts"] == []
    attempts = [Attempt.from_json(line) for line in first["attempts"]]
    assert len({a.id for a in attempts}) == len(attempts)

    mine = [a for a in attempts if a.pid == php_pid]
    assert {a.exe for a in mine} == {"/usr/bin/php8.2"}
    # argv as it was at the first connect (the first 128 bytes): one process, one command line.
    assert len({a.cmdline for a in mine}) == 1
    assert all(a.cmdline and a.cmdline.startswith("php -r ") for a in mine)
    assert sorted(
        (a.verdict.value, a.proto, a.family, a.dst, a.dport, a.uid) for a in mine
    ) == sorted(
        [("allowed", "tcp", 4, "203.0.113.7", 80, 0)] * 3
        + [("blocked", "tcp", 4, "198.51.100.9", 80, 0)] * 2
        + [
            ("blocked", "udp", 4, "198.51.100.9", 53, 0),
            ("blocked", "tcp", 6, "2001:db8:1::9", 80, 0),
        ]
    )
    assert all(a.evidence == "connect+firewall" for a in mine)
    by_execd = [
        (a.exe, a.dport, (a.cmdline or "").split(" ")[:2]) for a in attempts if a.pid == execd_pid
    ]
    assert sorted(by_execd) == [
        ("/usr/bin/bash", 83, ["bash", "-c"]),
        ("/usr/bin/php8.2", 84, ["php", "-r"]),
    ]
    # No connect() at all: the datagrams' own records say who sent them.
    sent = [
        (a.proto, a.dport, a.verdict, a.exe, a.evidence) for a in attempts if a.pid == sender_pid
    ]
    assert sorted(sent) == [
        ("icmp", None, Verdict.BLOCKED, "/usr/bin/python3.11", "firewall"),
        ("udp", 5353, Verdict.BLOCKED, "/usr/bin/python3.11", "firewall"),
    ]
    by_bash = [a for a in attempts if a.pid == bash_pid]
    assert [(a.exe, a.verdict, a.proto, a.dst, a.dport, a.uid) for a in by_bash] == [
        ("/usr/bin/bash", Verdict.BLOCKED, "tcp", "198.51.100.9", 80, 1000)
    ]


def test_second_real_collection_adds_nothing() -> None:
    first = monitor.process(_snapshot("collect-1.txt"), monitor.Cursor())
    assert len(first.attempts) == 8 and first.cursor.pending == ()
    second = monitor.process(_snapshot("collect-2.txt"), first.cursor)
    assert second.attempts == [] and second.warnings == []
    assert second.cursor.events_offset == _snapshot("collect-2.txt").events_size


@pytest.mark.vm
@pytest.mark.root
def test_a_connect_that_waits_is_attributed_before_it_returns(cli: Cli, tmp_path: Path) -> None:
    """With `--blocked drop` a blocking connect() waits for minutes (its SYN is resent, never
    answered). Its event is taken when the SYN goes out, so a collection meanwhile pairs it with
    the SYN's record; the resends and the end of the wait (here: killed) are no attempts."""
    name = "monwait"
    cli.ok("up", "--name", name, "--allow", "203.0.113.7", "--blocked", "drop")
    cursor = tmp_path / "cursor.json"
    try:
        _drive(cli, "collect", name, cursor)
        waiting = (
            "runuser -u sandbox -- bash -c 'exec 3<>/dev/tcp/198.51.100.9/80' "
            ">/dev/null 2>&1 & echo $!; sleep 2"
        )
        started = cli.ok("ssh", "--name", name, "--", waiting)
        runuser_pid = int(started.stdout.split()[0])
        during = _collect_until(
            cli,
            name,
            cursor,
            lambda got: any(a.dst == "198.51.100.9" for a in got),
            "the waiting connect",
        )
        cli.ok("ssh", "--name", name, "--", f"pkill -P {runuser_pid}; sleep 1")
        after = _drive(cli, "collect", name, cursor)
    finally:
        cli.run("destroy", "--name", name, timeout=300)
    assert during["warnings"] == [] and after["warnings"] == []
    attempts = [Attempt.from_json(line) for line in during["attempts"]]
    waited = [a for a in attempts if a.dst == "198.51.100.9"]
    assert [(a.verdict, a.exe, a.uid, a.ppid, a.evidence) for a in waited] == [
        (Verdict.BLOCKED, "/usr/bin/bash", 1000, runuser_pid, "connect+firewall")
    ]
    again = [Attempt.from_json(line) for line in after["attempts"]]
    assert [a for a in again if a.dst == "198.51.100.9"] == []


_BURST = 10_000
_PHP_BURST = f"""
for ($i = 0; $i < {_BURST}; $i++) {{ @stream_socket_client("tcp://198.51.100.9:80", $e, $m, 5); }}
echo getmypid(), "\\n";
"""


@pytest.mark.vm
@pytest.mark.root
def test_a_burst_of_attempts_loses_nothing(cli: Cli, tmp_path: Path) -> None:
    name = "monburst"
    cli.ok("up", "--name", name, "--allow", "203.0.113.7")
    cursor = tmp_path / "cursor.json"
    try:
        _drive(cli, "start", name, cursor)
        started = time.monotonic()
        php = cli.ok("exec", "--name", name, "--", "php", "-r", _PHP_BURST)
        print(f"{_BURST} connects took {time.monotonic() - started:.1f} s in the guest")
        php_pid = int(php.stdout.split()[-1])
        first = _collect_until(
            cli,
            name,
            cursor,
            lambda got: sum(a.pid == php_pid for a in got) >= _BURST,
            f"{_BURST} attempts",
        )
        # Nothing more comes: each attempt exactly once.
        more = _drive(cli, "collect", name, cursor)["attempts"]
        assert [a for a in map(Attempt.from_json, more) if a.pid == php_pid] == []
    finally:
        cli.run("destroy", "--name", name, timeout=300)
    (tmp_path / "burst.txt").write_text("\n".join(first["raw"]))
    print(f"collecting {_BURST} attempts took {first['seconds']:.2f} s, {len(first['raw'])} bytes")
    assert first["warnings"] == []
    attempts = [Attempt.from_json(line) for line in first["attempts"]]
    mine = [a for a in attempts if a.pid == php_pid]
    assert len(mine) == _BURST
    assert {(a.verdict, a.dst, a.dport, a.evidence) for a in mine} == {
        (Verdict.BLOCKED, "198.51.100.9", 80, "connect+firewall")
    }


def test_garbage_from_the_guest_is_a_guest_error_or_ignored() -> None:
    """Guest root replaces `date` or writes into the events file: a collection fails with a
    GuestError (which callers report as a warning) or skips the lines; nothing else is raised."""
    from orchestrator.errors import GuestError

    bad_clock = _output([], "").replace("@@clock 1000.000000000", "@@clock 1e400")
    with pytest.raises(GuestError, match="clock reading"):
        monitor.parse_snapshot(bad_clock)
    garbage = (
        "c ² ² ² ² ² ² ² ² ² ² ² ²\n"
        "f 99999999999999999999999999 x y z\n"
        "c 1 1e400 1 1 1 1 -111 4 6 1.2.3.4 80 /x y\n"
        "c 1 1 1 1 1 1 -111 9 6 ::::::: 99999 /x y\n"
        "f 1 1 0 4 6 a b c d e f SBX-BLOCK\n"
        "\x1b[2J" + "9" * 10000 + "\n"
    )
    out = monitor.process(
        monitor.parse_snapshot(_output([], garbage + _event(7, 950.0, ret=-101))),
        monitor.Cursor(),
        final=True,
    )
    # The one well-formed connect survives the garbage around it.
    assert [(a.pid, a.verdict) for a in out.attempts] == [(7, Verdict.BLOCKED)]
    boot_only = _output([], "").replace("@@boot b00710ad-0000-0000-0000-000000000000", "@@boot")
    assert monitor.parse_snapshot(boot_only).boot_id == ""


def test_markers_written_into_the_events_file_do_not_count() -> None:
    """Guest root appends marker lines to its events file: the cursor and clock stay the ones
    the collection script printed around it."""
    forged = "@@eventspos 7 999999999\n@@clock 5.0 5.0\n@@end\n" + _event(3, 950.0, ret=-101)
    snap = monitor.parse_snapshot(_output([], forged, events_pos=(7, 120)))
    assert (snap.events_inode, snap.events_size) == (7, 120)
    assert snap.wall == 1000.0 and [e.pid for e in snap.events] == [3]

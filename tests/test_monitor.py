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
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import firewall, monitor
from orchestrator.errors import GuestError
from orchestrator.lab import in_lab
from orchestrator.records import Attempt, DnsQuery, Verdict

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
    assert all(a.evidence == "audit+firewall" and a.uid == 0 for a in php)
    assert all(a.cmdline and a.cmdline.startswith("php ") for a in php)
    bash = [a for a in attempts if a.exe == "/usr/bin/bash"]
    assert [(a.verdict, a.dst, a.dport, a.uid) for a in bash] == [
        (Verdict.BLOCKED, "198.51.100.9", 80, 1000)
    ]


def test_parse_audit_decodes_sockaddr_proctitle_and_drops_unix() -> None:
    unix = (
        "type=SYSCALL msg=audit(1700000000.100:7): arch=c000003e syscall=42 success=yes exit=0 "
        'ppid=1 pid=2 uid=0 comm="systemctl" exe="/usr/bin/systemctl" key="sbx-connect"\n'
        "type=SOCKADDR msg=audit(1700000000.100:7): saddr=01002F72756E2F73797374656D64\n"
    )
    inet6 = (
        "type=SYSCALL msg=audit(1700000001.250:8): arch=c000003e syscall=42 success=no "
        'exit=-115 ppid=10 pid=11 uid=1000 comm="php" exe="/usr/bin/php8.2" '
        'key="sbx-connect"\x1dARCH=x86_64 SYSCALL=connect UID="sandbox"\n'
        "type=SOCKADDR msg=audit(1700000001.250:8): "
        "saddr=0A000050000000002001ABCD000000000000000000000009" + "00000000\n"
        "type=PROCTITLE msg=audit(1700000001.250:8): proctitle=706870002D72006563686F2031\n"
    )
    mapped = (
        "type=SYSCALL msg=audit(1700000002.000:9): arch=c000003e syscall=42 success=no "
        "exit=-111 ppid=1 pid=3 uid=0 exe=2F746D702F6D7920657865 key=sbx-connect\n"
        "type=SOCKADDR msg=audit(1700000002.000:9): "
        "saddr=0A0001BB0000000000000000000000000000FFFFCB007107" + "00000000\n"
        'type=PROCTITLE msg=audit(1700000002.000:9): proctitle="curl"\n'
    )
    sendto = mapped.replace("syscall=42", "syscall=44").replace(":9)", ":10)")
    events = monitor.parse_audit(unix + inet6 + mapped + sendto)
    assert [(e.serial, e.family, e.dst, e.dport, e.exit) for e in events] == [
        (8, 6, "2001:abcd::9", 80, -115),
        (9, 4, "203.0.113.7", 443, -111),
    ]
    assert events[0].cmdline == "php -r 'echo 1'"
    assert (events[0].pid, events[0].ppid, events[0].uid) == (11, 10, 1000)
    assert events[1].exe == "/tmp/my exe" and events[1].cmdline == "curl"


def _record(
    seq: int, t: float, dst: str = "198.51.100.9", sport: int = 40000, ident: int | None = None
) -> str:
    usec = int(t * 1e6)
    ident = seq * 7919 % 65536 if ident is None else ident
    return (
        f"{seq} {usec} SBX-BLOCK IN= OUT=enp1s0 SRC=192.168.122.5 DST={dst} LEN=60 TOS=0x00 "
        f"PREC=0x00 TTL=64 ID={ident} DF PROTO=TCP SPT={sport} DPT=80 WINDOW=64240 RES=0x00 SYN "
        "URGP=0 UID=0 GID=0"
    )


def _audit(serial: int, t: float, dst_hex: str = "C6336409", exit_code: int = -111) -> str:
    head = f"msg=audit({t:.3f}:{serial}):"
    return (
        f"type=SYSCALL {head} arch=c000003e syscall=42 success=no exit={exit_code} ppid=1 "
        f'pid={serial} uid=0 comm="bash" exe="/usr/bin/bash" key="sbx-connect"\n'
        f"type=SOCKADDR {head} saddr=02000050{dst_hex}0000000000000000\n"
    )


def _output(
    kmsg: list[str],
    audit: str = "",
    *,
    wall: float = 1000.0,
    uptime: float = 100.0,
    lost: int = 0,
    boot: str = "b00710ad-0000-0000-0000-000000000000",
    first: int = 0,
    status: tuple[str, ...] = ("enabled 1", "pid 321"),
    audit_pos: tuple[int, int] | None = None,
) -> str:
    """collect_script's output around the given kernel log lines (already `SEQ USEC TEXT`)."""
    seqs = [int(line.split()[0]) for line in kmsg if line[0].isdigit()]
    oldest = [f"@@first {first}"] if seqs else []
    last = [f"@@last {max(seqs)}"] if seqs else []
    return "\n".join(
        [
            f"@@boot {boot}",
            "@@auditstatus",
            *status,
            f"lost {lost}",
            "@@audit",
            audit.rstrip("\n"),
            *([f"@@auditpos {audit_pos[0]} {audit_pos[1]}"] if audit_pos else []),
            f"@@clock {wall:.9f} {uptime:.2f}",
            "@@kmsg",
            *oldest,
            *kmsg,
            *last,
            "@@kmsgerr",
            "@@end",
            "",
        ]
    )


# Guest booted at wall 900.0: kernel stamp t ↔ wall 900 + t.
def test_join_pairs_in_order_within_a_key_and_uses_each_event_once() -> None:
    kmsg = [_record(10, 50.0, sport=1), _record(11, 50.004, sport=2), _record(12, 50.008, sport=3)]
    audit = _audit(1, 950.001) + _audit(2, 950.003) + _audit(3, 950.009)
    out = monitor.process(monitor.parse_snapshot(_output(kmsg, audit)), monitor.Cursor())
    assert [(a.sport, a.pid) for a in out.attempts] == [(1, 1), (2, 2), (3, 3)]
    assert {a.evidence for a in out.attempts} == {"audit+firewall"}


def test_retries_of_one_flow_are_one_attempt_and_do_not_steal_events() -> None:
    # SYN of flow 1, its resend one second later, then a new connect: the resend is not an
    # attempt and must not take the second connect's audit event.
    kmsg = [
        _record(10, 50.0, sport=1, ident=500),
        _record(11, 51.0, sport=1, ident=501),
        _record(12, 51.5, sport=2),
    ]
    audit = _audit(1, 950.0) + _audit(2, 951.5)
    out = monitor.process(monitor.parse_snapshot(_output(kmsg, audit)), monitor.Cursor())
    assert [(a.sport, a.pid) for a in out.attempts] == [(1, 1), (2, 2)]
    # A resend collected later is still the same attempt.
    again = monitor.process(
        monitor.parse_snapshot(
            _output([_record(13, 54.0, sport=1, ident=502)], wall=1005, uptime=105)
        ),
        out.cursor,
    )
    assert again.attempts == []


def test_a_new_connect_reusing_a_port_is_an_attempt_of_its_own() -> None:
    # Thousands of connects to one address reuse source ports: same flow, own connect() each.
    kmsg = [
        _record(10, 50.0, sport=7, ident=100),
        _record(11, 51.5, sport=7, ident=30000),
        _record(12, 53.0, sport=7, ident=30001),
    ]
    audit = _audit(1, 950.0) + _audit(2, 951.5)
    out = monitor.process(monitor.parse_snapshot(_output(kmsg, audit)), monitor.Cursor())
    # The third record has no connect of its own: a resend of the second.
    assert [(a.id.split(".")[0], a.pid) for a in out.attempts] == [("k10", 1), ("k11", 2)]


def test_a_new_connect_taken_for_a_resend_loses_nothing_in_a_real_burst() -> None:
    """The burst test's 1-in-10,000 miss, on real records. burst-slice.txt.gz: 5,041 blocked
    connects from one PHP process, cut from a 10,000 burst (TCG) of which the old join got 9,999.
    A quarter of the connects of such a burst get a source port used before (2,232 there); a new
    socket starts at a random IPv4 ID, and the resend check took it for a resend when that ID
    followed the flow's last one by 1..16: record 15714 reuses the port of record 12404 with an ID
    7 above. The old join then shifted every later pair of the burst by one place and lost the
    last connect. With the ID as captured, and made to follow by 1 (a possible resend for the
    check still), every connect keeps its own record."""
    snapshot = _snapshot("burst-slice.txt.gz")
    assert snapshot.kmsg_first is not None
    cursor = monitor.Cursor(kmsg_seq=snapshot.kmsg_first - 1)
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
    assert {(a.verdict, a.evidence) for a in captured} == {(Verdict.BLOCKED, "audit+firewall")}
    # In order: the n-th record with the n-th connect (audit's times follow the records' order).
    by_record = sorted(captured, key=lambda a: int(a.id[1:].split(".")[0]))
    assert [a.time for a in by_record] == sorted(a.time for a in captured)
    unlucky = replace(again, ident=(first.ident + 1) % 65536)
    resent = attempts(tuple(unlucky if r.seq == again.seq else r for r in snapshot.firewall))
    assert [(a.id, a.time, a.pid) for a in resent] == [(a.id, a.time, a.pid) for a in captured]


def _record6(seq: int, t: float, sport: int) -> str:
    return (
        f"{seq} {int(t * 1e6)} SBX-BLOCK IN= OUT=enp1s0 "
        "SRC=2001:0db8:00d5:0000:0000:0000:0000:0005 DST=2001:0db8:0001:0000:0000:0000:0000:0009 "
        f"LEN=80 TC=0 HOPLIMIT=64 FLOWLBL=1 PROTO=TCP SPT={sport} DPT=80 WINDOW=64800 RES=0x00 "
        "SYN URGP=0 UID=0 GID=0"
    )


def test_an_ipv6_burst_that_reuses_ports_loses_nothing() -> None:
    # IPv6 has no ID: a record of a flow seen 0.5 s or more before is a possible resend. In a
    # burst over 500 ports, some reuses come sooner than that and some later; each is a connect.
    n = 3000
    ports = random.Random(4)
    kmsg = [_record6(i, 50.0 + i * 0.002, 30000 + ports.randrange(500)) for i in range(n)]
    inet6 = "0A00" + "0050" + "00000000" + "20010DB8000100000000000000000009"
    audit = "".join(
        _audit(i + 1, 950.001 + i * 0.002, exit_code=-115).replace("02000050C6336409", inet6)
        for i in range(n)
    )
    text = _output(kmsg, audit, wall=970.0, uptime=70.0)
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor())
    assert [(a.id.split(".")[0], a.pid) for a in out.attempts] == [
        (f"k{i}", i + 1) for i in range(n)
    ]
    assert {a.dst for a in out.attempts} == {"2001:db8:1::9"}


def _udp_record(seq: int, t: float, sport: int, ident: int, prefix: str) -> str:
    return (
        f"{seq} {int(t * 1e6)} {prefix}IN= OUT=enp1s0 SRC=192.168.122.5 DST=203.0.113.7 LEN=29 "
        f"TOS=0x00 PREC=0x00 TTL=64 ID={ident} DF PROTO=UDP SPT={sport} DPT=5353 LEN=9 UID=0 GID=0"
    )


def test_established_records_are_attempts_only_with_a_connect_of_their_own() -> None:
    allow, again = "SBX-ALLOW ", firewall.LOG_ALLOW_EST
    kmsg = [
        _udp_record(10, 50.0, 7, 100, allow),  # a connect, answered
        _udp_record(11, 50.2, 7, 101, again),  # that socket's next datagram
        _udp_record(12, 51.0, 7, 30000, again),  # a new socket that got port 7
        _udp_record(13, 51.5, 7, 30001, again),  # its next datagram
        _udp_record(14, 56.0, 7, 9000, again),  # a socket with no connect (unconnected sendto)
    ]
    udp = "CB007107"  # 203.0.113.7
    audit = (
        _audit(1, 950.0, udp, 0).replace("02000050", "020014E9")
        + _audit(2, 950.2, udp, 0).replace("02000050", "02000000")  # a getaddrinfo probe, port 0
        + _audit(3, 951.0, udp, 0).replace("02000050", "020014E9")
        + _audit(4, 951.4, udp, 0).replace("02000050", "020014E9")  # sends nothing
    )
    out = monitor.process(monitor.parse_snapshot(_output(kmsg, audit)), monitor.Cursor())
    assert [(a.id.split(".")[0], a.pid, a.verdict, a.proto, a.dport) for a in out.attempts] == [
        ("k10", 1, Verdict.ALLOWED, "udp", 5353),
        ("k12", 3, Verdict.ALLOWED, "udp", 5353),
    ]


def test_udp_connects_on_a_live_flow_are_attempts_in_a_real_guest() -> None:
    """udp-reuse.txt.gz: 1,000 allowed UDP connects (+ one datagram each) from one PHP process
    (pid 504), with the established-flow log rules proposed for firewall.py loaded. The fake
    internet answers UDP, so conntrack keeps each flow 30 s; 27 sockets got the source port of a
    flow still held and sent on it as ESTABLISHED, never NEW. Each is an attempt of its own."""
    snapshot = _snapshot("udp-reuse.txt.gz")
    out = monitor.process(snapshot, monitor.Cursor(), final=True)
    mine = [a for a in out.attempts if a.pid == 504]
    assert len(mine) == 1000
    assert {(a.verdict, a.proto, a.dst, a.dport, a.evidence) for a in mine} == {
        (Verdict.ALLOWED, "udp", "203.0.113.7", 5353, "audit+firewall")
    }
    established = [r for r in snapshot.firewall if r.established]
    assert len(established) == 27
    assert len({a.sport for a in mine}) <= 1000 - 27
    # Without those records (the firewall as it is) the 27 are lost: what completeness missed.
    before = replace(snapshot, firewall=tuple(r for r in snapshot.firewall if not r.established))
    lost = monitor.process(before, monitor.Cursor(), final=True).attempts
    assert len([a for a in lost if a.pid == 504]) == 1000 - 27


def test_getaddrinfo_probes_are_not_attempts_in_a_real_guest() -> None:
    """udp-probes.txt.gz: 300 times stream_socket_client("udp://multi.test:5353") and a datagram,
    from one PHP process (pid 535), multi.test having two addresses in /etc/hosts (203.0.113.7
    allowed, 198.51.100.9 blocked). glibc sorts the two by connect()ing a UDP socket to each
    (port 0) and sends nothing: 600 connects with no packet, while flows to 203.0.113.7 are alive.
    Exactly the 300 real connects are attempts, 16 of them on a flow conntrack still held."""
    snapshot = _snapshot("udp-probes.txt.gz")
    php = [e for e in snapshot.audit if e.pid == 535]
    assert sorted({(e.dst, e.dport) for e in php}) == [
        ("198.51.100.9", 0),
        ("203.0.113.7", 0),
        ("203.0.113.7", 5353),
    ]
    assert len(php) == 900
    out = monitor.process(snapshot, monitor.Cursor(), final=True)
    mine = [a for a in out.attempts if a.pid == 535]
    assert len(mine) == 300
    assert {(a.verdict, a.dst, a.dport) for a in mine} == {(Verdict.ALLOWED, "203.0.113.7", 5353)}
    assert len([r for r in snapshot.firewall if r.established]) == 16


def test_sequence_gap_is_reported_not_ignored() -> None:
    first = monitor.process(monitor.parse_snapshot(_output([_record(10, 50.0)])), monitor.Cursor())
    assert first.warnings == []
    # The next collection starts at 25: records 11..24 were overwritten in between.
    text = _output([_record(25, 60.0, sport=9)], wall=1010, uptime=110, first=25)
    second = monitor.process(monitor.parse_snapshot(text), first.cursor)
    assert len(second.warnings) == 1 and "11..24" in second.warnings[0]
    assert second.cursor.losses == tuple(second.warnings)
    # A jump inside one read (the buffer wrapped while being read) too.
    text = _output([_record(30, 70.0, sport=10)], wall=1020, uptime=120, first=20).replace(
        "@@last 30", "@@gap 26 30\n@@last 30"
    )
    third = monitor.process(monitor.parse_snapshot(text), second.cursor)
    assert any("27..29" in w for w in third.warnings)


def test_audit_loss_and_stopped_auditd_are_reported() -> None:
    cursor = monitor.Cursor(kmsg_seq=9, audit_lost=2)
    text = _output([_record(10, 50.0)], lost=5).replace("pid 321", "pid 0")
    out = monitor.process(monitor.parse_snapshot(text), cursor)
    assert any("dropped 3 audit records" in w for w in out.warnings)
    assert any("auditd was not running" in w for w in out.warnings)


def test_exactly_once_across_collections_with_a_late_audit_event() -> None:
    # Collection 1 sees a fresh firewall record whose audit event is not written yet: it waits.
    first_text = _output([_record(10, 99.5, sport=1)], wall=1000.0, uptime=100.0)
    first = monitor.process(monitor.parse_snapshot(first_text), monitor.Cursor())
    assert first.attempts == [] and len(first.cursor.pending) == 1
    cursor = monitor.Cursor.from_json(first.cursor.to_json())
    assert cursor == first.cursor
    # Collection 2: the same kernel log again plus a new record, and the late audit event.
    kmsg = [_record(10, 99.5, sport=1), _record(11, 100.5, sport=2)]
    audit = _audit(40, 999.5) + _audit(41, 1000.5)
    second_text = _output(kmsg, audit, wall=1010.0, uptime=110.0)
    second = monitor.process(monitor.parse_snapshot(second_text), cursor)
    assert [(a.id.split(".")[0], a.pid) for a in second.attempts] == [("k10", 40), ("k11", 41)]
    # Collection 3 re-reads the same logs (the audit log's re-read window): nothing new.
    third = monitor.process(monitor.parse_snapshot(second_text), second.cursor)
    assert third.attempts == [] and third.warnings == []


def test_audit_events_written_late_and_out_of_order_are_taken_once() -> None:
    # Refused connects: attempts from their audit event alone. kauditd re-sends events auditd
    # could not take (its retry queue) after newer ones, so serials 50..59 come after 199.
    def events(serials: list[int]) -> str:
        return "".join(_audit(s, 950.0 + s / 1000) for s in serials)

    first_text = _output([], events(list(range(100, 200))), wall=1000.0, uptime=100.0)
    first = monitor.process(monitor.parse_snapshot(first_text), monitor.Cursor())
    assert sorted(a.pid or 0 for a in first.attempts) == list(range(100, 200))
    # The next collection re-reads the end of the log (150..199), then what came since.
    again = [*range(150, 200), *range(50, 60), *range(200, 210)]
    second_text = _output([], events(again), wall=1010.0, uptime=110.0)
    cursor = monitor.Cursor.from_json(first.cursor.to_json())
    second = monitor.process(monitor.parse_snapshot(second_text), cursor)
    assert sorted(a.pid or 0 for a in second.attempts) == [*range(50, 60), *range(200, 210)]
    third = monitor.process(monitor.parse_snapshot(second_text), second.cursor)
    assert third.attempts == []
    assert second.cursor.audit_seen[-20:] == (*range(50, 60), *range(200, 210))


def test_audit_only_attempts_loopback_refused_and_udp_without_packets() -> None:
    audit = (
        _audit(1, 950.0, dst_hex="7F000001", exit_code=-115)  # loopback
        + _audit(2, 950.1, dst_hex="C6336409", exit_code=-101)  # ENETUNREACH: nothing sent
        + _audit(3, 950.2, dst_hex="C6336409", exit_code=0)  # a UDP connect that never sent
    )
    out = monitor.process(monitor.parse_snapshot(_output([], audit)), monitor.Cursor(), final=True)
    assert [(a.verdict, a.pid, a.evidence) for a in out.attempts] == [
        (Verdict.LOOPBACK, 1, "audit"),
        (Verdict.BLOCKED, 2, "audit"),
    ]


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


def _audit_line(serial: int) -> str:
    return f'type=SYSCALL msg=audit(1000.{serial:03d}:{serial:02d}): syscall=42 key="sbx-connect"\n'


def _read_audit_log(log: Path, cursor: monitor.Cursor) -> tuple[list[int], monitor.Cursor]:
    """Runs audit_log_script on real files; the serials it printed, and the cursor after it."""
    result = subprocess.run(
        ["sh", "-c", monitor.audit_log_script(cursor.audit_inode, cursor.audit_offset, str(log))],
        capture_output=True,
        text=True,
        check=True,
    )
    _, inode, size = result.stderr.split()
    snapshot = monitor.parse_snapshot(_output([], audit_pos=(int(inode), int(size))))
    serials = [int(line.split(":")[1].split(")")[0]) for line in result.stdout.splitlines()]
    return serials, monitor.process(snapshot, cursor).cursor


def test_the_audit_log_is_read_from_where_the_last_collection_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small re-read window, so that these few lines cross it.
    monkeypatch.setattr(monitor, "AUDIT_REREAD_BYTES", len(_audit_line(1)) * 3 + 7)
    log = tmp_path / "audit.log"
    (tmp_path / "audit.log.1").write_text(_audit_line(0))  # rotated before the sandbox's time
    log.write_text("".join(_audit_line(s) for s in range(1, 11)))
    first, cursor = _read_audit_log(log, monitor.Cursor())
    assert first == list(range(11))
    assert cursor.audit_inode == log.stat().st_ino
    assert cursor.audit_offset == log.stat().st_size - monitor.AUDIT_REREAD_BYTES

    with log.open("a") as f:
        f.write("".join(_audit_line(s) for s in range(11, 14)))
    second, cursor = _read_audit_log(log, cursor)
    # The window starts inside line 7: that line is dropped, 8..10 are read again.
    assert second == list(range(8, 14))

    # auditd rotates (max_log_file) after writing 14: the file read so far becomes audit.log.1.
    (tmp_path / "audit.log.1").rename(tmp_path / "audit.log.2")
    with log.open("a") as f:
        f.write(_audit_line(14))
    log.rename(tmp_path / "audit.log.1")
    log.write_text("".join(_audit_line(s) for s in range(15, 17)))
    third, cursor = _read_audit_log(log, cursor)
    assert third == list(range(11, 17))
    assert cursor.audit_inode == log.stat().st_ino

    # Nothing new: only the re-read window, never the rotated files again.
    fourth, cursor = _read_audit_log(log, cursor)
    assert fourth == [15, 16]
    # A cursor from before this position existed reads every file, oldest first.
    everything, _ = _read_audit_log(log, monitor.Cursor())
    assert everything == [0, *range(1, 17)]


def test_a_reboot_keeps_the_audit_log_position() -> None:
    cursor = monitor.Cursor(boot_id="earlier", audit_inode=12, audit_offset=3000)
    text = _output([], audit_pos=(12, 9000))
    after = monitor.process(monitor.parse_snapshot(text), cursor).cursor
    expected = max(9000 - monitor.AUDIT_REREAD_BYTES, 3000)
    assert (after.audit_inode, after.audit_offset) == (12, expected)
    again = monitor.Cursor.from_json(after.to_json())
    assert (again.audit_inode, again.audit_offset) == (12, after.audit_offset)


def test_changed_audit_rules_and_a_stopped_auditd_are_reported() -> None:
    def warnings(*status: str) -> list[str]:
        text = _output([], status=("enabled 1", *status))
        return monitor.process(monitor.parse_snapshot(text), monitor.Cursor()).warnings

    assert warnings("pid 321", f"rules {monitor.AUDIT_RULES}") == []
    deleted = warnings("pid 321", "rules 0")
    assert len(deleted) == 1 and f"0 of the {monitor.AUDIT_RULES} audit rules" in deleted[0]
    stopped = warnings("pid 0", "rules 0")
    assert len(stopped) == 1 and "auditd was not running" in stopped[0]


def test_the_image_loads_as_many_connect_rules_as_collections_expect() -> None:
    rules = Path(__file__).parent.parent / "images/rootfs/etc/audit/rules.d/audit.rules"
    loaded = [
        line
        for line in rules.read_text().splitlines()
        if line.startswith("-a always,exit") and line.endswith(f"-k {monitor.AUDIT_KEY}")
    ]
    assert len(loaded) == monitor.AUDIT_RULES


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
    kmsg = [_record(i, 50.0 + i * 0.001, sport=10000 + i) for i in range(n)]
    audit = "".join(_audit(i + 1, 950.0 + i * 0.001) for i in range(n))
    text = _output(kmsg, audit, wall=960.0, uptime=60.0)
    started = time.perf_counter()
    out = monitor.process(monitor.parse_snapshot(text), monitor.Cursor())
    seconds = time.perf_counter() - started
    print(f"{n} attempts (firewall + audit) joined in {seconds:.2f} s: {n / seconds:.0f}/s")
    assert len(out.attempts) == n and all(a.evidence == "audit+firewall" for a in out.attempts)
    assert seconds < 30


# ---- a real VM in the lab --------------------------------------------------------------------

# Runs inside the lab namespace (SSH to the guest must start there): start capture or collect
# once, print one JSON object.
_DRIVER = """
import json, os, sys, time
from pathlib import Path
from orchestrator import lifecycle, monitor, paths
from orchestrator.config import load_settings
action, name, cursor_file = sys.argv[1:4]
dirs = paths.Dirs.from_env()
config = os.environ.get("SANDBOX_CONFIG")
ctx = lifecycle.Context(load_settings(Path(config) if config else None, dirs.config_file), dirs)
with lifecycle.open_guest(ctx, name) as guest:
    started = time.monotonic()
    if action == "start":
        monitor.start(guest)
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


def _bash_connect(cli: Cli, name: str, port: int) -> int:
    """A blocked TCP attempt by bash as user sandbox, through `exec`; bash's pid."""
    script = f"echo $$; exec 3<>/dev/tcp/198.51.100.9/{port} || true"
    bash = cli.ok(
        "exec", "--name", name, "--", "runuser", "-u", "sandbox", "--", "bash", "-c", script
    )
    return int(bash.stdout.split()[0])


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
        # Past the settle time nothing is held back for the next collection.
        time.sleep(monitor.SETTLE_SECONDS)
        first = _drive(cli, "collect", name, cursor)
        second = _drive(cli, "collect", name, cursor)
        # Guest root removes the audit rules, then kills auditd: the collection after each (the
        # one `exec` makes) says so and puts things back, so later attempts are attributed.
        deleted = cli.ok("exec", "--name", name, "--", "auditctl", "-D")
        killed = cli.ok(
            "exec",
            "--name",
            name,
            "--",
            "sh",
            "-c",
            "pkill -x auditd; while pgrep -x auditd >/dev/null; do sleep 0.1; done",
        )
        later_pid = _bash_connect(cli, name, 81)
        time.sleep(monitor.SETTLE_SECONDS)
        logged = cli.ok("logs", "--name", name, "--json").stdout
    finally:
        cli.run("destroy", "--name", name, timeout=300)
    assert f"0 of the {monitor.AUDIT_RULES} audit rules" in deleted.stderr
    assert "auditd was not running" in killed.stderr
    healed = [Attempt.from_json(line) for line in logged.splitlines()]
    assert [(a.exe, a.dport, a.evidence) for a in healed if a.pid == later_pid] == [
        ("/usr/bin/bash", 81, "audit+firewall")
    ]
    samples = os.environ.get("SANDBOX_MONITOR_SAMPLES")
    if samples:
        Path(samples, "collect-1.txt").write_text(first["raw"])
        Path(samples, "collect-2.txt").write_text(second["raw"])
    print(f"collections took {first['seconds']:.2f} s and {second['seconds']:.2f} s")
    assert first["warnings"] == [] and second["warnings"] == []
    assert second["attempts"] == []
    attempts = [Attempt.from_json(line) for line in first["attempts"]]
    assert len({a.id for a in attempts}) == len(attempts)

    mine = [a for a in attempts if a.pid == php_pid]
    assert {a.exe for a in mine} == {"/usr/bin/php8.2"}
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
    assert all(a.evidence == "audit+firewall" for a in mine)
    by_bash = [a for a in attempts if a.pid == bash_pid]
    assert [(a.exe, a.verdict, a.proto, a.dst, a.dport, a.uid) for a in by_bash] == [
        ("/usr/bin/bash", Verdict.BLOCKED, "tcp", "198.51.100.9", 80, 1000)
    ]


def test_second_real_collection_adds_nothing() -> None:
    first = monitor.process(_snapshot("collect-1.txt"), monitor.Cursor())
    assert len(first.attempts) == 8 and first.cursor.pending == ()
    second = monitor.process(_snapshot("collect-2.txt"), first.cursor)
    assert second.attempts == [] and second.warnings == []
    assert second.cursor.kmsg_seq == 544


_BURST = 10_000
_PHP_BURST = f"""
for ($i = 0; $i < {_BURST}; $i++) {{ @stream_socket_client("tcp://198.51.100.9:80", $e, $m, 5); }}
echo getmypid(), "\\n";
"""


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.xfail(
    strict=False,
    reason="issue 4: 1 CI run of 6 lost 50 consecutive audit events of a 10,000 burst with "
    "`lost 0`: kauditd's uncounted drop (no audit=1) of records an idle-priority auditd could "
    "not take; all three are fixed since; strict once more CI runs show it gone",
)
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
        time.sleep(monitor.SETTLE_SECONDS)
        first = _drive(cli, "collect", name, cursor)
    finally:
        cli.run("destroy", "--name", name, timeout=300)
    (tmp_path / "burst.txt").write_text(first["raw"])
    print(f"collecting {_BURST} attempts took {first['seconds']:.2f} s, {len(first['raw'])} bytes")
    assert first["warnings"] == []
    attempts = [Attempt.from_json(line) for line in first["attempts"]]
    mine = [a for a in attempts if a.pid == php_pid]
    assert len(mine) == _BURST
    assert {(a.verdict, a.dst, a.dport, a.evidence) for a in mine} == {
        (Verdict.BLOCKED, "198.51.100.9", 80, "audit+firewall")
    }

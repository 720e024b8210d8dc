"""Connection capture: parsing and the join on real samples from a guest (tests/data/monitor/,
captured with the VM test below), loss detection, exactly-once, and one real VM in the lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import monitor
from orchestrator.errors import GuestError
from orchestrator.lab import in_lab
from orchestrator.records import Attempt, DnsQuery, Verdict

from .conftest import Golden
from .e2e_support import Cli

DATA = Path(__file__).parent / "data" / "monitor"


def _snapshot(name: str) -> monitor.Snapshot:
    return monitor.parse_snapshot((DATA / name).read_text())


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
) -> str:
    """collect_script's output around the given kernel log lines (already `SEQ USEC TEXT`)."""
    seqs = [int(line.split()[0]) for line in kmsg if line[0].isdigit()]
    oldest = [f"@@first {first}"] if seqs else []
    last = [f"@@last {max(seqs)}"] if seqs else []
    return "\n".join(
        [
            f"@@boot {boot}",
            "@@auditstatus",
            "enabled 1",
            "pid 321",
            f"lost {lost}",
            "@@audit",
            audit.rstrip("\n"),
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
    assert any("auditd is not running" in w for w in out.warnings)


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
    # Collection 3 re-reads the same logs (audit within the reorder window): nothing new.
    third = monitor.process(monitor.parse_snapshot(second_text), second.cursor)
    assert third.attempts == [] and third.warnings == []


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
        bash = cli.ok(
            "exec",
            "--name",
            name,
            "--",
            "runuser",
            "-u",
            "sandbox",
            "--",
            "bash",
            "-c",
            "echo $$; exec 3<>/dev/tcp/198.51.100.9/80 || true",
        )
        bash_pid = int(bash.stdout.split()[0])
        # Past the settle time nothing is held back for the next collection.
        time.sleep(monitor.SETTLE_SECONDS)
        first = _drive(cli, "collect", name, cursor)
        second = _drive(cli, "collect", name, cursor)
    finally:
        cli.run("destroy", "--name", name, timeout=300)
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
    reason="issue 4 is open: in 1 of 3 CI runs the join missed 1 attempt in a 10,000 burst",
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

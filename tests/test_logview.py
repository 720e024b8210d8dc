"""The log store (exactly once, torn lines), filters and the rendered views."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import paths
from orchestrator.capture import logview
from orchestrator.capture.logview import Filter
from orchestrator.capture.records import Attempt, DnsQuery, LogRecordError, Verdict
from orchestrator.errors import UsageError
from orchestrator.vm.domain import Accel

DATA = Path(__file__).parent / "data"

CURL = Attempt(
    id="k101",
    time="2026-11-23T12:00:00.000Z",
    verdict=Verdict.ALLOWED,
    proto="tcp",
    family=4,
    dst="203.0.113.7",
    dport=443,
    uid=1000,
    pid=4242,
    exe="/usr/bin/curl",
    cmdline="curl https://allowed.example/",
    dns_name="allowed.example",
    evidence="connect+firewall",
)
PHP_V6 = Attempt(
    id="k102",
    time="2026-11-23T12:30:00.000Z",
    verdict=Verdict.BLOCKED,
    proto="udp",
    family=6,
    dst="2001:db8:1::9",
    dport=53,
    uid=33,
    pid=777,
    exe="/usr/bin/php8.2",
    cmdline="php /srv/app/exfil.php",
)
PING = Attempt(
    id="k103",
    time="2026-11-23T12:45:00.000Z",
    verdict=Verdict.BOOT,
    proto="icmp",
    family=4,
    dst="198.51.100.9",
    dport=None,
)
RESOLVER = Attempt(
    id="k104",
    time="2026-11-23T12:46:00.000Z",
    verdict=Verdict.DNS,
    proto="udp",
    family=4,
    dst="192.168.213.1",
    dport=53,
    pid=4242,
    exe="/usr/bin/curl",
)
ALL = [CURL, PHP_V6, PING, RESOLVER]


def _text(table: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


# ---- store -----------------------------------------------------------------------------------


def test_two_appends_store_each_id_once(tmp_path: Path) -> None:
    assert logview.append_attempts(tmp_path, [CURL, PHP_V6]) == 2
    assert logview.append_attempts(tmp_path, [PHP_V6, PING, PING]) == 1
    assert logview.read_attempts(tmp_path) == [CURL, PHP_V6, PING]
    lines = (tmp_path / paths.CONNECTIONS_LOG).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["k101", "k102", "k103"]


def test_dns_appends_dedupe_too(tmp_path: Path) -> None:
    query = DnsQuery("d1.1.x", "2026-11-23T12:00:00.000Z", "192.168.213.9", "a.example", "A", "X")
    assert logview.append_dns(tmp_path, [query]) == 1
    assert logview.append_dns(tmp_path, [query, replace(query, id="d1.2.x")]) == 1
    assert [q.id for q in logview.read_dns(tmp_path)] == ["d1.1.x", "d1.2.x"]


def test_a_torn_last_line_is_skipped_and_repaired_by_the_next_append(tmp_path: Path) -> None:
    logview.append_attempts(tmp_path, [CURL])
    log = tmp_path / paths.CONNECTIONS_LOG
    with log.open("a") as handle:
        handle.write(PHP_V6.to_json()[:40])  # a crash mid-write
    assert logview.read_attempts(tmp_path) == [CURL]
    # The torn record was never stored: appending it again stores it, whole.
    assert logview.append_attempts(tmp_path, [PHP_V6]) == 1
    assert logview.read_attempts(tmp_path) == [CURL, PHP_V6]
    assert log.read_text().count("\n") == 2


def test_a_damaged_middle_line_names_the_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / paths.CONNECTIONS_LOG
    log.write_text(CURL.to_json() + "\n{not json\n" + PING.to_json() + "\n")
    with pytest.raises(LogRecordError, match=r"connections.jsonl:2"):
        logview.read_attempts(tmp_path)
    # Appending still works around it (and still dedupes the good lines).
    assert logview.append_attempts(tmp_path, [CURL, PHP_V6]) == 1


def test_missing_logs_read_as_empty_and_purge(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    assert logview.read_attempts(logs) == []
    assert logview.read_dns(logs) == []
    assert logview.purge(logs) is False
    logview.append_attempts(logs, [CURL])
    assert logview.purge(logs) is True
    assert not logs.exists()


# ---- filters ---------------------------------------------------------------------------------

NOW = datetime(2026, 11, 23, 12, 50, tzinfo=UTC)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["k101", "k102", "k103", "k104"]),
        ({"blocked": True}, ["k102", "k103"]),
        ({"allowed": True}, ["k101", "k104"]),
        ({"blocked": True, "allowed": True}, ["k101", "k102", "k103", "k104"]),
        ({"since": "10m"}, ["k103", "k104"]),
        ({"since": "1h"}, ["k101", "k102", "k103", "k104"]),
        ({"since": "30m"}, ["k102", "k103", "k104"]),
        ({"since": "2026-11-23T12:40:00Z"}, ["k103", "k104"]),
        ({"process": "php"}, ["k102"]),
        ({"process": "allowed.example"}, ["k101"]),  # a substring of the command line
        ({"process": "4242"}, ["k101", "k104"]),
        ({"process": "42"}, []),  # a pid is matched whole
        ({"blocked": True, "process": "curl"}, []),
    ],
)
def test_filters(options: dict[str, object], expected: list[str]) -> None:
    chosen = logview.apply(Filter.from_options(now=NOW, **options), ALL)  # type: ignore[arg-type]
    assert [a.id for a in chosen] == expected


def test_since_parses_ages_and_times() -> None:
    assert logview.parse_since("90s", NOW) == datetime(2026, 11, 23, 12, 48, 30, tzinfo=UTC)
    assert logview.parse_since("2h", NOW) == datetime(2026, 11, 23, 10, 50, tzinfo=UTC)
    assert logview.parse_since("1d", NOW) == datetime(2026, 11, 22, 12, 50, tzinfo=UTC)
    with pytest.raises(UsageError):
        logview.parse_since("yesterday", NOW)
    assert logview.parse_since("2026-11-23T12:00:00", NOW).tzinfo is not None


def test_dns_since_filter() -> None:
    early = DnsQuery("a", "2026-11-23T12:00:00.000Z", "192.168.213.9", "a.example", "A", "X")
    late = replace(early, id="b", time="2026-11-23T12:49:00.000Z")
    assert logview.apply_dns(Filter.from_options(since="5m", now=NOW), [early, late]) == [late]


# ---- rendering -------------------------------------------------------------------------------


def test_table_shows_every_field() -> None:
    text = _text(logview.render_table(ALL))
    row = next(line for line in text.splitlines() if "curl (4242)" in line)
    for cell in ("2026-11-23 12:00:00.000", "allowed", "1000", "tcp", "203.0.113.7:443"):
        assert cell in row
    assert "allowed.example" in row
    assert "[2001:db8:1::9]:53" in text
    assert "php8.2 (777)" in text
    # ICMP has no port; an attempt without a process says so.
    ping = next(line for line in text.splitlines() if "198.51.100.9" in line)
    assert "198.51.100.9:" not in ping
    assert "?" in ping


def test_verdicts_are_coloured() -> None:
    table = logview.render_table([CURL, PHP_V6])
    cells = list(table.columns[1].cells)
    assert [str(getattr(c, "style", "")) for c in cells] == ["green", "bold red"]


def test_dns_table() -> None:
    queries = [
        DnsQuery(
            "a", "2026-11-23T12:00:00.000Z", "192.168.213.9", "ok.example", "A", "203.0.113.7"
        ),
        DnsQuery("b", "2026-11-23T12:00:01.000Z", "192.168.213.9", "no.example", "A", "REFUSED"),
    ]
    text = _text(logview.render_dns_table(queries))
    assert "ok.example" in text and "203.0.113.7" in text and "REFUSED" in text


def test_json_lines_are_the_stored_lines(tmp_path: Path) -> None:
    logview.append_attempts(tmp_path, ALL)
    stored = (tmp_path / paths.CONNECTIONS_LOG).read_text().splitlines()
    assert logview.json_lines(logview.read_attempts(tmp_path)) == stored


def test_follow_shows_only_new_records() -> None:
    seen: set[str] = set()
    assert logview.new_records([CURL, PHP_V6], seen) == [CURL, PHP_V6]
    assert logview.new_records([CURL, PHP_V6, PING], seen) == [PING]


# ---- sockets ---------------------------------------------------------------------------------


def test_sockets_parse_real_lsof_output() -> None:
    # Captured with sockets_command() in a namespace holding a listener, an accepted and a
    # connecting TCP socket, UDP sockets and IPv6 ones.
    sockets = logview.parse_sockets((DATA / "lsof-F.txt").read_text())
    assert [(s.fd, s.proto, s.family, s.local, s.remote, s.state) for s in sockets] == [
        ("3", "tcp", 4, "192.0.2.1:8080", None, "LISTEN"),
        ("4", "tcp", 4, "192.0.2.1:37004", "192.0.2.1:8080", "ESTABLISHED"),
        ("5", "tcp", 4, "192.0.2.1:8080", "192.0.2.1:37004", "ESTABLISHED"),
        ("6", "udp", 4, "*:5353", None, None),
        ("7", "udp", 4, "192.0.2.1:51784", "198.51.100.9:53", None),
        ("8", "tcp", 6, "*:443", None, "LISTEN"),
        ("9", "tcp", 6, "[2001:db8:1::1]:35456", "[2001:db8:1::9]:80", "SYN_SENT"),
    ]
    assert {(s.command, s.pid, s.ppid, s.user) for s in sockets} == {
        ("python3", 15054, 14501, "root")
    }
    text = _text(logview.render_sockets(sockets))
    assert "python3 (15054)" in text and "[2001:db8:1::9]:80" in text and "tcp6" in text


def test_sockets_command_output_parses(tmp_path: Path) -> None:
    # The guest runs Debian 12's lsof, as does this host: run the command for real here.
    if shutil.which("lsof") is None:
        pytest.skip("lsof is not installed")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = subprocess.run(
            logview.sockets_command(), capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode in (0, 1), result.stderr
    mine = [s for s in logview.parse_sockets(result.stdout) if s.pid == os.getpid()]
    assert any(
        s.local == f"127.0.0.1:{port}" and s.state == "LISTEN" and s.proto == "tcp" for s in mine
    ), mine


# ---- rewriting (tying attempts to runs after the fact) ---------------------------------------


def test_rewrite_changes_records_in_place_and_counts_them(tmp_path: Path) -> None:
    logview.append_attempts(tmp_path, ALL)
    changed = logview.rewrite_attempts(
        tmp_path, lambda stored: [replace(a, run="r1") if a.pid == 777 else a for a in stored]
    )
    assert changed == 1
    again = logview.read_attempts(tmp_path)
    assert [a.id for a in again] == [a.id for a in ALL]
    assert [a.run for a in again] == [None, "r1", None, None]
    assert logview.rewrite_attempts(tmp_path, lambda stored: stored) == 0


def test_an_append_waiting_on_the_old_file_lands_in_the_new_one(tmp_path: Path) -> None:
    import fcntl
    import threading
    import time

    from orchestrator.files import atomic_write

    logview.append_attempts(tmp_path, [CURL])
    path = tmp_path / paths.CONNECTIONS_LOG
    # A rewrite holds the lock on the old file; an appender opens that file and waits.
    held = os.open(path, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    appender = threading.Thread(target=logview.append_attempts, args=(tmp_path, [PHP_V6]))
    appender.start()
    time.sleep(0.2)  # let it open the old file and block on the lock
    atomic_write(path, replace(CURL, run="r").to_json() + "\n")
    fcntl.flock(held, fcntl.LOCK_UN)
    os.close(held)
    appender.join(10)
    assert not appender.is_alive()
    stored = logview.read_attempts(tmp_path)
    assert [(a.id, a.run) for a in stored] == [(CURL.id, "r"), (PHP_V6.id, None)]


def test_the_php_source_column_appears_with_a_stack() -> None:
    from orchestrator.capture.records import Frame

    plain = _text(logview.render_table([CURL]))
    assert "php source" not in plain
    traced = replace(
        PHP_V6,
        stack=(
            Frame("fsockopen", "/var/lib/sandbox/runs/r/x.php", 12, "'h', 80"),
            Frame("{main}", "", 0),
        ),
    )
    text = _text(logview.render_table([CURL, traced]))
    assert "php source" in text and "fsockopen() at x.php:12" in text and "← main" in text


def test_tamper_rows_say_what_changed_and_who_escaped() -> None:
    """A firewall change the capture saw names its process in the process column and says what
    changed in its own column; the read-back row has no process. Guest text stays data."""
    from orchestrator.capture import monitor

    hostile = "/tmp/\x1b[2J\u202e[bold]evil"
    change = monitor.FirewallChange(
        seq=0, mono_ns=1, time=1_795_000_000.0, what="nft", netns=0, pid=812, tid=812,
        ppid=790, uid=0, exe=hostile, cmdline="iptables -F OUTPUT",
    )  # fmt: skip
    rows = [
        CURL,
        monitor.tamper_record(
            change.time, change.describe(), "w1", pid=812, ppid=790, uid=0, exe=hostile
        ),
        monitor.tamper_record(
            change.time + 5, "the guest's firewall no longer matches the policy (IPv4: x)", "fw1"
        ),
    ]
    text = _text(logview.render_table(rows))
    assert "what changed" in text
    assert "\x1b" not in text and "\u202e" not in text
    changed = next(line for line in text.splitlines() if "(812)" in line)
    assert "\\x1b[2J\\u202e[bold]evil (812)" in changed
    assert "the guest's firewall was changed (nftables commit) by" in changed
    readback = next(line for line in text.splitlines() if "no longer matches" in line)
    assert " ? " not in readback
    assert "what changed" not in _text(logview.render_table([CURL]))


def test_status_and_list_show_state_text_escaped(tmp_path: Path) -> None:
    """`status`, `status --json` and `list` through the real CLI, with a state whose text holds
    terminal escapes, a C1 CSI, a bidi override and markup: shown escaped and literal."""
    from orchestrator.state import Phase, SandboxState, StateStore

    hostile = "\x1b]0;pwned\x07\x1b[2Jx[/]\u202e\x9b31m[bold]"
    StateStore(tmp_path / "sandbox").save(
        SandboxState(
            name="hs1",
            phase=Phase.READY,
            created="2026-11-23T10:00:00+00:00",
            uri="test:///default",
            domain="sandbox-hs1",
            pool="sandbox",
            network="sandbox",
            volumes=(),
            image=hostile,
            image_hash="00" * 32,
            accel=Accel.TCG,
            mac="52:54:00:aa:bb:cc",
            ip="192.168.213.5",
        )
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "SANDBOX_CONNECT": "test:///default"}
    sandbox = str(Path(sys.executable).parent / "sandbox")
    for args in (["status", "--name", "hs1"], ["status", "--name", "hs1", "--json"], ["list"]):
        result = subprocess.run(
            [sandbox, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert raw not in result.stdout, (args, result.stdout)
        if "--json" in args:
            assert json.loads(result.stdout)["image"] == hostile
        else:
            assert "x[/]" in result.stdout and "[bold]" in result.stdout, result.stdout

"""Sinkhole mode on a remote libvirt host (egress/remotesinkhole.py, egress/sinkhole_service.py):
the standalone program's answers and lines, their conversion into the local sinkhole's records
(hostile lines included), the incremental fetch, and the program run for real (root: in network
namespaces of the test's own, the "host" being this machine reached through HostFiles.run)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.capture import payload, remotecapture
from orchestrator.capture.records import Verdict, parse_time
from orchestrator.egress import remotesinkhole, sinkhole
from orchestrator.egress import sinkhole_service as service
from orchestrator.egress.remotesinkhole import RemoteSinkholeError, convert, take
from orchestrator.errors import UsageError
from orchestrator.lifecycle import hosts
from orchestrator.vm.hostfiles import LocalFiles, Ran
from tests.netns import inside
from tests.standalone import assert_standalone
from tests.test_payload import _client_hello
from tests.test_pcap import PEER_NETNS, netns  # noqa: F401  # the fixture
from tests.test_remotecapture import InNamespace, _alive

from .test_sinkhole import _attempt

# When the attempts of test_sinkhole._attempt are made (n = 2).
WHEN = parse_time("2026-12-05T21:00:02.000Z").timestamp()
HTTP = b"GET /c?id=1 HTTP/1.1\r\nHost: t.evil.test\r\n\r\n"
PEER, TARGET = ("192.168.208.20", 40001), ("203.0.113.9", 80)

# ---- the program ---------------------------------------------------------------------------


def test_the_program_imports_the_standard_library_alone() -> None:
    assert_standalone(Path(service.__file__))
    assert service.IDLE_SECONDS == sinkhole.IDLE_SECONDS
    # What the client writes to the host is this file.
    assert remotesinkhole.program_text() == Path(service.__file__).read_text()


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (HTTP, service.HTTP_OK),
        (b"POST /x HTTP/1.0\r\n", service.HTTP_OK),
        (b"\x16\x03\x01\x00\x05hello", service.TLS_ALERT),
        (b"GETX / HTTP/1.1\r\n\r\n", b""),  # not a method
        (b"GET", b""),  # a method, but no request line
        (b"get / HTTP/1.1\r\n\r\n", b""),  # methods are upper case
        (b"HELLO sinkhole\n", b""),
        (b"", b""),
    ],
)
def test_the_program_answers_by_the_first_bytes(first: bytes, expected: bytes) -> None:
    assert service.answer(first) == expected


def test_the_answers_are_the_local_sinkholes_for_what_it_parses() -> None:
    assert service.HTTP_OK == sinkhole.HTTP_OK and service.TLS_ALERT == sinkhole.TLS_ALERT
    for first in (HTTP, _client_hello(), b"HELLO", b""):
        assert service.answer(first) == sinkhole.answer(payload.summarize(first)), first


def test_complete_waits_for_a_request_head_or_a_whole_tls_record() -> None:
    hello = _client_hello()
    assert service.complete(hello, 4096) and not service.complete(hello[:-1], 4096)
    assert service.complete(HTTP, 4096) and not service.complete(HTTP[:-2], 4096)
    assert service.complete(b"x" * 10, 10) and not service.complete(b"x" * 9, 10)


def test_each_line_converts_into_the_local_sinkholes_record() -> None:
    for first in (HTTP, _client_hello(), b"HELLO sinkhole\n", b""):
        line = service.record(1765000000.25, PEER, TARGET, first, payload.READ_BYTES)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert convert(line.rstrip(b"\n")) == sinkhole.record(1765000000.25, PEER, TARGET, first)
    # No original destination (a connection not redirected): kept, without a port.
    line = service.record(5.0, PEER, None, b"x", payload.READ_BYTES)
    assert convert(line) == sinkhole.record(5.0, PEER, None, b"x")
    # The program keeps at most the bytes it was told to.
    cut = json.loads(service.record(5.0, PEER, TARGET, b"y" * 100, 10))
    assert base64.b64decode(cut["data"]) == b"y" * 10


def _line(**changes: object) -> bytes:
    record = json.loads(service.record(7.5, PEER, TARGET, HTTP, payload.READ_BYTES))
    record.update(changes)
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        _line(time="soon"),
        _line(time=True),
        _line(time=-1),
        _line(time=1e300),
        b'{"time": NaN, "src": "192.168.208.20", "sport": 1, "dst": null, "dport": null, '
        b'"data": ""}',
        _line(src="::1"),
        _line(src="192.168.208.20; rm -rf /"),
        _line(src=None),
        _line(sport=True),
        _line(sport=70000),
        _line(sport="80"),
        _line(dport=-1),
        _line(dst=None),  # a port without an address
        _line(dst="203.0.113.9", dport=None),
        _line(dst={"a": 1}),
        _line(data="not base64!"),
        _line(data=None),
        _line(data=base64.b64encode(b"z" * (payload.READ_BYTES + 1)).decode()),
        _line(data="é"),
        _line(extra="x" * remotesinkhole.MAX_LINE),  # longer than any line of the program
    ],
)
def test_malformed_lines_are_refused(line: bytes) -> None:
    assert convert(line) is None


def test_take_leaves_a_line_in_progress_for_the_next_fetch() -> None:
    good = _line()
    taken = take(good + b"\n" + b"garbage\n" + good[:20])
    assert len(taken.lines) == 1 and taken.refused == 1
    assert taken.consumed == len(good) + 1 + len(b"garbage\n")
    assert json.loads(taken.lines[0])["http"] == "GET t.evil.test /c?id=1"
    # At the end (the program stopped) the rest is taken as it is: refused here, half a line.
    final = take(good[:20], final=True)
    assert (final.lines, final.consumed, final.refused) == ((), 20, 1)
    # A "line" longer than the program writes is not waited for.
    long = take(b"x" * (remotesinkhole.MAX_LINE + 1))
    assert long.consumed == remotesinkhole.MAX_LINE + 1 and long.refused == 1


# ---- the fetch (this machine's files as the host's) ----------------------------------------


@pytest.fixture
def host_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "host" / "sandbox-records"
    monkeypatch.setattr(remotecapture, "ROOT", str(root))
    return root


def test_fetch_brings_what_is_new_in_the_local_format(host_root: Path, tmp_path: Path) -> None:
    where = host_root / "web"
    where.mkdir(parents=True)
    raw, logs = where / remotesinkhole.RAW_FILE, tmp_path / "logs"
    host = LocalFiles()
    assert remotesinkhole.fetch(host, str(where), logs, "k1") == remotesinkhole.Fetched()

    first = service.record(1000.0, ("192.168.208.20", 40001), ("192.168.208.1", 80), HTTP, 4096)
    raw.write_bytes(first + first[:30])
    assert remotesinkhole.fetch(host, str(where), logs, "k1").records == 1
    rest = first[30:]
    second = service.record(WHEN, ("192.168.208.18", 40002), ("192.168.208.1", 443), b"", 4096)
    with raw.open("ab") as out:
        out.write(rest + b"\x00garbage\n" + second)
    fetched = remotesinkhole.fetch(host, str(where), logs, "k1")
    assert fetched.records == 2 and len(fetched.warnings) == 1, fetched
    assert "1 malformed" in fetched.warnings[0]
    assert remotesinkhole.fetch(host, str(where), logs, "k1").records == 0  # nothing new
    records = sinkhole.read_records(logs)
    assert [(r.sport, r.dport, r.http, r.summary) for r in records] == [
        (40001, 80, "GET t.evil.test /c?id=1", "HTTP GET t.evil.test /c?id=1"),
        (40001, 80, "GET t.evil.test /c?id=1", "HTTP GET t.evil.test /c?id=1"),
        (40002, 443, None, "no bytes"),
    ]
    # And the join takes them as the local sinkhole's.
    attempt = _attempt(2, Verdict.BLOCKED, 443, dst="192.168.208.1")
    [joined] = sinkhole.attach([attempt], records, "192.168.208.1")
    assert joined.verdict is Verdict.SINKHOLED and joined.payload == "no bytes"

    # A new sinkhole (another sandbox of the name): its file is read from its start.
    raw.write_bytes(second)
    assert remotesinkhole.fetch(host, str(where), logs, "k2").records == 1
    # The same one's file shorter than what was read: rewritten, said so, read again.
    raw.write_bytes(b"")
    assert remotesinkhole.fetch(host, str(where), logs, "k2").warnings
    raw.write_bytes(second)
    assert remotesinkhole.fetch(host, str(where), logs, "k2").records == 1


def test_fetch_keeps_the_local_records_bounded(
    host_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = host_root / "web"
    where.mkdir(parents=True)
    line = service.record(1000.0, PEER, TARGET, HTTP, 4096)
    (where / remotesinkhole.RAW_FILE).write_bytes(line * 50)
    monkeypatch.setattr(sinkhole, "MAX_LOG_BYTES", 1000)
    fetched = remotesinkhole.fetch(LocalFiles(), str(where), tmp_path / "logs", "k")
    assert 0 < fetched.records < 50 and any("full" in w for w in fetched.warnings)
    assert (tmp_path / "logs" / sinkhole.RECORDS_FILE).stat().st_size <= 1000


def test_commands_name_only_our_directories(host_root: Path) -> None:
    where = str(host_root / "web")
    argv = remotesinkhole.start_argv(where, "192.168.208.1")
    assert argv[:2] == ["sh", "-c"] and argv[3:8] == [
        "sh",
        where,
        f"{where}/sinkhole.py",
        f"{where}/sinkhole.out",
        f"{where}/sinkhole.log",
    ]
    assert argv[8:] == [
        "--address", "192.168.208.1", "--records", f"{where}/sinkhole-raw.jsonl",
        "--read-bytes", "4096", "--read-seconds", "3.0", "--max-open", "32",
        "--max-connections", "4096", "--max-log-bytes", str(8 << 20),
    ]  # fmt: skip
    assert remotesinkhole.stop_argv(where)[3:] == ["sh", where, f"{where}/sinkhole.py"]
    for bad in ("/tmp/web", str(host_root), f"{host_root}/a/b", f"{host_root}/.."):
        with pytest.raises((RemoteSinkholeError, UsageError)):
            remotesinkhole.stop_argv(bad)
    with pytest.raises(ValueError):
        remotesinkhole.start_argv(where, "192.168.208.1; reboot")


def test_the_sinkhole_is_placed_where_it_can_run() -> None:
    assert hosts.runs_host_services("qemu:///system")
    assert hosts.runs_host_services("qemu+ssh://root@host/system")
    assert not hosts.runs_host_services("qemu+tcp://host/system")


# ---- the program, for real -------------------------------------------------------------------


def _talk(port: int, data: bytes) -> bytes:
    # From the far end of the veth: the program listens on 192.0.2.1 in the "host" namespace.
    with inside(PEER_NETNS), socket.create_connection(("192.0.2.1", port), timeout=10) as conn:
        if data:
            conn.sendall(data)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.root
def test_the_program_serves_records_and_stops_on_a_host(
    netns: str,  # noqa: F811
    host_root: Path,
    tmp_path: Path,
) -> None:
    host = InNamespace(netns)
    where = str(host_root / "web")
    logs = tmp_path / "logs"
    started = remotesinkhole.start(host, where, "192.0.2.1")
    other = f"{where}/{remotesinkhole.PROGRAM}.old"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", other])
    try:
        status = Path(f"/proc/{started.pid}/status").read_text()
        assert "Uid:\t65534" in status  # no longer root once it holds its socket and log
        assert (Path(where).stat().st_mode & 0o777) == 0o700
        assert _talk(started.port, HTTP) == sinkhole.HTTP_OK
        assert _talk(started.port, _client_hello()) == sinkhole.TLS_ALERT
        begun = time.monotonic()
        assert _talk(started.port, b"HELLO") == b""  # raw bytes: no answer, closed when idle
        assert time.monotonic() - begun < sinkhole.READ_SECONDS
        key = remotesinkhole.fetch_key("2026-12-06T00:00:00+00:00", started.pid)
        deadline = time.monotonic() + 10
        records: list[dict[str, object]] = []
        while len(records) < 3:
            remotesinkhole.fetch(host, where, logs, key)
            assert time.monotonic() < deadline, "the records never came"
            time.sleep(0.1)
            lines = (logs / sinkhole.RECORDS_FILE).read_text().splitlines()
            records = [json.loads(line) for line in lines]
        # Connected to directly (no redirect, so no original destination): no port.
        assert [(r["src"], r["dport"], r["summary"]) for r in records] == [
            ("192.0.2.2", None, "HTTP GET t.evil.test /c?id=1"),
            ("192.0.2.2", None, "TLS ClientHello, server name www.inet.test"),
            ("192.0.2.2", None, "5 bytes: 48454c4c4f"),
        ]
        # Only a python running this sandbox's copy is ours: not another's, not the bystander.
        assert remotesinkhole.stop(host, where) == [started.pid]
        assert not _alive(started.pid) and bystander.poll() is None
        assert remotesinkhole.stop(host, where) == []
    finally:
        remotesinkhole.stop(host, where)
        remotecapture.remove(host, where)
        bystander.kill()
        bystander.wait()
    assert not Path(where).exists()


class WithoutPython(InNamespace):
    """A host whose shell finds no python3."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        if argv[0] == "sh":
            argv = ["env", "PATH=/nonexistent", "/bin/sh", *argv[1:]]
        return super().run(argv, stdin)


@pytest.mark.root
def test_a_host_without_python3_is_said_with_what_to_do(
    netns: str,  # noqa: F811
    host_root: Path,
) -> None:
    host = WithoutPython(netns)
    where = str(host_root / "web")
    with pytest.raises(RemoteSinkholeError) as caught:
        remotesinkhole.start(host, where, "192.0.2.1")
    assert "python3 is not installed" in caught.value.message
    assert "apt-get install python3" in (caught.value.hint or "")


def test_destroy_looks_for_a_sinkhole_only_where_there_may_be_one() -> None:
    from orchestrator.egress.policy import build_policy
    from orchestrator.lifecycle import teardown
    from orchestrator.state import Phase, SandboxState
    from orchestrator.vm.domain import Accel

    def state(sinkhole: bool) -> SandboxState:
        return SandboxState(
            name="web", phase=Phase.READY, created="2026-12-06T00:00:00+00:00",
            uri="qemu+ssh://root@host/system", domain="sandbox-web", pool="sandbox",
            network="sandbox-web", volumes=(), image="php", image_hash="h", accel=Accel.TCG,
            mac="52:54:00:00:00:01", policy=build_policy([], sinkhole=sinkhole).to_dict(),
            remote_dir="/var/lib/libvirt/sandbox-records/web", remote_sinkhole_pid=123,
        )  # fmt: skip

    assert teardown._may_run(state(True), "sinkhole") and not teardown._may_run(
        state(False), "sinkhole"
    )
    assert teardown._may_run(None, "sinkhole")  # no state: a killed `up` may have started one
    again = SandboxState.from_json(state(True).to_json())
    assert again.remote_sinkhole_pid == 123

"""dnsmasq's query log: parsed from real logs (tests/data/), and written by a real libvirt network.

tests/data/dnsmasq-libvirt.log was written by libvirt's dnsmasq in the lab (network rendered by
domain.render_network, queries from a namespace bridged to it, IPv4 and IPv6);
tests/data/dnsmasq-vm.log by the same network's dnsmasq while a real sandbox VM resolved names;
tests/data/dnsmasq-standalone.log by dnsmasq 2.90 run by hand with the same options.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.capture.records import DnsQuery
from orchestrator.egress import dnslog
from orchestrator.vm.domain import NetworkSpec, render_network
from sandbox_lab import Lab, in_lab

from .conftest import Golden

DATA = Path(__file__).parent / "data"


def _parse(name: str) -> list[DnsQuery]:
    return dnslog.parse((DATA / name).read_text(), year=2026, tz=UTC)


@pytest.mark.parametrize(
    "name", ["dnsmasq-libvirt.log", "dnsmasq-vm.log", "dnsmasq-standalone.log"]
)
def test_real_logs_golden(golden: Golden, name: str) -> None:
    lines = "".join(q.to_json() + "\n" for q in _parse(name))
    golden.check(f"{name.removesuffix('.log')}.jsonl", lines)


def test_each_query_gets_its_own_answer_or_refusal() -> None:
    queries = _parse("dnsmasq-libvirt.log")
    guest = [q for q in queries if q.client == "192.168.214.50"]
    assert [(q.name, q.qtype, q.result) for q in guest] == [
        ("allowed.example", "A", "203.0.113.7"),
        ("allowed.example", "AAAA", "REFUSED"),
        ("blocked.example", "A", "REFUSED"),
        ("bare", "A", "NXDOMAIN"),
        ("allowed.example", "MX", "REFUSED"),
    ]
    v6 = [q for q in queries if q.client == "2001:db8:214::50"]
    assert [(q.name, q.qtype, q.result) for q in v6] == [
        ("allowed.example", "AAAA", "REFUSED"),
        ("evil.example", "TXT", "REFUSED"),
    ]
    assert guest[0].time == "2026-11-23T12:10:59.000Z"
    assert len({q.id for q in queries}) == len(queries)


def test_a_real_guests_queries() -> None:
    # dnsmasq-vm.log: a sandbox booted in the lab (`sandbox up`), then `sandbox exec` of PHP's
    # gethostbyname and dns_get_record and of getent, all names refused; DHCP lines in between.
    queries = _parse("dnsmasq-vm.log")
    assert {q.client for q in queries} == {"192.168.213.43"}
    assert [(q.name, q.qtype) for q in queries[:4]] == [
        ("exfil.example", "A"),
        ("exfil.example", "A"),
        ("leak.example", "TXT"),
        ("leak.example", "TXT"),
    ]
    assert {q.result for q in queries} == {"REFUSED"}


def test_an_ipv6_answer_is_an_address() -> None:
    queries = _parse("dnsmasq-standalone.log")
    answered = [q for q in queries if q.client == "2001:db8:213::150" and q.qtype == "AAAA"]
    assert answered[0].result == "2001:db8:1::9"
    assert answered[0].addresses() == ("2001:db8:1::9",)


def test_a_torn_last_line_is_not_read_as_an_answer() -> None:
    text = (DATA / "dnsmasq-standalone.log").read_text()
    whole = "\n".join(line for line in text.splitlines() if "exiting" not in line) + "\n"
    cut = whole[: whole.rindex("REFUSED") + 3]  # "... config error is REF"
    queries = dnslog.parse(cut, year=2026, tz=UTC)
    assert queries[-1].name == "evil.example"
    assert queries[-1].result == dnslog.UNANSWERED


# Lines written by hand in dnsmasq's format, for what the lab cannot produce here (a second
# dnsmasq process, a new year, several answers, CNAME chains, NODATA, single-digit days).
_SYNTHETIC = (DATA / "dnsmasq-synthetic.log").read_text()


def test_synthetic_cases() -> None:
    queries = dnslog.parse(_SYNTHETIC, year=2027, tz=UTC)
    results = [(q.name, q.result, q.time[:10]) for q in queries]
    assert results == [
        ("multi.example", "203.0.113.7, 203.0.113.8", "2026-12-31"),
        ("www.example", "203.0.113.7", "2027-01-01"),
        ("v4only.example", "NODATA", "2027-01-01"),
        ("again.example", "REFUSED", "2027-01-01"),
        ("ll.example", dnslog.UNANSWERED, "2027-01-01"),
    ]
    assert queries[4].client == "fe80::5054:ff:fea1:95c3"
    # Serial 1 of two dnsmasq processes: two queries, two ids.
    assert queries[0].id != queries[3].id


def test_local_times_are_stored_in_utc() -> None:
    line = (
        "Nov  3 08:00:00 dnsmasq[7]: 1 192.168.213.9/1000 query[A] a.example from 192.168.213.9\n"
    )
    (query,) = dnslog.parse(line, year=2026, tz=timezone(timedelta(hours=2)))
    assert query.time == "2026-11-03T06:00:00.000Z"


def test_select_by_client_and_since() -> None:
    queries = dnslog.parse(_SYNTHETIC, year=2027, tz=UTC)
    since = datetime(2027, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    chosen = dnslog.select(queries, ["192.168.213.9", "2001:db8:213::9"], since)
    # The query at 00:00:01 counts: the log has whole seconds.
    assert [q.name for q in chosen] == ["www.example", "v4only.example", "again.example"]
    assert dnslog.select(queries, ["192.168.213.10"], None) == []


def test_read_for_takes_the_year_from_the_file(tmp_path: Path) -> None:
    log = tmp_path / "net.queries.log"
    log.write_text((DATA / "dnsmasq-libvirt.log").read_text())
    stamp = datetime(2025, 12, 1, tzinfo=UTC).timestamp()
    os.utime(log, (stamp, stamp))
    found, _ = dnslog.read_for(log, ["192.168.214.50"], None)
    assert len(found) == 5
    assert all(q.time.startswith("2025-11-23T") for q in found)
    assert dnslog.read_for(tmp_path / "missing.log", ["192.168.214.50"], None)[0] == []


# ---- the real thing: libvirt's dnsmasq in the lab --------------------------------------------

_QUERY = """
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
family = socket.AF_INET6 if ":" in server else socket.AF_INET
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0\\0\\1\\0\\1"
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.sendto(struct.pack("!HHHHHH", 4242, 0x0100, 1, 0, 0, 0) + question, (server, 53))
    print(s.recv(512)[3] & 15)
"""


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.root
def test_libvirts_dnsmasq_logs_each_guest_query_at_the_spec_path(lab: Lab) -> None:
    import libvirt

    spec = NetworkSpec(
        name="sbx-dnslog-test",
        bridge="sbxdnslog0",
        subnet=ipaddress.IPv4Network("192.168.215.0/24"),
        subnet6=ipaddress.IPv6Network("2001:db8:215::/64"),
        dns_hosts=(("203.0.113.7", ("allowed.example",)),),
    )
    guest_ns, guest_v4, guest_v6 = "sbx-dnslog-guest", "192.168.215.50", "2001:db8:215::50"
    log = Path(spec.dns_log)
    log.unlink(missing_ok=True)
    since = datetime.now(UTC)
    conn = libvirt.open("qemu:///system")
    try:
        net = conn.networkCreateXML(render_network(spec))
        try:
            # A stand-in guest: a namespace on the network's bridge, like a VM's tap.
            _run(["ip", "netns", "add", guest_ns])
            try:
                _run(in_lab(lab, ["ip", "link", "add", "sbxdnslogh", "type", "veth", "peer",
                                  "name", "sbxdnslogg", "netns", guest_ns]))  # fmt: skip
                _run(in_lab(lab, ["ip", "link", "set", "sbxdnslogh", "master", spec.bridge, "up"]))
                for cmd in (
                    ["addr", "add", f"{guest_v4}/24", "dev", "sbxdnslogg"],
                    ["addr", "add", f"{guest_v6}/64", "dev", "sbxdnslogg", "nodad"],
                    ["link", "set", "sbxdnslogg", "up"],
                ):
                    _run(["ip", "-n", guest_ns, *cmd])
                asked = []
                for server, name in (
                    (str(spec.gateway), "allowed.example"),
                    (str(spec.gateway), "exfil.example"),
                    (str(spec.gateway6), "allowed.example"),
                ):
                    # The gateway's IPv6 address needs a moment for DAD once the bridge has a port.
                    deadline = time.monotonic() + 10
                    while True:
                        try:
                            rcode = _run(["ip", "netns", "exec", guest_ns, sys.executable, "-c",
                                          _QUERY, server, name])  # fmt: skip
                            break
                        except subprocess.CalledProcessError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.5)
                    asked.append(int(rcode))
                    if name == "exfil.example":
                        # Rotated (copied, emptied in place) between two queries: dnsmasq,
                        # running as nobody by now, goes on writing to the same file.
                        assert dnslog.rotate_if_large(log, limit=1)
            finally:
                subprocess.run(["ip", "netns", "del", guest_ns], check=False)
        finally:
            net.destroy()
        assert asked == [0, 5, 0]
        # dnsmasq wrote the file after dropping to nobody: the owner proves it kept the file open.
        assert log.stat().st_uid != 0
        # At the start of the emptied file (O_APPEND), not after a hole as large as before.
        assert not log.read_bytes().startswith(b"\0")
        rotated = log.with_name(log.name + ".1")
        found = dnslog.read_for(rotated, [guest_v4, guest_v6], since)[0]
        found += dnslog.read_for(log, [guest_v4, guest_v6], since)[0]
        assert [(q.client, q.name, q.qtype, q.result) for q in found] == [
            (guest_v4, "allowed.example", "A", "203.0.113.7"),
            (guest_v4, "exfil.example", "A", "REFUSED"),
            (guest_v6, "allowed.example", "A", "203.0.113.7"),
        ]
    finally:
        conn.close()
        log.unlink(missing_ok=True)
        log.with_name(log.name + ".1").unlink(missing_ok=True)


def test_read_new_reads_only_what_the_log_gained(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.queries.log"
    lines = (DATA / "dnsmasq-vm.log").read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    log.write_bytes(b"".join(lines[:half]) + lines[half][:10])  # a torn last line
    first, cursor = dnslog.read_new(log, dnslog.LogCursor())
    assert first.count("\n") == half  # whole lines only
    assert cursor.offset == sum(len(line) for line in lines[:half])
    with log.open("ab") as handle:
        handle.write(lines[half][10:] + b"".join(lines[half + 1 :]))
    second, cursor2 = dnslog.read_new(log, cursor)
    # From a little before the last end (the overlap), to the end; nothing read twice beyond it.
    assert second.endswith(lines[-1].decode())
    assert len(second.encode()) <= log.stat().st_size - cursor.offset + dnslog.OVERLAP
    assert cursor2.offset == log.stat().st_size
    again, cursor3 = dnslog.read_new(log, cursor2)
    assert cursor3 == cursor2 and len(again.encode()) <= dnslog.OVERLAP
    # The queries of both reads together are those of the whole log.
    whole = dnslog.parse(log.read_text(), year=2026)
    both = {q.id for q in dnslog.parse(first + second, year=2026)}
    assert {q.id for q in whole} <= both


def test_rotation_bounds_the_shared_log_and_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.queries.log"
    text = (DATA / "dnsmasq-vm.log").read_bytes()
    log.write_bytes(text)
    _, cursor = dnslog.read_new(log, dnslog.LogCursor())
    with log.open("ab") as handle:
        handle.write(text)  # more queries after the last read...
    inode = log.stat().st_ino
    assert dnslog.rotate_if_large(log, limit=len(text))  # ...then the log is rotated
    assert (tmp_path / "sandbox.queries.log.1").read_bytes() == text + text
    assert log.stat().st_size == 0 and log.stat().st_ino == inode  # emptied in place
    assert not dnslog.rotate_if_large(log, limit=1)  # nothing to rotate now
    with log.open("ab") as handle:  # dnsmasq goes on writing
        handle.write(text[:200].rsplit(b"\n", 1)[0] + b"\n")
    rest, after = dnslog.read_new(log, cursor)
    # The old file's rest (the second copy) and the new file's lines were both read.
    assert rest.count("\n") >= text.count(b"\n") and after.offset == log.stat().st_size


def test_a_damaged_cursor_is_a_fresh_start() -> None:
    assert dnslog.LogCursor.from_json("garbage") == dnslog.LogCursor()
    c = dnslog.LogCursor(42, "ab" * 32)
    assert dnslog.LogCursor.from_json(c.to_json()) == c
    # A cursor from before the tail digest: its offset stands, the size alone tells a rotation.
    assert dnslog.LogCursor.from_json('{"inode": 7, "offset": 42}') == dnslog.LogCursor(42)


def test_a_new_file_at_the_same_path_is_read_from_its_start(tmp_path: Path) -> None:
    """A network made again under the same name (or a recreated log) is told apart by content,
    not by inode (which SFTP does not give, and a freed one is reused), even when it is already
    longer than where the last read of the old one ended."""
    log = tmp_path / "sandbox.queries.log"
    text = (DATA / "dnsmasq-vm.log").read_bytes()
    log.write_bytes(text * 40)
    _, cursor = dnslog.read_new(log, dnslog.LogCursor())
    assert cursor.offset > 2 * dnslog.OVERLAP
    log.unlink()
    # Another dnsmasq's log, longer still.
    log.write_bytes(text.replace(b"[22794]", b"[31337]") * 80)
    again, after = dnslog.read_new(log, cursor)
    assert again.startswith("Nov 23 12:13:52 dnsmasq[31337]: started")
    assert len(again.encode()) == log.stat().st_size  # all of it
    assert after.offset == log.stat().st_size
    # The same file grown: read on from the cursor, not from the start.
    with log.open("ab") as handle:
        handle.write(text)
    more, _ = dnslog.read_new(log, after)
    assert more.endswith(text.decode()) and len(more.encode()) <= len(text) + dnslog.OVERLAP

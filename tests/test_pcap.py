"""Packet capture with tcpdump on a veth pair in a namespace of the test's own (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.capture.pcap import CaptureError, ring_files, start_pcap, stop_pcap

NETNS = "sbx-pcap-test"
PEER_NETNS = "sbx-pcap-peer"  # the far end of the veth, so that packets really cross it
_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.root


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    return None if shutil.which("tcpdump") else "tcpdump is not installed"


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    for ns in (NETNS, PEER_NETNS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for ns, cmd in (
            (NETNS, ["link", "add", "pcapa", "type", "veth", "peer", "name", "pcapb"]),
            (NETNS, ["link", "set", "pcapb", "netns", PEER_NETNS]),
            (NETNS, ["addr", "add", "192.0.2.1/24", "dev", "pcapa"]),
            (PEER_NETNS, ["addr", "add", "192.0.2.2/24", "dev", "pcapb"]),
            (NETNS, ["link", "set", "pcapa", "up"]),
            (PEER_NETNS, ["link", "set", "pcapb", "up"]),
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield NETNS
    finally:
        for ns in (NETNS, PEER_NETNS):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _running(pid: int) -> bool:
    # Once exited, tcpdump may stay a zombie until whoever inherited it reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _send(ns: str, payload: bytes, count: int = 1) -> None:
    # Datagrams leaving pcapa towards pcapb's address, in the other namespace.
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "[s.sendto(sys.argv[1].encode(), ('192.0.2.2', 9)) for _ in range(int(sys.argv[2]))]"
    )
    subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, payload.decode(), str(count)],
        check=True,
    )


def _start_in(ns: str, interface: str, path: Path) -> int:
    # start_pcap captures in the namespace it is called in, as `up` does in the lab.
    code = (
        "import sys; from orchestrator.capture.pcap import start_pcap as s; print(s(*sys.argv[1:]))"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, interface, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=_ROOT,
    ).stdout
    return int(out)


def test_capture_records_packets_on_the_interface(netns: str, tmp_path: Path) -> None:
    base = tmp_path / "logs" / "capture.pcap"
    capture = base.with_name("capture.pcap0")  # the ring's first file
    started = time.monotonic()
    pid = _start_in(netns, "pcapa", base)
    startup = time.monotonic() - started
    try:
        assert capture.exists()
        # A datagram leaving pcapa towards pcapb's address (a neighbour on the veth).
        _send(netns, b"sandbox-pcap-marker")
        # -U flushes each packet: the marker is in the file while tcpdump still runs.
        deadline = time.monotonic() + 10
        while b"sandbox-pcap-marker" not in capture.read_bytes():
            assert time.monotonic() < deadline, "the datagram never reached the capture file"
            time.sleep(0.1)
        # The last packets before the stop must not be lost in libpcap's ring buffer (they were,
        # without --immediate-mode: `destroy` right after an `exec` lost the exec's traffic).
        _send(netns, b"sandbox-pcap-last")
    finally:
        assert stop_pcap(pid) is True
    assert b"sandbox-pcap-last" in capture.read_bytes()
    assert not _running(pid)
    # The pcap magic (microsecond, little endian): a file every pcap reader opens.
    assert capture.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")
    assert startup < 10


def test_the_capture_is_a_bounded_ring(netns: str, tmp_path: Path) -> None:
    """A guest that sends without end fills at most files x file_mib: the oldest file goes."""
    base = tmp_path / "ring" / "capture.pcap"
    code = (
        "import sys; from orchestrator.capture.pcap import start_pcap as s; "
        "print(s(sys.argv[1], sys.argv[2], file_mib=1, files=2))"
    )
    pid = int(
        subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code, "pcapa", str(base)],
            capture_output=True, text=True, check=True, timeout=30, cwd=_ROOT,
        ).stdout
    )  # fmt: skip
    try:
        for _ in range(5):  # ~5 MB of datagrams through a 2 x 1 MB ring
            _send(netns, b"x" * 1400, count=800)
    finally:
        assert stop_pcap(pid) is True
    files = ring_files(base)
    assert [p.name for p in sorted(files)] == ["capture.pcap0", "capture.pcap1"]
    assert sum(p.stat().st_size for p in files) <= 2 * 1_000_000 + 4096


def test_a_missing_interface_fails_at_once_with_tcpdumps_reason(tmp_path: Path) -> None:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    with pytest.raises(CaptureError, match="sbx-no-such-if"):
        start_pcap("sbx-no-such-if", tmp_path / "capture.pcap")
    assert time.monotonic() - started < 5


def test_stop_leaves_anything_but_tcpdump_alone() -> None:
    # A stale pid in the state may be another process by now.
    assert stop_pcap(os.getpid()) is False
    assert stop_pcap(2**22 + 12345) is False

"""The host-side records on a remote libvirt host (capture/remotecapture.py): the command lines,
the fetch's bookkeeping, and the scripts run for real (root: tcpdump on a veth in namespaces of
the test's own, the "host" being this machine reached through HostFiles.run)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import paths
from orchestrator.capture import hostflows, pcap, remotecapture
from orchestrator.capture.remotecapture import (
    FLOWS,
    PCAP,
    Copy,
    RemoteCaptureError,
    Ring,
    resume_at,
)
from orchestrator.errors import UsageError
from orchestrator.state import Phase, SandboxState
from orchestrator.vm.domain import Accel
from orchestrator.vm.hostfiles import LocalFiles, Ran, Reader
from tests.test_pcap import PEER_NETNS, _unavailable, netns  # noqa: F401  # the fixture

# ---- pure parts --------------------------------------------------------------------------------


def test_each_sandbox_has_its_directory_under_the_root_and_nothing_else_is_accepted() -> None:
    assert remotecapture.directory("web") == "/var/lib/libvirt/sandbox-records/web"
    with pytest.raises(UsageError):
        remotecapture.directory("../etc")
    for bad in ("/", "/var/lib/libvirt", "/var/lib/libvirt/sandbox-records/a/b",
                "/var/lib/libvirt/sandbox-records/..", "/tmp/web"):  # fmt: skip
        with pytest.raises((RemoteCaptureError, UsageError)):
            remotecapture.remove_argv(bad)
        with pytest.raises((RemoteCaptureError, UsageError)):
            remotecapture.stop_argv(bad)
    assert remotecapture.remove_argv("/var/lib/libvirt/sandbox-records/web") == [
        "rm", "-rf", "--one-file-system", "--", "/var/lib/libvirt/sandbox-records/web",
    ]  # fmt: skip


def test_the_remote_tcpdumps_are_the_local_ones_with_the_hosts_paths() -> None:
    where = remotecapture.directory("web")
    assert remotecapture.flows_args("vnet-web", where) == hostflows.tcpdump_args(
        "vnet-web", Path(where) / hostflows.FILE_PREFIX, file_mib=8, files=4
    )
    assert remotecapture.pcap_args("vnet-web", where) == pcap.pcap_args(
        "vnet-web", Path(where) / paths.PCAP_FILE
    )
    argv = remotecapture.start_argv(where, FLOWS, ["-i", "vnet-web"])
    assert argv[:2] == ["sh", "-c"]
    assert argv[3:] == [
        "sh",
        where,
        f"{where}/host-flows.pcap.tcpdump.log",
        f"{where}/host-flows.pcap0",
        "-i",
        "vnet-web",
    ]
    # Pids are numbers or nothing: never text a shell could read as more.
    assert remotecapture.stop_argv(where, [12, 34])[3:] == ["sh", where, "12", "34"]


def test_the_rings_bound_each_file_by_what_tcpdump_writes_into_one() -> None:
    assert FLOWS.names() == [f"host-flows.pcap{i}" for i in range(4)]
    assert PCAP.names()[0] == "capture.pcap0" and len(PCAP.names()) == pcap.RING_FILES
    # -C counts millions of bytes; the file it leaves may hold one more packet.
    assert 8_000_000 < FLOWS.max_file_bytes < 8_000_000 + 300_000
    assert Ring("x", 1, 2).max_file_bytes == 1_000_000 + 16 + 262144


def test_only_the_rings_started_are_looked_for() -> None:
    assert remotecapture.rings_of(None) == (FLOWS,)
    assert remotecapture.rings_of(4321) == (FLOWS, PCAP)


@pytest.mark.parametrize(
    ("copy", "size", "head", "expected"),
    [
        (None, 100, b"A" * 64, 0),  # no copy yet
        (Copy(100, b"A" * 64), 100, b"A" * 64, None),  # whole
        (Copy(100, b"A" * 64), 250, b"A" * 64, 100),  # grown: the rest
        (Copy(100, b"A" * 64), 250, b"B" * 64, 0),  # reopened by tcpdump, written anew
        (Copy(100, b"A" * 64), 40, b"A" * 40, 0),  # shorter: rewritten
        (Copy(24, b"H" * 24), 500, b"H" * 24 + b"T" * 40, 24),  # the header only, then packets
        (Copy(0, b""), 10, b"0123456789", 0),
    ],
)
def test_resume_at(copy: Copy | None, size: int, head: bytes, expected: int | None) -> None:
    assert resume_at(copy, size, head) == expected


def test_the_state_keeps_the_remote_directory_and_pids() -> None:
    state = SandboxState(
        name="web", phase=Phase.READY, created="2026-12-06T00:00:00+00:00",
        uri="qemu+ssh://root@host/system", domain="sandbox-web", pool="sandbox",
        network="sandbox-web", volumes=(), image="php", image_hash="h", accel=Accel.TCG,
        mac="52:54:00:00:00:01", remote_dir="/var/lib/libvirt/sandbox-records/web",
        remote_flows_pid=123, remote_pcap_pid=456,
    )  # fmt: skip
    again = SandboxState.from_json(state.to_json())
    assert again == state
    assert (again.remote_dir, again.remote_flows_pid, again.remote_pcap_pid) == (
        "/var/lib/libvirt/sandbox-records/web",
        123,
        456,
    )
    # A state file from before: none of them.
    old = SandboxState.from_json(state.to_json().replace('"remote_', '"gone_'))
    assert old.remote_dir is None and old.remote_pcap_pid is None


# ---- the fetch's bookkeeping (this machine's files as the host's) ------------------------------


@dataclass
class _Counted:
    inner: Reader
    size: int
    files: Counting

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.inner.read_at(offset, length)
        self.files.read += len(data)
        return data


class Counting(LocalFiles):
    """This machine as the libvirt host, counting the bytes read from it."""

    where = "the test's host"

    def __init__(self) -> None:
        self.read = 0

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[Reader]:
        with super().open_read(path) as inner:
            yield _Counted(inner, inner.size, self)


@pytest.fixture
def host_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "host" / "sandbox-records"
    monkeypatch.setattr(remotecapture, "ROOT", str(root))
    return root


def test_fetch_copies_what_is_new_and_anew_what_was_rewritten(
    host_root: Path, tmp_path: Path
) -> None:
    where = host_root / "web"
    where.mkdir(parents=True)
    logs = tmp_path / "logs"
    ring = Ring("r.pcap", 1, 3)
    host = Counting()
    first = b"H" * 24 + b"packet-1" * 10
    (where / "r.pcap0").write_bytes(first)
    (where / "r.pcap0.tcpdump.log").write_text("not a ring file: never copied\n")
    fetched = remotecapture.fetch(host, str(where), logs, [ring])
    assert (logs / "r.pcap0").read_bytes() == first
    assert fetched.copied == len(first) and fetched.files == 1 and fetched.warnings == ()
    assert sorted(p.name for p in logs.iterdir()) == ["r.pcap0"]

    # Nothing new: only the first bytes are read, to compare.
    host.read = 0
    assert remotecapture.fetch(host, str(where), logs, [ring]).copied == 0
    assert host.read <= remotecapture.HEAD_BYTES

    # Grown: only the rest is read.
    more = b"packet-2" * 1000
    with (where / "r.pcap0").open("ab") as f:
        f.write(more)
    host.read = 0
    assert remotecapture.fetch(host, str(where), logs, [ring]).copied == len(more)
    assert host.read == remotecapture.HEAD_BYTES + len(more)
    assert (logs / "r.pcap0").read_bytes() == first + more

    # The ring came round: tcpdump reopened the file and wrote it anew, longer than before.
    rewritten = b"H" * 24 + b"packet-9" * 2000
    (where / "r.pcap0").write_bytes(rewritten)
    os.utime(where / "r.pcap0", (1_000_000_000, 1_000_000_000))
    remotecapture.fetch(host, str(where), logs, [ring])
    assert (logs / "r.pcap0").read_bytes() == rewritten
    # The ring's order is the files' times: the copy keeps the host's.
    assert (logs / "r.pcap0").stat().st_mtime == 1_000_000_000
    assert not list(logs.glob(".*"))  # no part file left


def test_fetch_reads_no_more_than_a_ring_file_can_hold(host_root: Path, tmp_path: Path) -> None:
    where = host_root / "web"
    where.mkdir(parents=True)
    ring = Ring("r.pcap", 1, 2)
    (where / "r.pcap1").write_bytes(b"x" * (ring.max_file_bytes + 5000))
    host = Counting()
    fetched = remotecapture.fetch(host, str(where), tmp_path / "logs", [ring])
    assert (tmp_path / "logs" / "r.pcap1").stat().st_size == ring.max_file_bytes
    assert host.read == remotecapture.HEAD_BYTES + ring.max_file_bytes
    assert len(fetched.warnings) == 1 and "more than tcpdump writes" in fetched.warnings[0]


def test_fetch_refuses_a_directory_that_is_not_ours(tmp_path: Path) -> None:
    with pytest.raises(RemoteCaptureError):
        remotecapture.fetch(LocalFiles(), str(tmp_path), tmp_path / "logs")


# ---- the scripts, for real -----------------------------------------------------------------


class InNamespace(LocalFiles):
    """This machine as the libvirt host, its programs run in the namespace of the interface."""

    where = "the test's host"

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        return super().run(["ip", "netns", "exec", self.ns, *argv], stdin)


def _send_to_pcapa(payload: bytes) -> None:
    # From the far end: what pcapa receives (the flow record keeps what the tap receives).
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.sendto(sys.argv[1].encode(), ('192.0.2.1', 9))"
    )
    subprocess.run(
        ["ip", "netns", "exec", PEER_NETNS, sys.executable, "-c", code, payload.decode()],
        check=True,
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.root
def test_start_fetch_stop_remove_on_a_host(
    netns: str,  # noqa: F811
    host_root: Path,
    tmp_path: Path,
) -> None:
    host = InNamespace(netns)
    where = str(host_root / "web")
    logs = tmp_path / "logs"
    flows = remotecapture.start(
        host, "pcapa", where, FLOWS, remotecapture.flows_args("pcapa", where)
    )
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert _alive(flows)
        captured = remotecapture.start(
            host, "pcapa", where, PCAP, remotecapture.pcap_args("pcapa", where)
        )
        assert (Path(where).stat().st_mode & 0o777) == 0o700
        _send_to_pcapa(b"sandbox-remote-marker")
        deadline = time.monotonic() + 10
        while True:
            remotecapture.fetch(host, where, logs)
            copy = logs / "capture.pcap0"
            if copy.exists() and b"sandbox-remote-marker" in copy.read_bytes():
                break
            assert time.monotonic() < deadline, "the datagram never reached the copies"
            time.sleep(0.2)
        # The local readers take the copies as they are.
        assert any(
            f.proto == "udp" and f.dst == "192.0.2.1" and f.dport == 9
            for f in hostflows.read_flows(logs)
        )
        # A pid that is not a tcpdump of ours is never signalled.
        stopped = remotecapture.stop(host, where, [bystander.pid])
        assert sorted(stopped) == sorted([flows, captured])
        assert bystander.poll() is None and not _alive(flows) and not _alive(captured)
        remotecapture.remove(host, where)
    finally:
        remotecapture.clear(host, where)
        bystander.kill()
        bystander.wait()
    assert not _alive(flows) and not Path(where).exists()


@pytest.mark.root
def test_a_start_that_fails_says_tcpdumps_reason_and_leaves_no_tcpdump(
    netns: str,  # noqa: F811
    host_root: Path,
) -> None:
    host = InNamespace(netns)
    where = str(host_root / "web")
    with pytest.raises(RemoteCaptureError) as caught:
        remotecapture.start(
            host, "nosuchdev", where, FLOWS, remotecapture.flows_args("nosuchdev", where)
        )
    assert "nosuchdev" in caught.value.message
    assert remotecapture.stop(host, where) == []
    remotecapture.remove(host, where)
    assert not Path(where).exists()


def test_stopping_where_nothing_runs_stops_nothing(host_root: Path) -> None:
    if _unavailable():
        pytest.skip(str(_unavailable()))
    assert remotecapture.stop(LocalFiles(), str(host_root / "web")) == []

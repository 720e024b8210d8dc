"""The sandbox network's DNS log read on a remote libvirt host over SFTP (orchestrator/vm/
hostfiles.py, through egress/dnslog.py).

The real tests build two network namespaces: the client (where the test's sockets live) and the
"libvirt host" with a real OpenSSH sshd, reached as `qemu+ssh://libvirt-host/system` names it
in ~/.ssh/config. The sshd shares this machine's files, so a temporary directory stands in for
/var/lib/libvirt/dnsmasq and the test checks on disk what the SFTP side did. `ip netns exec`
lays /etc/netns/NS/ over /etc for the sshd: that is how the "host" gets a time zone of its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from orchestrator import names, paths
from orchestrator.capture.records import DnsQuery
from orchestrator.config import Settings
from orchestrator.egress import dnslog
from orchestrator.errors import HostKeyMismatchError, HypervisorError
from orchestrator.lifecycle.context import Context
from orchestrator.state import Phase, SandboxState
from orchestrator.vm import hostfiles
from orchestrator.vm.domain import Accel, NetworkSpec
from orchestrator.vm.remoteuri import over_ssh
from tests.netns import inside

from .sshd_fixture import SSHD, Sshd, keygen, make_sshd

DATA = Path(__file__).parent / "data"
HOST_IP, CLIENT_IP = "192.0.2.2", "192.0.2.1"
HOST_PORT = 2222
HOST_ALIAS = "libvirt-host"
URI = f"qemu+ssh://{HOST_ALIAS}/system"
# Clients of dnsmasq-vm.log (a real sandbox VM's queries).
VM_CLIENTS = ("192.168.213.43",)
# The "libvirt host"'s zone: not this machine's (UTC here), and not a whole number of hours.
HOST_ZONE = "Asia/Kolkata"


# --- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "ssh"),
    [
        ("qemu:///system", False),
        ("test:///default", False),
        ("qemu+ssh://root@kvm1/system", True),
        ("qemu+libssh2://u@h/system", True),
        ("qemu+libssh://h/system", True),
        ("qemu+tcp://kvm2/system", False),
        ("qemu+tls://kvm3/system", False),
        ("qemu://kvm3/system", False),
    ],
)
def test_which_uris_reach_the_hosts_files_over_ssh(uri: str, ssh: bool) -> None:
    assert over_ssh(uri) is ssh


def test_a_remote_host_without_ssh_has_no_files_for_us() -> None:
    with (
        pytest.raises(hostfiles.NoHostFiles) as caught,
        hostfiles.on_host("qemu+tcp://kvm2.example/system"),
    ):
        pass
    assert "kvm2.example" in caught.value.message and "SSH" in caught.value.message
    assert caught.value.hint is not None and "qemu+ssh://USER@kvm2.example/system" in (
        caught.value.hint
    )


def test_a_local_hypervisors_files_are_this_machines() -> None:
    with hostfiles.on_host("qemu:///system") as files:
        assert files is hostfiles.LOCAL and files.timezone() is None


def test_a_host_without_ssh_says_so_with_every_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """collection: a qemu+tcp sandbox's logs say that its DNS queries were not recorded, also
    after destroy (the note is in its logs directory)."""
    from orchestrator.lifecycle import collection

    ctx, state = _remote_sandbox(tmp_path, monkeypatch, "qemu+tcp://kvm2.example/system")
    queries, warnings = collection._dns_queries(ctx, state)
    assert (queries, warnings) == ([], [])
    losses = collection.recorded_losses(ctx, state.name)
    assert len(losses) == 1
    assert losses[0].startswith("no DNS queries were recorded: qemu+tcp://kvm2.example/system")
    assert "qemu+ssh://USER@kvm2.example/system" in losses[0]


def _remote_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, dns_dir: Path | None = None
) -> tuple[Context, SandboxState]:
    """A Context and a ready sandbox's state on `uri`, with libvirt itself out of the way (the
    clients come from the state) and the network's log under `dns_dir`."""
    from orchestrator.lifecycle.context import network_of as real
    from orchestrator.vm import hypervisor

    def no_libvirt(uri: str) -> object:
        raise HypervisorError("no libvirt in this test")

    monkeypatch.setattr(hypervisor, "connection", no_libvirt)
    if dns_dir is not None:

        def network_of(state: SandboxState) -> NetworkSpec:
            spec = real(state)
            return NetworkSpec(spec.name, spec.bridge, spec.subnet, dns_log_dir=str(dns_dir))

        monkeypatch.setattr("orchestrator.lifecycle.collection.network_of", network_of)
    dirs = paths.Dirs(data=tmp_path / "data", state=tmp_path / "state", config=tmp_path / "cfg")
    state = SandboxState(
        name="remote1", phase=Phase.READY, created=datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        uri=uri, domain="sandbox-remote1", pool="sandbox", network="sbx-remote1", volumes=(),
        image="i", image_hash="h", accel=Accel.TCG, mac="52:54:00:00:00:01", ip=VM_CLIENTS[0],
        subnet="192.168.213.32/28",
    )  # fmt: skip
    return Context(settings=Settings(), dirs=dirs), state


# --- real: an sshd in a namespace as the libvirt host ------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@dataclass
class RemoteHost:
    client: str  # the test's namespace
    sshd: Sshd  # the "libvirt host"
    home: Path  # $HOME while the test runs
    dnsmasq_dir: Path  # stands in for /var/lib/libvirt/dnsmasq on the host

    def trust(self, public_line: str | None = None) -> None:
        fields = (public_line or self.sshd.host_key).split()
        line = f"[{HOST_IP}]:{HOST_PORT} {fields[0]} {fields[1]}\n"
        (self.home / ".ssh" / "known_hosts").write_text(line)

    @contextlib.contextmanager
    def files(self) -> Iterator[hostfiles.HostFiles]:
        """The host's files as collection reaches them: from the client namespace, by URI."""
        with inside(self.client), hostfiles.on_host(URI) as files:
            yield files

    def logins(self) -> int:
        return self.sshd.log.read_text().count("Accepted publickey")


def _root_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("ip", "ssh-keygen") if shutil.which(t) is None]
    missing += [str(p) for p in (SSHD, Path("/usr/lib/openssh/sftp-server")) if not p.exists()]
    return f"missing: {', '.join(missing)}" if missing else None


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RemoteHost]:
    reason = _root_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"sbxhf{os.getpid() % 100000}"
    client, host = f"{tag}-c", f"{tag}-h"
    made: list[str] = []
    server: Sshd | None = None
    etc = Path("/etc/netns") / host
    try:
        for ns in (client, host):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        sh("ip", "-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "h0",
           "netns", host)  # fmt: skip
        for ns, dev, address in ((client, "c0", f"{CLIENT_IP}/24"), (host, "h0", f"{HOST_IP}/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # The host's own /etc/localtime (ip netns exec binds /etc/netns/NS/* over /etc/*).
        etc.mkdir(parents=True)
        shutil.copyfile(Path("/usr/share/zoneinfo") / HOST_ZONE, etc / "localtime")
        server = make_sshd(tmp_path / "host", port=HOST_PORT, address=HOST_IP, netns=host)
        server.start()
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(
            f"Host {HOST_ALIAS}\n  HostName {HOST_IP}\n  Port {HOST_PORT}\n  User root\n"
            f"  IdentityFile {server.client_key}\n  GlobalKnownHostsFile /dev/null\n"
        )
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        dnsmasq_dir = tmp_path / "dnsmasq"
        dnsmasq_dir.mkdir()
        lab = RemoteHost(client, server, home, dnsmasq_dir)
        lab.trust()
        yield lab
    finally:
        if server is not None:
            server.stop()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=20)
        shutil.rmtree(etc, ignore_errors=True)


def _log(remote: RemoteHost, content: bytes = b"") -> Path:
    path = Path(NetworkSpec("sbx-remote1", "b", ipaddress.IPv4Network("192.0.2.0/28"),
                            dns_log_dir=str(remote.dnsmasq_dir)).dns_log)  # fmt: skip
    path.write_bytes(content)
    return path


@pytest.mark.root
def test_the_same_queries_as_reading_the_file_here(remote: RemoteHost) -> None:
    log = _log(remote, (DATA / "dnsmasq-vm.log").read_bytes())
    with remote.files() as files:
        far, far_cursor = dnslog.read_for(log, VM_CLIENTS, None, None, files)
    # The same file read here, in the host's zone: the same records, to the byte.
    text = log.read_text()
    near = dnslog.select(dnslog.parse(text, year=2026, tz=ZoneInfo(HOST_ZONE)), VM_CLIENTS, None)
    assert len(far) >= 5 and [q.to_json() for q in far] == [q.to_json() for q in near]
    assert far_cursor == dnslog.read_new(log, dnslog.LogCursor())[1]
    assert far_cursor.offset == log.stat().st_size
    # The host's zone, not this machine's (UTC): the same lines read as UTC are 5:30 later.
    as_utc = dnslog.select(dnslog.parse(text, year=2026, tz=UTC), VM_CLIENTS, None)
    assert _moment(as_utc[0]) - _moment(far[0]) == timedelta(hours=5, minutes=30)
    # One SSH login for the whole read.
    assert remote.logins() == 1


def _moment(query: DnsQuery) -> datetime:
    return datetime.fromisoformat(query.time.replace("Z", "+00:00"))


@pytest.mark.root
def test_the_cursor_goes_on_from_where_the_last_read_ended(remote: RemoteHost) -> None:
    lines = (DATA / "dnsmasq-vm.log").read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    log = _log(remote, b"".join(lines[:half]) + lines[half][:10])  # a torn last line
    with remote.files() as files:
        first, cursor = dnslog.read_new(log, dnslog.LogCursor(), files)
    assert first.count("\n") == half  # whole lines only
    assert cursor.offset == sum(len(line) for line in lines[:half])
    with log.open("ab") as handle:  # dnsmasq goes on writing
        handle.write(lines[half][10:] + b"".join(lines[half + 1 :]))
    with remote.files() as files:  # the next collection: a new connection
        second, cursor2 = dnslog.read_new(log, cursor, files)
        again, cursor3 = dnslog.read_new(log, cursor2, files)
    # From the overlap before the last end to the end; nothing before that read again.
    assert second.endswith(lines[-1].decode())
    assert len(second.encode()) <= log.stat().st_size - cursor.offset + dnslog.OVERLAP
    assert cursor2.offset == log.stat().st_size
    assert cursor3 == cursor2 and len(again.encode()) <= dnslog.OVERLAP
    whole = {q.id for q in dnslog.parse(log.read_text(), year=2026)}
    assert whole and whole <= {q.id for q in dnslog.parse(first + second, year=2026)}


@pytest.mark.root
def test_rotation_on_the_remote_host_loses_nothing(remote: RemoteHost) -> None:
    text = (DATA / "dnsmasq-vm.log").read_bytes()
    log = _log(remote, text)
    inode = log.stat().st_ino
    with remote.files() as files:
        _, cursor = dnslog.read_new(log, dnslog.LogCursor(), files)
        with log.open("ab") as handle:
            handle.write(text.replace(b"dnsmasq[", b"dnsmasq[9"))  # more, after the read
        assert dnslog.rotate_if_large(log, len(text), files, keep_from=cursor.offset)
        assert not dnslog.rotate_if_large(log, 1, files)  # emptied: nothing to rotate now
    # Copied beside it (what a reader from the cursor can still read), emptied in place.
    rotated = log.with_name(log.name + ".1")
    assert rotated.read_bytes().rstrip(b"\0").endswith(text.replace(b"dnsmasq[", b"dnsmasq[9"))
    assert log.stat().st_size == 0 and log.stat().st_ino == inode
    assert not log.with_name(log.name + ".1.tmp").exists()
    with log.open("ab") as handle:  # dnsmasq goes on writing at the new end
        handle.write(text.replace(b"dnsmasq[", b"dnsmasq[8"))
    with remote.files() as files:
        rest, after = dnslog.read_new(log, cursor, files)
    ids = {q.id for q in dnslog.parse(rest, year=2026)}
    # The old file's rest (from the copy) and the emptied file's new lines, both.
    assert any(i.startswith("d9") for i in ids) and any(i.startswith("d8") for i in ids)
    # Of what was read before the rotation, at most the overlap again.
    assert len(rest.encode()) <= dnslog.OVERLAP + len(text) + log.stat().st_size
    assert after.offset == log.stat().st_size


@pytest.mark.root
def test_a_flood_is_read_a_bounded_piece_at_a_time(
    remote: RemoteHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dnslog, "READ_MAX", 64 << 10)
    text = (DATA / "dnsmasq-vm.log").read_bytes()
    log = _log(remote, text * (2_000_000 // len(text)))  # ~2 MB: over 30 times the bound
    size = log.stat().st_size
    with remote.files() as files:
        chunk, cursor = dnslog.read_new(log, dnslog.LogCursor(), files)
        assert len(chunk.encode()) <= dnslog.READ_MAX
        assert 0 < cursor.offset <= dnslog.READ_MAX
        # The rotation copies only what a reader from the cursor can still read.
        assert dnslog.rotate_if_large(log, 1 << 20, files, keep_from=cursor.offset)
    rotated = log.with_name(log.name + ".1")
    assert rotated.stat().st_size <= dnslog.READ_MAX
    assert rotated.stat().st_blocks * 512 <= dnslog.READ_MAX + 8192
    assert log.stat().st_size == 0 and size > 30 * dnslog.READ_MAX
    # The next read finishes the copy's piece, at most READ_MAX more.
    with remote.files() as files:
        rest, after = dnslog.read_new(log, cursor, files)
    assert 0 < len(rest.encode()) <= dnslog.READ_MAX and after.offset == 0


@pytest.mark.root
def test_a_missing_log_is_no_queries_yet(remote: RemoteHost) -> None:
    log = _log(remote)
    log.unlink()
    with remote.files() as files:
        assert dnslog.read_for(log, VM_CLIENTS, None, None, files) == ([], dnslog.LogCursor())
        assert not dnslog.rotate_if_large(log, 0, files)
    assert remote.logins() == 1


@pytest.mark.root
def test_a_changed_host_key_is_refused_before_anything_is_read(
    remote: RemoteHost, tmp_path: Path
) -> None:
    log = _log(remote, (DATA / "dnsmasq-vm.log").read_bytes())
    remote.trust(keygen(tmp_path / "other", "other"))
    with pytest.raises(HostKeyMismatchError, match="changed") as caught, remote.files() as files:
        dnslog.read_for(log, VM_CLIENTS, None, None, files)
    assert caught.value.hint is not None and f"ssh-keygen -R [{HOST_IP}]:{HOST_PORT}" in (
        caught.value.hint
    )
    assert remote.logins() == 0 and "sftp" not in remote.sshd.log.read_text()


def _restart(remote: RemoteHost, sftp_options: str) -> None:
    remote.sshd.stop()
    remote.sshd.log.write_text("")  # the start waits for "Server listening" in it
    remote.sshd.sftp_options = sftp_options
    remote.sshd.start()


@pytest.mark.root
def test_permission_denied_names_the_host_the_user_and_the_access(
    remote: RemoteHost, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A host whose SFTP server refuses writes: rotation needs them, reading does not.
    _restart(remote, "-R")
    log = _log(remote, (DATA / "dnsmasq-vm.log").read_bytes())
    with remote.files() as files:
        queries, cursor = dnslog.read_for(log, VM_CLIENTS, None, None, files)
        assert queries and cursor.offset == log.stat().st_size
        with pytest.raises(dnslog.DnsLogError) as caught:
            dnslog.rotate_if_large(log, 1, files, keep_from=cursor.offset)
    message, hint = caught.value.message, caught.value.hint or ""
    assert f"permission denied writing {log}.1.tmp" in message
    assert f"the libvirt host root@{HOST_ALIAS}:{HOST_PORT}" in message
    assert "as root" in hint and "read and write access" in hint
    assert str(remote.dnsmasq_dir) in hint and f"qemu+ssh://root@{HOST_ALIAS}/system" in hint
    assert log.stat().st_size > 0  # not emptied: nothing was lost

    # Reading refused (open denied): the hint asks for read access.
    _restart(remote, "-P open")
    with remote.files() as files, pytest.raises(dnslog.DnsLogError) as denied:
        dnslog.read_for(log, VM_CLIENTS, None, None, files)
    assert f"permission denied reading {log}" in denied.value.message
    assert "needs read access" in (denied.value.hint or "")


@pytest.mark.root
def test_collection_reads_a_remote_sandboxs_queries_and_keeps_its_cursor(
    remote: RemoteHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring: a sandbox whose state names the remote URI gets its queries through its
    host; a second collection reads only what the log gained; a failure is a warning."""
    from orchestrator.lifecycle import collection
    from orchestrator.lifecycle.context import logs_dir

    ctx, state = _remote_sandbox(tmp_path, monkeypatch, URI, remote.dnsmasq_dir)
    logs = logs_dir(ctx, state.name)
    lines = (DATA / "dnsmasq-vm.log").read_bytes().splitlines(keepends=True)
    log = Path(NetworkSpec(state.network, "b", ipaddress.IPv4Network("192.0.2.0/28"),
                           dns_log_dir=str(remote.dnsmasq_dir)).dns_log)  # fmt: skip
    log.write_bytes(b"".join(lines[:30]))
    with inside(remote.client):
        first, warnings = collection._dns_queries(ctx, state)
        assert warnings == [] and first
        first_end = log.stat().st_size
        assert dnslog.LogCursor.load(logs / paths.DNS_CURSOR).offset == first_end
        with log.open("ab") as handle:
            handle.write(b"".join(lines[30:]))
        second, warnings = collection._dns_queries(ctx, state)
        assert warnings == []
    whole = dnslog.select(
        dnslog.parse(log.read_text(), year=2026, tz=ZoneInfo(HOST_ZONE)), [state.ip or ""], None
    )
    assert {q.id for q in first} | {q.id for q in second} == {q.id for q in whole}
    # The cursor is kept with the logs: the next collection goes on from the log's end.
    kept = dnslog.LogCursor.load(logs / paths.DNS_CURSOR)
    assert kept == dnslog.read_new(log, dnslog.LogCursor())[1] and kept.offset == log.stat().st_size
    assert collection.recorded_losses(ctx, state.name) == []

    remote.trust(keygen(tmp_path / "other", "other"))
    with inside(remote.client):
        none, warnings = collection._dns_queries(ctx, state)
    assert none == [] and len(warnings) == 1
    assert warnings[0].startswith("DNS queries not collected this time: the SSH host key")


@pytest.mark.root
def test_destroy_removes_the_log_on_the_remote_host(remote: RemoteHost) -> None:
    """The network's query log and its rotated copy go with the network, over SSH."""
    from orchestrator.lifecycle import resources

    log = _log(remote, b"x\n")
    copy = dnslog.rotated_copy(log)
    copy.write_bytes(b"y\n")
    network = log.name.removesuffix(".queries.log")
    # Not the test:/// driver's: it runs no dnsmasq, and the names may be a real sandbox's.
    resources._remove_on_host("test:///default", network, directory=str(remote.dnsmasq_dir))
    assert log.exists() and copy.exists()
    with inside(remote.client):
        resources._remove_on_host(URI, network, directory=str(remote.dnsmasq_dir))
    assert not log.exists() and not copy.exists()
    with inside(remote.client):  # nothing left to remove: no error either
        resources._remove_on_host(URI, network, directory=str(remote.dnsmasq_dir))


def _tables(remote: RemoteHost) -> str:
    assert remote.sshd.netns is not None
    return subprocess.run(
        ["ip", "netns", "exec", remote.sshd.netns, "nft", "list", "tables"],
        check=True, capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip


@pytest.mark.root
def test_the_input_guard_is_set_and_removed_on_the_remote_host(remote: RemoteHost) -> None:
    """Over the same SSH login as the host's files, in the host's own kernel (its namespace),
    not this machine's; removed with the network's log."""
    from orchestrator.egress import hostguard
    from orchestrator.lifecycle import resources

    bridge = "sbxtestguard0"
    table = names.guard_table(bridge)
    with remote.files() as host:
        hostguard.apply(bridge, host=host)
        assert hostguard.present(bridge, host=host)
    assert f"table inet {table}" in _tables(remote)
    assert not hostguard.present(bridge)  # this machine's kernel has none
    log = _log(remote, b"x\n")
    with inside(remote.client):
        resources._remove_on_host(
            URI, log.name.removesuffix(".queries.log"), bridge, str(remote.dnsmasq_dir)
        )
    assert f"table inet {table}" not in _tables(remote) and not log.exists()


@pytest.mark.root
def test_a_failed_nft_on_the_remote_host_names_it_and_what_it_needs(remote: RemoteHost) -> None:
    from orchestrator.egress import hostguard

    with remote.files() as host, pytest.raises(hostguard.GuardError) as caught:
        hostguard.apply("sbxtest-name-too-long!", host=host)  # nft refuses: > IFNAMSIZ
    assert "on the libvirt host" in caught.value.message
    assert caught.value.hint is not None and "root" in caught.value.hint


@pytest.mark.root
def test_a_program_run_on_the_remote_host(remote: RemoteHost) -> None:
    with remote.files() as host:
        ran = host.run(["sh", "-c", "cat; echo err >&2; exit 3"], "in\n")
        missing = host.run(["no-such-program-here"])
    assert (ran.status, ran.stdout, ran.stderr) == (3, "in\n", "err\n")
    assert missing.status == 127


@pytest.mark.root
def test_the_capture_copy_is_read_from_the_remote_host_as_here(remote: RemoteHost) -> None:
    """destroy's final collection from the host's copy of the guest's records: virtlogd's file
    and its rotations, over SFTP, byte for byte what reading them here gives."""
    from orchestrator.capture import monitor

    copy = remote.dnsmasq_dir / "sandbox-x-capture.log"
    copy.write_bytes(b"newest\n@@round 7 b\n")
    (remote.dnsmasq_dir / "sandbox-x-capture.log.0").write_bytes(b"middle\n")
    (remote.dnsmasq_dir / "sandbox-x-capture.log.1").write_bytes(b"oldest\n")
    here = monitor.read_stream(copy)
    assert here.startswith(b"oldest\nmiddle\nnewest")
    with remote.files() as files:
        assert monitor.read_stream(str(copy), files=files) == here
        assert monitor.read_stream(str(copy), limit=10, files=files) == here[-10:]
        assert monitor.stream_round(str(copy), files) == monitor.stream_round(copy) == (7, 0)
        assert monitor.stream_round(str(remote.dnsmasq_dir / "none.log"), files) is None

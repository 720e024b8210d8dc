"""The SSH edge against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from orchestrator.errors import (
    GuestError,
    HostKeyMismatchError,
    OutputTooLarge,
    TimeoutExpired,
    UsageError,
)
from orchestrator.vm.guest import (
    Guest,
    fingerprint,
    generate_ed25519,
    known_hosts_line,
    tcp_connect,
    wait_for_banner,
)
from orchestrator.waits import Deadline, wait_for

from .sshd_fixture import Sshd, SshdFactory, free_port, keygen, sshd, sshd_factory

__all__ = ["sshd", "sshd_factory"]  # fixtures, imported for pytest

pytestmark = pytest.mark.root


def deadline(seconds: float = 10) -> Deadline:
    return Deadline(seconds, "SSH to the test sshd", "look at sshd.log")


@pytest.fixture(scope="module")
def guest(sshd: Sshd) -> Iterator[Guest]:
    with Guest.connect(sshd.endpoint(), deadline()) as g:
        yield g


def ssh_keygen_fingerprint(path: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


# --- keys --------------------------------------------------------------------------------------


def test_generated_key_loads_in_paramiko_and_openssh(tmp_path: Path) -> None:
    pair = generate_ed25519("sandbox@test")
    assert pair.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, blob, comment = pair.public_line.split()
    assert (kind, comment) == ("ssh-ed25519", "sandbox@test")

    loaded = paramiko.Ed25519Key.from_private_key(io.StringIO(pair.private_openssh))
    assert loaded.get_base64() == blob

    private = tmp_path / "key"
    private.write_text(pair.private_openssh)
    private.chmod(0o600)
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert derived[:2] == [kind, blob]

    public = tmp_path / "key.pub"
    public.write_text(pair.public_line + "\n")
    assert fingerprint(pair.public_line) == ssh_keygen_fingerprint(public)
    assert fingerprint(pair.public_line) == loaded.fingerprint


def test_fingerprint_rejects_garbage() -> None:
    with pytest.raises(GuestError):
        fingerprint("ssh-ed25519 not-base64!")
    with pytest.raises(GuestError):
        # valid base64, but the blob names another key type
        fingerprint("ssh-rsa " + generate_ed25519("").public_line.split()[1])


def test_known_hosts_line_format() -> None:
    line = generate_ed25519("c").public_line
    kind, blob, _ = line.split()
    assert known_hosts_line("10.0.0.5", 22, line) == f"10.0.0.5 {kind} {blob}"
    assert known_hosts_line("127.0.0.1", 2222, line) == f"[127.0.0.1]:2222 {kind} {blob}"


def test_known_hosts_line_satisfies_openssh(sshd: Sshd, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line("127.0.0.1", sshd.port, sshd.host_key) + "\n")
    ssh = [
        "ssh", "-F", "none", "-i", str(sshd.client_key), "-p", str(sshd.port),
        "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", f"{sshd.user}@127.0.0.1", "echo", "ok",
    ]  # fmt: skip
    result = subprocess.run(ssh, capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "ok", result.stderr


# --- commands ----------------------------------------------------------------------------------


def test_exit_status_and_separate_streams(guest: Guest) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    assert guest.run("echo to-out; echo to-err >&2", stdout=out.append, stderr=err.append) == 0
    assert b"".join(out) == b"to-out\n"
    assert b"".join(err) == b"to-err\n"
    assert guest.run("exit 3") == 3
    assert guest.run(["sh", "-c", "exit 5"]) == 5


def test_sequence_commands_are_quoted(guest: Guest) -> None:
    assert guest.check(["printf", "%s|", "a b", "$HOME", "it's"]) == "a b|$HOME|it's|"


def test_output_streams_live(guest: Guest) -> None:
    start = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    status = guest.run(
        "printf first; sleep 1; printf second",
        stdout=lambda chunk: arrivals.append((time.monotonic() - start, chunk)),
    )
    ended = time.monotonic() - start
    assert status == 0
    assert b"".join(c for _, c in arrivals) == b"firstsecond"
    first_at = arrivals[0][0]
    assert arrivals[0][1].startswith(b"first")
    assert first_at < 0.6, f"first chunk after {first_at:.2f} s: buffered, not streamed"
    assert ended >= 1.0


def test_stdin(guest: Guest) -> None:
    assert guest.check("tr a-z A-Z", stdin=b"hello") == "HELLO"
    # More than the SSH window in both directions at once: stdin must be fed while output is
    # drained, or both sides wait for each other.
    big = bytes(range(256)) * 32768  # 8 MiB: above both sides' windows and buffers
    out: list[bytes] = []
    assert guest.run("cat", stdin=big, stdout=out.append, timeout=20) == 0
    assert b"".join(out) == big


def test_env(guest: Guest) -> None:
    value = "a b 'c' $HOME"
    out: list[bytes] = []
    guest.run('printf %s "$FOO"', env={"FOO": value}, stdout=out.append)
    assert b"".join(out).decode() == value
    out.clear()
    guest.run(["sh", "-c", 'printf %s "$BAR"'], env={"BAR": "x"}, stdout=out.append)
    assert b"".join(out) == b"x"
    with pytest.raises(GuestError):
        guest.run("true", env={"NOT-A-NAME": "x"})


def test_timeout(guest: Guest) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutExpired) as caught:
        guest.run("sleep 10", timeout=0.5)
    assert time.monotonic() - start < 2
    assert "sleep 10" in str(caught.value)
    assert guest.run("true") == 0  # the connection survives a timed-out command


def test_check(guest: Guest) -> None:
    assert guest.check("echo hi") == "hi\n"
    with pytest.raises(GuestError) as caught:
        guest.check("echo oops >&2; exit 4")
    message = str(caught.value)
    assert "exit status 4" in message
    assert "oops" in message
    assert "exit 4" in message
    assert caught.value.hint


def test_connection_drop_mid_command(sshd: Sshd) -> None:
    with Guest.connect(sshd.endpoint(), deadline()) as g:
        start = time.monotonic()
        out: list[bytes] = []
        with pytest.raises(GuestError, match="dropped") as caught:
            # The shell's parent is this session's sshd process: killing it cuts the connection.
            g.run("echo started; sleep 0.2; kill -9 $PPID; sleep 10", stdout=out.append)
        assert time.monotonic() - start < 5
        assert b"".join(out) == b"started\n"
        assert caught.value.hint
        with pytest.raises(GuestError):
            g.run("true")


# --- files -------------------------------------------------------------------------------------


def test_put_get_round_trip(guest: Guest, tmp_path: Path) -> None:
    remote_dir = guest.check("mktemp -d").strip()
    try:
        data = bytes(range(256)) * 1000
        guest.put_bytes(data, f"{remote_dir}/secret", mode=0o600)
        assert guest.check(["stat", "-c", "%a", f"{remote_dir}/secret"]).strip() == "600"

        local = tmp_path / "script.sh"
        local.write_text("#!/bin/sh\necho ran\n")
        guest.put(local, f"{remote_dir}/script.sh", mode=0o755)
        assert guest.check(f"{remote_dir}/script.sh") == "ran\n"

        back = tmp_path / "sub" / "secret"
        guest.get(f"{remote_dir}/secret", back)
        assert back.read_bytes() == data
        assert not [p for p in back.parent.iterdir() if p.name.startswith(".")]  # no temp left

        with pytest.raises(GuestError):
            guest.get(f"{remote_dir}/missing", tmp_path / "missing")
        assert not (tmp_path / "missing").exists()
        with pytest.raises(GuestError):
            guest.put_bytes(b"x", f"{remote_dir}/no/such/dir/file")
    finally:
        guest.run(["rm", "-rf", remote_dir])


# --- connecting --------------------------------------------------------------------------------


def test_pinned_host_key_mismatch_fails_fast(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    start = time.monotonic()
    with pytest.raises(HostKeyMismatchError) as caught:
        Guest.connect(sshd.endpoint(host_key=other), deadline(10))
    assert time.monotonic() - start < 2
    message = str(caught.value)
    assert ssh_keygen_fingerprint(tmp_path / "other_host_key.pub") in message  # expected
    assert fingerprint(sshd.host_key) in message  # presented
    assert caught.value.hint and "destroy" in caught.value.hint


def test_wrong_client_key_is_an_auth_error(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    start = time.monotonic()
    with pytest.raises(GuestError) as caught:
        Guest.connect(sshd.endpoint(client_key=tmp_path / "stranger"), deadline(10))
    assert not isinstance(caught.value, HostKeyMismatchError)
    assert time.monotonic() - start < 2
    assert "refused the SSH client key" in str(caught.value)
    assert caught.value.hint


def test_missing_client_key_file(sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="cannot load"):
        Guest.connect(sshd.endpoint(client_key=tmp_path / "nope"), deadline(10))


def test_closed_port_times_out_at_the_deadline(sshd: Sshd) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutExpired) as caught:
        Guest.connect(sshd.endpoint(port=free_port()), deadline(1))
    elapsed = time.monotonic() - start
    assert 1 <= elapsed < 2.5
    message = str(caught.value)
    assert "SSH to the test sshd" in message
    assert "ConnectionRefusedError" in message
    assert caught.value.hint == "look at sshd.log"


def test_connect_retries_until_sshd_starts(sshd_factory: SshdFactory) -> None:
    server = sshd_factory()
    starter = threading.Timer(1.5, server.start, kwargs={"wait": False})
    start = time.monotonic()
    starter.start()
    try:
        with Guest.connect(server.endpoint(), deadline(10)) as g:
            assert g.check("echo up") == "up\n"
    finally:
        starter.join()
    assert time.monotonic() - start >= 1.5


def test_connect_retries_while_a_forward_accepts_and_closes(sshd: Sshd) -> None:
    """Like QEMU's hostfwd while the guest boots: TCP is accepted, then closed without a banner."""

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    seen: list[int] = []

    def handle(conn: socket.socket, n: int) -> None:
        seen.append(n)
        if n < 3:
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", sshd.port))
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    with listener(handle) as port, Guest.connect(sshd.endpoint(port=port), deadline(10)) as g:
        assert g.check("echo through") == "through\n"
    assert len(seen) == 4  # three refused attempts, then the one that got through


def test_custom_socket_opener_is_used(sshd: Sshd) -> None:
    calls: list[tuple[str, int]] = []

    def opener(host: str, port: int, timeout: float) -> socket.socket:
        calls.append((host, port))
        return tcp_connect(host, port, timeout)

    with Guest.connect(sshd.endpoint(), deadline(), opener=opener) as g:
        assert g.run("true") == 0
    assert calls == [("127.0.0.1", sshd.port)]


def test_closed_guest_reports_closed(sshd: Sshd) -> None:
    g = Guest.connect(sshd.endpoint(), deadline())
    g.close()
    with pytest.raises(GuestError, match="closed"):
        g.run("true")


# --- banner ------------------------------------------------------------------------------------


@contextmanager
def listener(handle: Callable[[socket.socket, int], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1; `handle(conn, n)` serves the n-th connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        n = 0
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn, n), daemon=True).start()
            n += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in conns:
            conn.close()


def test_banner_after_early_closes_and_a_delay() -> None:
    def handle(conn: socket.socket, n: int) -> None:
        # Like QEMU's hostfwd before sshd runs: accept, then close at once.
        if n < 2:
            conn.close()
            return
        time.sleep(1)
        conn.sendall(b"a line some servers send first\r\nSSH-2.0-Fake_1.0\r\n")

    with listener(handle) as port:
        start = time.monotonic()
        assert wait_for_banner("127.0.0.1", port, deadline(5)) == "SSH-2.0-Fake_1.0"
        assert 1 <= time.monotonic() - start < 3


def test_banner_never_sent_times_out() -> None:
    with listener(lambda conn, n: None) as port:
        start = time.monotonic()
        with pytest.raises(TimeoutExpired, match="SSH banner"):
            wait_for_banner("127.0.0.1", port, deadline(1))
        assert 1 <= time.monotonic() - start < 2.5


def test_banner_from_real_sshd(sshd: Sshd) -> None:
    assert wait_for_banner("127.0.0.1", sshd.port, deadline(5)).startswith("SSH-2.0-OpenSSH")


# --- reverse tunnels ---------------------------------------------------------------------------
# sshd listens on 127.0.0.1 like the guest's loopback, so the test process stands in for a
# program in the guest by connecting to the forwarded port itself.


def echo(conn: socket.socket, n: int) -> None:
    with contextlib.suppress(OSError), conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def read_until_eof(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the peer sends until it closes; a timeout fails the test."""
    sock.settimeout(timeout)
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def read_exactly(sock: socket.socket, size: int, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    buffer = b""
    while len(buffer) < size:
        data = sock.recv(size - len(buffer))
        assert data, f"EOF after {len(buffer)} of {size} bytes"
        buffer += data
    return buffer


def tunnel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tunnel-")]


def test_reverse_forward_carries_bytes_both_ways(guest: Guest) -> None:
    with listener(echo) as host_port, guest.reverse_forward("127.0.0.1", host_port) as port:
        assert port > 0
        big = bytes(range(256)) * 8192  # 2 MiB: more than the SSH windows both ways
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello")
            assert read_exactly(conn, 5) == b"hello"
            sender = threading.Thread(target=conn.sendall, args=(big,))
            sender.start()
            assert read_exactly(conn, len(big), timeout=20) == big
            sender.join(5)


def test_reverse_forward_passes_eof_on_both_ways(guest: Guest) -> None:
    """A half-close travels through: the host side reads the request to EOF, then answers."""

    def answer(conn: socket.socket, n: int) -> None:
        with conn:
            request = read_until_eof(conn)
            conn.sendall(b"got " + request)

    with (
        listener(answer) as host_port,
        guest.reverse_forward("127.0.0.1", host_port) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(b"request")
        conn.shutdown(socket.SHUT_WR)
        assert read_until_eof(conn) == b"got request"


def test_reverse_forward_serves_several_connections(guest: Guest) -> None:
    with listener(echo) as host_port, guest.reverse_forward("127.0.0.1", host_port) as port:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        try:
            # All open at once, answered out of order.
            for i, conn in reversed(list(enumerate(conns))):
                conn.sendall(f"conn {i}".encode())
            for i, conn in enumerate(conns):
                assert read_exactly(conn, len(f"conn {i}")) == f"conn {i}".encode()
        finally:
            for conn in conns:
                conn.close()
        for i in range(3):  # and one after the other
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"again %d" % i)
                assert read_exactly(conn, 7) == b"again %d" % i


def test_reverse_forward_host_side_refusing(guest: Guest) -> None:
    nothing = free_port()
    messages: list[str] = []
    called = threading.Event()

    def refused(message: str) -> None:
        messages.append(message)
        called.set()

    with guest.reverse_forward("127.0.0.1", nothing, on_refused=refused) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert read_until_eof(conn) == b""  # the guest side sees the close
        assert called.wait(5)
        assert len(messages) == 1
        assert f"nothing is listening on 127.0.0.1:{nothing}" in messages[0]
        assert f"127.0.0.1:{port}" in messages[0]
        # Still listening: a debugger started later is reached.
        with (
            listener(echo) as host_port,
            guest.reverse_forward("127.0.0.1", host_port) as other,
            socket.create_connection(("127.0.0.1", other), timeout=5) as conn,
        ):
            conn.sendall(b"x")
            assert read_exactly(conn, 1) == b"x"
    assert len(messages) == 1


def test_reverse_forward_bound_frees_a_slot_when_a_connection_ends(guest: Guest) -> None:
    """Past the 8 live connections the extras are closed (reported once), yet the bound is on
    connections at once, not in total: a freed slot relays again."""
    messages: list[str] = []
    with (
        listener(echo) as host_port,
        guest.reverse_forward("127.0.0.1", host_port, on_refused=messages.append) as port,
    ):
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        try:
            for i, conn in enumerate(conns):
                conn.sendall(b"%d" % i)
                assert read_exactly(conn, 1) == b"%d" % i  # all 8 relayed
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                    extra.sendall(b"x")
                    assert read_until_eof(extra) == b""  # closed without reaching the host
            assert len(messages) == 1
            assert "more than 8 connections at once" in messages[0]
            conns.pop().close()
            deadline = Deadline(10, "a freed tunnel slot")
            while True:  # the freed slot comes back once the relay has noticed the close
                with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
                    again.sendall(b"y")
                    again.settimeout(5)
                    if again.recv(1) == b"y":
                        break
                assert not deadline.expired(), "the freed slot never came back"
                time.sleep(0.1)
        finally:
            for conn in conns:
                conn.close()


def test_reverse_forward_exit_cancels_and_closes(guest: Guest) -> None:
    with listener(echo) as host_port:
        with guest.reverse_forward("127.0.0.1", host_port) as port:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"open")
            assert read_exactly(conn, 4) == b"open"
            assert tunnel_threads()
            start = time.monotonic()
        assert time.monotonic() - start < 2
        with conn:
            assert read_until_eof(conn) == b""  # the open connection was closed
        assert not tunnel_threads()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_reverse_forwards_side_by_side(guest: Guest) -> None:
    def tagged(tag: bytes) -> Callable[[socket.socket, int], None]:
        def handle(conn: socket.socket, n: int) -> None:
            with conn:
                conn.sendall(tag)

        return handle

    with (
        listener(tagged(b"A")) as port_a,
        listener(tagged(b"B")) as port_b,
        guest.reverse_forward("127.0.0.1", port_a) as guest_a,
    ):
        with guest.reverse_forward("127.0.0.1", port_b) as guest_b:
            for port, tag in [(guest_a, b"A"), (guest_b, b"B"), (guest_a, b"A")]:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    assert read_until_eof(conn) == tag
        # Closing B left A's listener and routing intact.
        with socket.create_connection(("127.0.0.1", guest_a), timeout=5) as conn:
            assert read_until_eof(conn) == b"A"


def test_reverse_forward_fixed_port_and_port_taken(guest: Guest, sshd: Sshd) -> None:
    wanted = free_port()
    with listener(echo) as host_port:
        with guest.reverse_forward("127.0.0.1", host_port, remote_port=wanted) as port:
            assert port == wanted
        with (
            pytest.raises(GuestError) as caught,
            guest.reverse_forward("127.0.0.1", host_port, remote_port=sshd.port),
        ):
            pass
    assert "refused to listen on 127.0.0.1:" in str(caught.value)
    assert caught.value.hint and "AllowTcpForwarding" in caught.value.hint


def test_reverse_forward_on_a_closed_guest(sshd: Sshd) -> None:
    g = Guest.connect(sshd.endpoint(), deadline())
    g.close()
    with pytest.raises(GuestError, match="closed"), g.reverse_forward("127.0.0.1", 1):
        pass


def test_reverse_forward_survives_the_connection_dropping(sshd: Sshd) -> None:
    with listener(echo) as host_port, Guest.connect(sshd.endpoint(), deadline()) as g:
        with g.reverse_forward("127.0.0.1", host_port) as port:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"x")
            assert read_exactly(conn, 1) == b"x"
            g.close()
            with conn:
                assert read_until_eof(conn) == b""
        assert not tunnel_threads()


# --- what the host takes from a hostile guest is bounded ------------------------------------


def test_get_refuses_a_file_over_the_limit_whatever_size_it_claims(
    guest: Guest, tmp_path: Path
) -> None:
    remote_dir = guest.check("mktemp -d").strip()
    try:
        # A sparse terabyte: the guest's stat says so, and it is refused before any byte moves.
        guest.check(["truncate", "-s", "1T", f"{remote_dir}/huge"])
        with pytest.raises(OutputTooLarge, match="more than the limit"):
            guest.get(f"{remote_dir}/huge", tmp_path / "huge", limit=1 << 20)
        # A file that grows while it is read (a FIFO-like lie: stat says 0) stops at the limit.
        guest.check(["sh", "-c", f"head -c 3000000 /dev/zero > {remote_dir}/big"])
        with pytest.raises(OutputTooLarge):
            guest.get(f"{remote_dir}/big", tmp_path / "big", limit=1 << 20)
        assert guest.get(f"{remote_dir}/big", tmp_path / "ok", limit=3000000) == 3000000
        assert (tmp_path / "ok").stat().st_size == 3000000
        # Nothing half-written is left behind by a refusal.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
    finally:
        guest.run(["rm", "-rf", remote_dir])


def test_check_bounds_what_it_buffers(guest: Guest) -> None:
    with pytest.raises(OutputTooLarge, match="more than 1 MiB"):
        guest.check(["head", "-c", "5000000", "/dev/zero"], limit=1 << 20)
    # stderr of a failing command: only its tail is kept in the message.
    with pytest.raises(GuestError) as info:
        guest.check(
            ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 3"]
        )
    assert info.value.message.endswith("END") and len(info.value.message) < 3000
    # The connection is still good for the next command.
    assert guest.check(["echo", "ok"]) == "ok\n"


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_reverse_forward_admits_a_bounded_number_of_connections(guest: Guest) -> None:
    messages: list[str] = []
    hold = threading.Event()

    def held(conn: socket.socket, n: int) -> None:
        hold.wait(60)
        conn.close()

    with (
        listener(held) as host_port,
        guest.reverse_forward("127.0.0.1", host_port, on_refused=messages.append) as port,
    ):
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
        try:
            # Over the bound, the extra connections are closed at once by the tunnel.
            time.sleep(2)
            closed = [c for c in conns if closed_within(c, 0.2)]
            assert len(closed) == 12 - 8, len(closed)
            assert len(messages) == 1 and "more than 8 connections" in messages[0]
        finally:
            hold.set()
            for c in conns:
                c.close()


# --- local forwards (sandbox serve) ----------------------------------------------------------
# The "guest service" is a listener on 127.0.0.1, which the guest's sshd (on this machine) reaches
# as its own loopback.


def test_local_forward_carries_bytes_both_ways_and_passes_eof(guest: Guest) -> None:
    def answer(conn: socket.socket, n: int) -> None:
        with conn:
            request = read_until_eof(conn)
            conn.sendall(b"got " + request)

    with listener(echo) as service, guest.local_forward("127.0.0.1", 0, service) as port:
        assert port > 0
        big = bytes(range(256)) * 8192  # 2 MiB: more than the SSH windows both ways
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            sender = threading.Thread(target=conn.sendall, args=(big,))
            sender.start()
            assert read_exactly(conn, len(big), timeout=20) == big
            sender.join(5)
    with (
        listener(answer) as service,
        guest.local_forward("127.0.0.1", 0, service) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        conn.shutdown(socket.SHUT_WR)
        assert read_until_eof(conn) == b"got GET / HTTP/1.0\r\n\r\n"


def test_local_forward_to_nothing_closes_the_client_and_keeps_serving(guest: Guest) -> None:
    unused = free_port()
    with guest.local_forward("127.0.0.1", 0, unused) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert read_until_eof(conn) == b""  # sshd refused the channel: closed, no hang
        # The same forward works once something listens there.
        server = socket.create_server(("127.0.0.1", unused))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                accepted, _ = server.accept()
                with accepted:
                    accepted.sendall(b"late")
                    assert read_exactly(conn, 4) == b"late"
        finally:
            server.close()
    assert guest.check(["true"]) == ""  # the management session is unharmed


def test_local_forward_bounds_connections_and_closes_on_exit(guest: Guest) -> None:
    releases = [threading.Event() for _ in range(5)]
    served: list[int] = []

    def held(conn: socket.socket, n: int) -> None:
        served.append(n)
        releases[n].wait(60)
        conn.close()

    with (
        listener(held) as service,
        guest.local_forward("127.0.0.1", 0, service, max_links=3) as port,
    ):
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        # Connections past the bound wait in the backlog instead of reaching the guest.
        wait_for(lambda: True if len(served) >= 3 else None, deadline(10))
        time.sleep(0.5)
        assert len(served) == 3
        # The service ends one and its client closes: the slot goes to a waiting connection.
        releases[0].set()
        assert read_until_eof(conns[0]) == b""
        conns[0].close()
        wait_for(lambda: True if len(served) >= 4 else None, deadline(10))
    # On exit every open connection is closed (one still in the listen backlog is reset), none
    # left hanging, and the port no longer listens.
    try:
        for conn in conns[1:]:
            with contextlib.suppress(ConnectionResetError):
                assert read_until_eof(conn) == b""
    finally:
        for release in releases:
            release.set()
        for conn in conns:
            conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_local_forward_port_taken_is_a_usage_error(guest: Guest) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with (
            pytest.raises(UsageError, match=r"cannot listen on 127\.0\.0\.1"),
            guest.local_forward("127.0.0.1", taken.getsockname()[1], 1),
        ):
            pass
    finally:
        taken.close()


def test_a_guest_that_stops_answering_is_detected(guest: Guest) -> None:
    """Keepalives keep data in flight and TCP_USER_TIMEOUT drops a connection the guest no
    longer acknowledges: a hung guest ends a command with an error instead of a hang."""
    transport = guest.transport
    sock = transport.sock
    assert isinstance(sock, socket.socket)
    timeout_ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert 0 < timeout_ms <= 120_000


def test_no_route_to_the_guest_ends_the_wait_within_seconds() -> None:
    """No route to the guest's network (libvirt elsewhere): said at once, not at the deadline."""

    def no_route(host: str, port: int, timeout: float) -> socket.socket:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    start = time.monotonic()
    with pytest.raises(GuestError, match="no route to its network") as caught:
        wait_for_banner("192.0.2.1", 22, deadline(60), opener=no_route, no_route_seconds=0.5)
    assert time.monotonic() - start < 3
    assert "where libvirtd runs" in str(caught.value.hint)


def test_a_route_that_comes_back_is_waited_for() -> None:
    """A route missing for a moment (an interface coming up) does not end the wait."""
    failures = iter([errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETUNREACH])

    def opener(host: str, port: int, timeout: float) -> socket.socket:
        code = next(failures, None)
        if code is not None:
            raise OSError(code, os.strerror(code))
        return socket.create_connection((host, port), timeout)

    with listener(lambda conn, n: conn.sendall(b"SSH-2.0-Fake_1.0\r\n")) as port:
        assert (
            wait_for_banner("127.0.0.1", port, deadline(10), opener=opener, no_route_seconds=0.05)
            == "SSH-2.0-Fake_1.0"
        )

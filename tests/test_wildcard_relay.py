"""The wildcard resolver's relay on a remote libvirt host (egress/wildcard_relay.py, the
standalone program; egress/remoterelay.py, the client's side): the frames, and the program run
for real on this machine: `serve` as root (it gives up root to nobody) in a directory of the
test's, `attach` as the client's SSH exec command would run it, and start/stop through
HostFiles with this machine as the host."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.capture import remotecapture
from orchestrator.egress import remoterelay
from orchestrator.egress import wildcard_relay as relay_program
from orchestrator.egress.remoterelay import (
    FRAME,
    MAX_PAYLOAD,
    Decoder,
    RelayFrameError,
    RemoteRelayError,
    encode,
)
from orchestrator.errors import UsageError
from orchestrator.vm.hostfiles import LOCAL, LocalFiles, Ran
from tests.standalone import assert_standalone
from tests.test_remotecapture import _alive

PROGRAM = Path(relay_program.__file__)
WAIT = 10.0  # seconds: for what must happen (a loaded machine is slow)
QUIET = 0.5  # seconds: for what must not happen

# ---- the program's text ----------------------------------------------------------------------


def test_the_program_imports_the_standard_library_alone() -> None:
    assert_standalone(PROGRAM)
    # What the client writes to the host is this file.
    assert remoterelay.program_text() == PROGRAM.read_text()


# ---- frames (pure) ---------------------------------------------------------------------------


def test_a_frame_is_a_length_and_a_tag_then_the_payload() -> None:
    assert FRAME.format == "!HI" and FRAME.size == 6
    assert encode(0x01020304, b"abc") == b"\x00\x03\x01\x02\x03\x04abc"
    assert encode(0xFFFFFFFF, b"") == b"\x00\x00\xff\xff\xff\xff"
    assert len(encode(7, b"x" * MAX_PAYLOAD)) == 6 + MAX_PAYLOAD
    for tag, payload in ((-1, b""), (1 << 32, b""), (1, b"x" * (MAX_PAYLOAD + 1))):
        with pytest.raises(ValueError):
            encode(tag, payload)


def test_the_decoder_takes_frames_in_any_pieces() -> None:
    frames = [(1, b"query one"), (0xFFFFFFFF, b""), (2, bytes(range(256)) * 16)]
    stream = b"".join(encode(t, p) for t, p in frames)
    for piece in (1, 5, 6, 7, 4096, len(stream)):
        decoder = Decoder()
        got: list[tuple[int, bytes]] = []
        for at in range(0, len(stream), piece):
            got += decoder.feed(stream[at : at + piece])
        assert got == frames, piece
        assert decoder.pending == 0
    # Half a frame is held, not returned; what it holds is never more than one frame.
    decoder = Decoder()
    assert decoder.feed(stream[:10]) == [] and decoder.pending == 10
    assert decoder.feed(stream[10:]) == frames


def test_the_decoder_refuses_a_header_over_the_bound() -> None:
    decoder = Decoder()
    good = encode(3, b"ok")
    with pytest.raises(RelayFrameError) as caught:
        decoder.feed(good + struct.pack("!HI", MAX_PAYLOAD + 1, 4))
    assert str(MAX_PAYLOAD + 1) in caught.value.message and caught.value.hint
    # The header alone is enough to tell: no waiting for 65535 bytes that will not be a frame.
    with pytest.raises(RelayFrameError):
        Decoder().feed(b"\xff\xff\x00\x00\x00\x01")
    assert Decoder().feed(b"\x10\x00\x00\x00") == []  # not yet a header


# ---- the program, for real -------------------------------------------------------------------


def _deadline_read(fd: int, deadline: float) -> bytes | None:
    """Some bytes from `fd` before `deadline`; b"" at its end; None if nothing came."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        return None
    return os.read(fd, 65536)


@dataclass
class Client:
    """An `attach` of the relay, run as the client runs it over SSH: stdin and stdout pipes."""

    proc: subprocess.Popen[bytes]
    decoder: Decoder

    def frames(self, want: int, seconds: float = WAIT) -> list[tuple[int, bytes]]:
        """Frames until `want` have come, or `seconds` passed, or the stream ended."""
        assert self.proc.stdout is not None
        got: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + seconds
        while len(got) < want:
            data = _deadline_read(self.proc.stdout.fileno(), deadline)
            if not data:
                break
            got += self.decoder.feed(data)
        return got

    def frame(self) -> tuple[int, bytes]:
        got = self.frames(1)
        assert got, "no frame came from the relay"
        return got[0]

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def ended(self) -> bool:
        """Whether the relay closed this client: its stdout ends, and it exits 0."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while (data := _deadline_read(self.proc.stdout.fileno(), deadline)) is not None:
            if data == b"":
                return self.proc.wait(WAIT) == 0
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Relay:
    """A running relay: its UDP port and unix socket, and the clients the test attached."""

    port: int
    socket: Path
    clients: list[Client]

    def attach(self, argv: Sequence[str] | None = None) -> Client:
        argv = argv or [sys.executable, str(PROGRAM), "attach", "--socket", str(self.socket)]
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        client = Client(proc, Decoder())
        self.clients.append(client)
        return client

    def attached(self, argv: Sequence[str] | None = None) -> Client:
        """A client the relay has taken, with nothing pending. Until the relay accepts the
        connection its queries are dropped: numbered probes until the latest one comes through,
        every probe answered. The relay takes one socket's datagrams in order, and the client's
        frames in order: once the latest probe's answer is back, every earlier one was taken."""
        client = self.attach(argv)
        with _sender() as probe:
            deadline = time.monotonic() + WAIT
            for n in range(1 << 30):
                assert time.monotonic() < deadline, "the relay never took the client"
                latest = b"probe %d" % n
                probe.sendto(latest, ("127.0.0.1", self.port))
                got = client.frames(1, 0.2)
                for tag, payload in got:
                    assert payload.startswith(b"probe "), payload
                    client.send(encode(tag, payload + b" answered"))
                if got and got[-1][1] == latest:
                    break
            while (answer := _answer(probe)) != latest + b" answered":
                assert answer is not None and answer.endswith(b" answered"), answer
        return client


@contextlib.contextmanager
def _sender() -> Iterator[socket.socket]:
    """A UDP socket on the loopback, as dnsmasq's to the relay."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def _answer(sock: socket.socket, seconds: float = WAIT) -> bytes | None:
    """The datagram `sock` receives within `seconds`, if any."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None


@dataclass
class Served(Relay):
    """A relay the test runs itself (`serve`), not through HostFiles."""

    proc: subprocess.Popen[str]


def _serve(where: Path, *options: str) -> Served:
    sock = where / "relay.sock"
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAM), "serve", "--socket", str(sock), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WAIT)
    line = proc.stdout.readline() if ready else ""
    assert line.startswith("listening "), (line, proc.poll())
    return Served(int(line.split()[1]), sock, [], proc)


@pytest.fixture
def relay_options() -> tuple[str, ...]:
    return ()


@pytest.fixture
def relay(tmp_path: Path, relay_options: tuple[str, ...]) -> Iterator[Served]:
    served = _serve(tmp_path, *relay_options)
    try:
        yield served
    finally:
        for client in served.clients:
            client.close()
        served.proc.kill()
        served.proc.wait()
        for stream in (served.proc.stdout, served.proc.stderr):
            if stream is not None:
                stream.close()


def test_a_query_goes_to_the_client_and_its_answer_to_the_sender(relay: Served) -> None:
    status = Path(f"/proc/{relay.proc.pid}/status").read_text()
    if os.geteuid() == 0:
        assert "\nUid:\t65534\t" in status  # no longer root once it holds its sockets
    assert relay.socket.is_socket() and (relay.socket.stat().st_mode & 0o777) == 0o600
    client = relay.attached()
    with _sender() as one, _sender() as two:
        one.sendto(b"\x12\x34query one", ("127.0.0.1", relay.port))
        first = client.frame()
        two.sendto(b"query two", ("127.0.0.1", relay.port))
        second = client.frame()
        assert (first[1], second[1]) == (b"\x12\x34query one", b"query two")
        assert first[0] != second[0]
        # Answered out of order: each answer goes to its own query's sender.
        client.send(encode(second[0], b"answer two") + encode(first[0], b"answer one"))
        assert _answer(two) == b"answer two"
        assert _answer(one) == b"answer one"
        # Answered: the tag is forgotten, a second answer goes nowhere.
        client.send(encode(first[0], b"again"))
        assert _answer(one, QUIET) is None
        # The biggest query there is passes whole; a bigger one is dropped, not cut.
        one.sendto(b"q" * MAX_PAYLOAD, ("127.0.0.1", relay.port))
        assert client.frame()[1] == b"q" * MAX_PAYLOAD
        one.sendto(b"q" * (MAX_PAYLOAD + 1), ("127.0.0.1", relay.port))
        assert client.frames(1, QUIET) == []


def test_without_a_client_a_query_is_dropped(relay: Served) -> None:
    with _sender() as sender:
        sender.sendto(b"nobody listens", ("127.0.0.1", relay.port))
        time.sleep(QUIET)
        client = relay.attached()  # its first frame is a probe, not the earlier query
        assert _answer(sender, QUIET) is None
        assert client.frames(1, QUIET) == []


@pytest.mark.parametrize("relay_options", [("--max-pending", "2")])
def test_the_pending_queries_are_bounded(relay: Served) -> None:
    client = relay.attached()
    with _sender() as sender:
        for n in range(3):
            sender.sendto(b"query %d" % n, ("127.0.0.1", relay.port))
        got = client.frames(3, QUIET * 2)
        assert [payload for _, payload in got] == [b"query 0", b"query 1"]
        # An answer frees a place.
        client.send(encode(got[0][0], b"answer 0"))
        assert _answer(sender) == b"answer 0"
        sender.sendto(b"query 3", ("127.0.0.1", relay.port))
        assert client.frame()[1] == b"query 3"


@pytest.mark.parametrize("relay_options", [("--max-pending", "1", "--answer-seconds", "1")])
def test_an_unanswered_query_expires(relay: Served) -> None:
    client = relay.attached()
    with _sender() as sender:
        sender.sendto(b"slow", ("127.0.0.1", relay.port))
        slow, _ = client.frame()
        time.sleep(1.5)
        # Its place is free again (the only one there is)...
        sender.sendto(b"next", ("127.0.0.1", relay.port))
        tag, payload = client.frame()
        assert payload == b"next"
        # ...and its answer, too late, goes nowhere (the relay sends its answers in order).
        client.send(encode(slow, b"late answer") + encode(tag, b"in time"))
        assert _answer(sender) == b"in time"
        assert _answer(sender, QUIET) is None


def test_an_empty_answer_forgets_the_tag_and_an_unknown_tag_is_ignored(relay: Served) -> None:
    client = relay.attached()
    with _sender() as sender:
        sender.sendto(b"query", ("127.0.0.1", relay.port))
        tag, _ = client.frame()
        client.send(encode(tag, b""))
        client.send(encode(tag, b"after forgetting"))
        client.send(encode(tag ^ 0x5A5A5A5A, b"unknown tag"))
        assert _answer(sender, QUIET) is None
        # The client is still the relay's: the next query comes to it and is answered.
        sender.sendto(b"more", ("127.0.0.1", relay.port))
        tag, payload = client.frame()
        assert payload == b"more"
        client.send(encode(tag, b"answer"))
        assert _answer(sender) == b"answer"


def test_a_malformed_frame_closes_the_client_and_a_new_one_is_taken(relay: Served) -> None:
    client = relay.attached()
    with _sender() as sender:
        sender.sendto(b"query", ("127.0.0.1", relay.port))
        tag, _ = client.frame()
        client.send(struct.pack("!HI", MAX_PAYLOAD + 1, tag) + b"x" * 16)
        assert client.ended()
        assert _answer(sender, QUIET) is None
        fresh = relay.attached()
        sender.sendto(b"again", ("127.0.0.1", relay.port))
        tag, payload = fresh.frame()
        assert payload == b"again"
        fresh.send(encode(tag, b"answer"))
        assert _answer(sender) == b"answer"


def test_a_second_client_replaces_the_first(relay: Served) -> None:
    first = relay.attached()
    with _sender() as sender:
        sender.sendto(b"for the first", ("127.0.0.1", relay.port))
        old_tag, _ = first.frame()
        second = relay.attached()
        assert first.ended()
        # The first one's questions went with it: its tag means nothing to the relay now.
        second.send(encode(old_tag, b"stale"))
        assert _answer(sender, QUIET) is None
        sender.sendto(b"for the second", ("127.0.0.1", relay.port))
        tag, payload = second.frame()
        assert payload == b"for the second"
        second.send(encode(tag, b"answer"))
        assert _answer(sender) == b"answer"


def test_a_client_that_hangs_up_ends_its_attach(relay: Served) -> None:
    client = relay.attached()
    assert client.proc.stdin is not None
    client.proc.stdin.close()  # the SSH channel closed
    assert client.proc.wait(WAIT) == 0
    relay.attached()  # and the relay takes the next one


def test_sigterm_stops_the_relay(relay: Served) -> None:
    client = relay.attached()
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(WAIT) == 0
    assert client.ended()


def test_attach_without_a_relay_says_so(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, str(PROGRAM), "attach", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode != 0 and "cannot connect to the relay" in ran.stderr


def test_a_stale_socket_is_replaced_and_anything_else_refused(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "relay.sock"))
    stale.close()
    served = _serve(tmp_path)
    try:
        client = served.attached()
        client.close()
    finally:
        served.proc.kill()
        served.proc.wait()
        for stream in (served.proc.stdout, served.proc.stderr):
            assert stream is not None
            stream.close()
    other = tmp_path / "other"
    other.mkdir()
    (other / "relay.sock").write_text("not a socket")
    ran = subprocess.run(
        [sys.executable, str(PROGRAM), "serve", "--socket", str(other / "relay.sock")],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert ran.returncode != 0 and "is not a socket" in ran.stderr
    assert (other / "relay.sock").read_text() == "not a socket"


# ---- on a host, through HostFiles (this machine as the host) ---------------------------------


@pytest.fixture
def host_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "host" / "sandbox-records"
    monkeypatch.setattr(remotecapture, "ROOT", str(root))
    return root


def test_commands_name_only_our_directories(host_root: Path) -> None:
    where = str(host_root / "web")
    sock = f"{where}/wildcard-relay.sock"
    assert remoterelay.attach_argv(where) == [
        "python3", f"{where}/wildcard-relay.py", "attach", "--socket", sock,
    ]  # fmt: skip
    argv = remoterelay.start_argv(where)
    assert argv[:2] == ["sh", "-c"] and argv[3:] == [
        "sh", where, f"{where}/wildcard-relay.py", f"{where}/wildcard-relay.out",
        f"{where}/wildcard-relay.log", "serve", "--socket", sock,
    ]  # fmt: skip
    assert remoterelay.start_argv(where, max_pending=8, answer_seconds=2)[-4:] == [
        "--max-pending", "8", "--answer-seconds", "2.0",
    ]  # fmt: skip
    assert remoterelay.stop_argv(where)[3:] == ["sh", where, f"{where}/wildcard-relay.py"]
    for bad in ("/tmp/web", str(host_root), f"{host_root}/a/b", f"{host_root}/..", f"{where};"):
        with pytest.raises((RemoteRelayError, UsageError)):
            remoterelay.attach_argv(bad)
        with pytest.raises((RemoteRelayError, UsageError)):
            remoterelay.stop_argv(bad)


def test_the_socket_path_fits_for_the_longest_name() -> None:
    # sun_path holds 108 bytes, its terminating NUL included.
    where = remotecapture.directory("a" * 31)
    assert len(remoterelay.socket_path(where).encode()) < 108


def _relay_pids(where: str) -> list[int]:
    """This machine's processes running the relay's copy in `where`, by their command line."""
    prog = f"{where}/{remoterelay.PROGRAM}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and prog in (entry / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_start_attach_stop_on_a_host(host_root: Path) -> None:
    where = str(host_root / "web")
    started = remoterelay.start(LOCAL, where)
    # Another started by hand (an `up` killed before it recorded the pid): stop finds it too.
    unrecorded = remoterelay.start(LOCAL, where)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"{where}/wildcard-relay.py.old"]
    )
    served = Relay(unrecorded.port, Path(remoterelay.socket_path(where)), [])
    try:
        assert (Path(where).stat().st_mode & 0o777) == 0o700
        assert Path(f"{where}/wildcard-relay.py").read_text() == remoterelay.program_text()
        if os.geteuid() == 0:
            assert "\nUid:\t65534\t" in Path(f"/proc/{unrecorded.pid}/status").read_text()
        # The client's exec command, run as the client runs it (the host's python3).
        client = served.attached(remoterelay.attach_argv(where))
        with _sender() as sender:
            sender.sendto(b"query", ("127.0.0.1", unrecorded.port))
            tag, payload = client.frame()
            assert payload == b"query"
            client.send(encode(tag, b"answer"))
            assert _answer(sender) == b"answer"
        attach_pid = client.proc.pid
        stopped = remoterelay.stop(LOCAL, where)
        # Both relays, and the attach (a python running that copy too); not the bystander.
        assert started.pid in stopped and unrecorded.pid in stopped, stopped
        assert set(stopped) <= {started.pid, unrecorded.pid, attach_pid}
        assert not _alive(started.pid) and not _alive(unrecorded.pid)
        assert client.proc.wait(WAIT) is not None
        assert bystander.poll() is None
        assert remoterelay.stop(LOCAL, where) == []
        # The rollback's stop: by the URI (this machine's), best effort.
        third = remoterelay.start(LOCAL, where)
        remoterelay.discard("qemu:///system", where)
        assert not _alive(third.pid) and _relay_pids(where) == []
    finally:
        for client in served.clients:
            client.close()
        remoterelay.stop(LOCAL, where)
        bystander.kill()
        bystander.wait()


class WithoutPython(LocalFiles):
    """A host whose shell finds no python3."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        if argv[0] == "sh":
            argv = ["env", "PATH=/nonexistent", "/bin/sh", *argv[1:]]
        return super().run(argv, stdin)


class NotRoot(LocalFiles):
    """A host where the login cannot make the sandbox's directory (a user other than root)."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        if argv[0] == "mkdir":
            return Ran(1, "", f"mkdir: cannot create directory '{argv[-1]}': Permission denied")
        return super().run(argv, stdin)


def test_a_host_that_cannot_run_the_relay_is_said_with_what_to_do(host_root: Path) -> None:
    where = str(host_root / "web")
    with pytest.raises(RemoteRelayError) as caught:
        remoterelay.start(WithoutPython(), where)
    assert "python3 is not installed" in caught.value.message
    assert "apt-get install python3" in (caught.value.hint or "")
    assert _relay_pids(where) == []
    with pytest.raises(RemoteRelayError) as caught:
        remoterelay.start(NotRoot(), str(host_root / "other"))
    assert "Permission denied" in caught.value.message
    assert "qemu+ssh://root@HOST/system" in (caught.value.hint or "")

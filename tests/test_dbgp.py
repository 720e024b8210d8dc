"""The tests' DBGp client: packet framing and parsing (pure), then the IDE side over loopback
against a fake engine replaying what a real one sent.

tests/data/dbgp/*.bin are the packets xdebug 3.2.0 (PHP 8.2.36, the guest image) sent while a
session stepped through tests/data/dbgp/script.php in a sandbox, framed as on the wire:
step_session.bin: init, step_into twice, stack_get, breakpoint_set (line 5), run, stack_get, run,
stop; stream_session.bin: init, feature_set, stdout -c 1, breakpoint_get (an error),
breakpoint_set (line 8), run, a stdout stream, step_over, detach.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .dbgp import (
    DbgpError,
    DbgpListener,
    Frame,
    Init,
    Notify,
    PacketReader,
    Response,
    Stream,
    encode_command,
    encode_packet,
    parse_packet,
    socket_in_netns,
)

DATA = Path(__file__).parent / "data" / "dbgp"
SCRIPT = "file:///tmp/dbgp/script.php"


def recorded(name: str) -> list[bytes]:
    reader = PacketReader()
    packets = reader.feed((DATA / name).read_bytes())
    assert reader.pending == b""
    return packets


# --- framing -----------------------------------------------------------------------------------


def test_reader_splits_a_recorded_session_whatever_the_chunking() -> None:
    stream = (DATA / "step_session.bin").read_bytes()
    whole = PacketReader().feed(stream)
    assert len(whole) == 9
    assert all(p.startswith(b'<?xml version="1.0"') for p in whole)
    for size in (1, 2, 7, 100, 468, 469, 470):
        reader = PacketReader()
        packets: list[bytes] = []
        for i in range(0, len(stream), size):
            packets += reader.feed(stream[i : i + size])
        assert packets == whole, f"chunks of {size}"
        assert reader.pending == b""


def test_reader_keeps_an_incomplete_packet() -> None:
    reader = PacketReader()
    assert reader.feed(b"5\0ab") == []
    assert reader.feed(b"cde") == []  # the closing NUL is still missing
    assert reader.feed(b"\x003\0xyz\x00") == [b"abcde", b"xyz"]


def test_reader_rejects_what_is_not_dbgp() -> None:
    with pytest.raises(DbgpError, match="length"):
        PacketReader().feed(b"HTTP/1.1 200 OK\r\n\0")
    with pytest.raises(DbgpError, match="no packet length"):
        PacketReader().feed(b"12345678901234567890")
    with pytest.raises(DbgpError, match="not followed by NUL"):
        PacketReader().feed(b"3\0abcd\0")


def test_encode_packet_round_trips() -> None:
    xml = b'<?xml version="1.0"?>\n<init fileuri="file:///x" appid="1"/>'
    assert PacketReader().feed(encode_packet(xml) * 2) == [xml, xml]


def test_encode_command() -> None:
    assert encode_command("step_into", 1) == b"step_into -i 1\0"
    assert encode_command("breakpoint_set", 4, {"t": "line", "f": SCRIPT, "n": 5}) == (
        b"breakpoint_set -i 4 -t line -f file:///tmp/dbgp/script.php -n 5\0"
    )
    assert encode_command("eval", 7, data=b"1 + 1") == b"eval -i 7 -- MSArIDE=\0"
    # Values with spaces, quotes or backslashes are quoted the way xdebug's parser unquotes.
    assert encode_command("breakpoint_set", 2, {"f": 'file:///a b/"c"\\'}) == (
        b'breakpoint_set -i 2 -f "file:///a b/\\"c\\"\\\\"\0'
    )
    assert encode_command("property_get", 3, {"n": ""}) == b'property_get -i 3 -n ""\0'
    with pytest.raises(ValueError):
        encode_command("status", 1, {"i": 2})


# --- parsing -----------------------------------------------------------------------------------


def test_parse_init() -> None:
    init = parse_packet(recorded("step_session.bin")[0])
    assert isinstance(init, Init)
    assert init.fileuri == SCRIPT
    assert init.language == "PHP"
    assert init.protocol_version == "1.0"
    assert init.appid == "331"
    assert init.idekey == ""
    assert (init.engine, init.engine_version) == ("Xdebug", "3.2.0")
    assert init.attributes["language_version"] == "8.2.36"


def test_parse_a_recorded_stepping_session() -> None:
    packets = [parse_packet(p) for p in recorded("step_session.bin")[1:]]
    assert all(isinstance(p, Response) for p in packets)
    responses = [p for p in packets if isinstance(p, Response)]
    assert [r.transaction_id for r in responses] == list(range(1, 9))
    assert [(r.command, r.status, r.reason) for r in responses] == [
        ("step_into", "break", "ok"),
        ("step_into", "break", "ok"),
        ("stack_get", "", ""),
        ("breakpoint_set", "", ""),
        ("run", "break", "ok"),
        ("stack_get", "", ""),
        ("run", "stopping", "ok"),
        ("stop", "stopped", "ok"),
    ]
    step1, step2, stack1, breakpoint, run1, stack2, _, _ = responses
    assert (step1.filename, step1.lineno) == (SCRIPT, 2)
    assert step2.location == (SCRIPT, 3)
    assert stack1.frames == (Frame(0, "{main}", SCRIPT, 3, "file"),)
    assert stack1.location == (SCRIPT, 3)
    assert breakpoint.attributes["id"] == "3310001"
    assert run1.location == (SCRIPT, 5)
    assert [(f.where, f.lineno) for f in stack2.frames] == [("twice", 5), ("{main}", 7)]
    assert responses[6].location is None


def test_parse_error_stream_and_resolved_breakpoint() -> None:
    packets = [parse_packet(p) for p in recorded("stream_session.bin")]
    error = packets[3]
    assert isinstance(error, Response)
    assert error.command == "breakpoint_get"
    assert (error.error_code, error.error_message) == (205, "no such breakpoint")
    breakpoint = packets[4]
    assert isinstance(breakpoint, Response)
    assert breakpoint.attributes["resolved"] == "resolved"
    assert packets[6] == Stream(type="stdout", data=b"hello 10\n")


def test_parse_notify() -> None:
    xml = (
        b'<?xml version="1.0" encoding="iso-8859-1"?>\n<notify xmlns="urn:debugger_protocol_v1" '
        b'xmlns:xdebug="https://xdebug.org/dbgp/xdebug" name="breakpoint_resolved">'
        b'<breakpoint type="line" resolved="resolved" filename="file:///x.php" lineno="8" '
        b'state="enabled" hit_count="0" hit_value="0" id="1"></breakpoint></notify>'
    )
    notify = parse_packet(xml)
    assert isinstance(notify, Notify)
    assert notify.name == "breakpoint_resolved"


def test_parse_rejects_garbage() -> None:
    with pytest.raises(DbgpError, match="not XML"):
        parse_packet(b"<response")
    with pytest.raises(DbgpError, match="unknown"):
        parse_packet(b"<html/>")
    with pytest.raises(DbgpError, match="transaction id"):
        parse_packet(b'<response command="run"/>')


# --- the IDE side over loopback ----------------------------------------------------------------


@contextmanager
def fake_engine(port: int, packets: list[bytes]) -> Iterator[list[bytes]]:
    """Connects like xdebug, sends the init packet, then answers each command with the next
    recorded packet (and streams as they come); yields the commands it received."""
    received: list[bytes] = []

    def serve() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encode_packet(packets[0]))
            reader = iter(packets[1:])
            buffer = b""
            for reply in reader:
                if b"<stream" in reply:
                    sock.sendall(encode_packet(reply))
                    reply = next(reader)
                while b"\0" not in buffer:
                    data = sock.recv(4096)
                    if not data:
                        return
                    buffer += data
                command, buffer = buffer.split(b"\0", 1)
                received.append(command)
                sock.sendall(encode_packet(reply))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        thread.join(5)


def test_session_against_a_replaying_engine() -> None:
    with (
        DbgpListener() as ide,
        fake_engine(ide.port, recorded("step_session.bin")) as received,
        ide.accept(timeout=5) as session,
    ):
        assert session.init.fileuri == SCRIPT
        assert session.step_into().lineno == 2
        assert session.step_into().lineno == 3
        assert session.stack_get().location == (SCRIPT, 3)
        assert session.breakpoint_set(session.init.fileuri, 5).attributes["id"]
        assert session.run().location == (SCRIPT, 5)
        assert [f.where for f in session.stack_get().frames] == ["twice", "{main}"]
        assert session.run().status == "stopping"
        assert session.stop().status == "stopped"
        session.wait_closed(5)
    assert received == [
        b"step_into -i 1",
        b"step_into -i 2",
        b"stack_get -i 3",
        b"breakpoint_set -i 4 -t line -f file:///tmp/dbgp/script.php -n 5",
        b"run -i 5",
        b"stack_get -i 6",
        b"run -i 7",
        b"stop -i 8",
    ]


def test_session_keeps_streams_that_come_before_a_response() -> None:
    with (
        DbgpListener() as ide,
        fake_engine(ide.port, recorded("stream_session.bin")),
        ide.accept(timeout=5) as session,
    ):
        for _ in range(5):
            session.status()  # replayed: feature_set ... run
        assert session.step_over().status == "stopping"
        assert session.streams == [Stream(type="stdout", data=b"hello 10\n")]
        assert session.detach().command == "detach"


def test_accept_times_out() -> None:
    with DbgpListener() as ide:
        start = time.monotonic()
        with pytest.raises(DbgpError, match=f"127.0.0.1:{ide.port} within 0.3 s"):
            ide.accept(timeout=0.3)
        assert time.monotonic() - start < 2


def test_engine_silent_after_connecting() -> None:
    with (
        DbgpListener() as ide,
        socket.create_connection(("127.0.0.1", ide.port)),
        pytest.raises(DbgpError, match="waiting for the init packet"),
    ):
        ide.accept(timeout=0.3)


def test_engine_closing_before_a_response() -> None:
    init = recorded("step_session.bin")[0]
    with (
        DbgpListener() as ide,
        fake_engine(ide.port, [init]),
        ide.accept(timeout=5) as session,
        pytest.raises(DbgpError, match=r"closed the connection before (the response to )?run"),
    ):
        session.run()


@pytest.mark.root
def test_listener_in_another_network_namespace() -> None:
    """As the e2e tests need it: the CLI runs in the lab's namespace, the test outside it."""
    netns = f"sbx-dbgp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=20)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=20)
        with DbgpListener(netns=netns) as ide:
            with pytest.raises(ConnectionRefusedError):  # not on this namespace's loopback
                socket.create_connection(("127.0.0.1", ide.port), timeout=5).close()
            engine = socket_in_netns(netns, socket.socket)
            with engine:
                engine.connect(("127.0.0.1", ide.port))
                engine.sendall(encode_packet(recorded("step_session.bin")[0]))
                with ide.accept(timeout=5) as session:
                    assert session.init.fileuri == SCRIPT
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=20)

"""A small DBGp client, the IDE side of xdebug's step debugging, for tests.

DBGp (https://xdebug.org/docs-dbgp.php): the IDE listens, the debugger engine (xdebug) connects
and sends an `<init>` packet, then waits for commands. Engine → IDE packets are
`LENGTH NUL XML NUL` (LENGTH in ASCII decimal, the byte length of XML). IDE → engine commands
are one line each, `name -i TRANSACTION_ID [-x value ...] [-- base64(data)] NUL`, and every one
is answered by a `<response command=... transaction_id=...>`; `<stream>` and `<notify>` packets
may come in between.

    with DbgpListener() as ide:            # 127.0.0.1, a free port: ide.port
        ...start php with xdebug.client_port=ide.port...
        with ide.accept(timeout=30) as session:
            session.init.fileuri           # file:///tmp/script.php
            session.step_into().lineno     # 3
            session.run().status           # "stopping"
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

# A length field longer than this is garbage, not a packet (xdebug's largest are property
# dumps of a few MB).
_MAX_LENGTH_DIGITS = 10
_CHUNK = 65536
_NEEDS_QUOTES = re.compile(r'[\s"\\]')
_CLONE_NEWNET = 0x40000000


class DbgpError(Exception):
    """The engine sent something that is not DBGp, or did not answer in time."""


# --- packets (pure) ----------------------------------------------------------------------------


class PacketReader:
    """Splits the engine's byte stream into packets' XML, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        packets: list[bytes] = []
        while True:
            length_end = self._buffer.find(b"\0")
            if length_end < 0:
                if len(self._buffer) > _MAX_LENGTH_DIGITS:
                    raise DbgpError(f"no packet length in {self._buffer[:40]!r}")
                return packets
            digits = self._buffer[:length_end]
            if not digits.isdigit() or len(digits) > _MAX_LENGTH_DIGITS:
                raise DbgpError(f"bad packet length {digits[:40]!r}")
            length = int(digits)
            end = length_end + 1 + length
            if len(self._buffer) < end + 1:
                return packets
            if self._buffer[end : end + 1] != b"\0":
                raise DbgpError(
                    f"packet of length {length} not followed by NUL: "
                    f"{self._buffer[end : end + 20]!r}"
                )
            packets.append(self._buffer[length_end + 1 : end])
            self._buffer = self._buffer[end + 1 :]

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete packet."""
        return self._buffer


def encode_packet(xml: bytes) -> bytes:
    """An engine → IDE packet (what xdebug sends; for tests that play the engine)."""
    return str(len(xml)).encode("ascii") + b"\0" + xml + b"\0"


def _quote(value: str) -> str:
    if value and not _NEEDS_QUOTES.search(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def encode_command(
    name: str,
    transaction_id: int,
    args: Mapping[str, str | int] | None = None,
    data: bytes | None = None,
) -> bytes:
    """`name -i ID -k v ... [-- base64(data)] NUL`; `args` keys are the option letters."""
    parts = [name, "-i", str(transaction_id)]
    for key, value in (args or {}).items():
        if len(key) != 1 or key in "i-":
            raise ValueError(f"not a DBGp option letter: {key!r}")
        parts += [f"-{key}", _quote(str(value))]
    if data is not None:
        parts += ["--", base64.b64encode(data).decode("ascii")]
    return " ".join(parts).encode("utf-8") + b"\0"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _namespace(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def _attrs(element: ET.Element) -> dict[str, str]:
    """Attributes by local name (`xdebug:language_version` → `language_version`)."""
    return {_local(k): v for k, v in element.attrib.items()}


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


@dataclass(frozen=True)
class Init:
    fileuri: str
    appid: str
    idekey: str
    language: str
    protocol_version: str
    engine: str  # "Xdebug"
    engine_version: str  # "3.2.0"
    attributes: Mapping[str, str]


@dataclass(frozen=True)
class Frame:
    level: int
    where: str  # "{main}", "greet"
    filename: str  # a file URI
    lineno: int
    type: str  # "file", "eval"


@dataclass(frozen=True)
class Response:
    command: str
    transaction_id: int
    status: str  # starting, running, break, stopping, stopped; "" when the command has none
    reason: str  # ok, error, aborted, exception
    filename: str | None = None  # where a continuation command stopped (xdebug:message)
    lineno: int | None = None
    error_code: int | None = None
    error_message: str | None = None
    frames: tuple[Frame, ...] = ()  # stack_get
    attributes: Mapping[str, str] = field(default_factory=dict)  # e.g. breakpoint_set's id

    @property
    def location(self) -> tuple[str, int] | None:
        """Where execution stands: the break message, else the top stack frame."""
        if self.filename is not None and self.lineno is not None:
            return self.filename, self.lineno
        if self.frames:
            return self.frames[0].filename, self.frames[0].lineno
        return None


@dataclass(frozen=True)
class Stream:
    type: str  # stdout, stderr
    data: bytes


@dataclass(frozen=True)
class Notify:
    name: str
    attributes: Mapping[str, str]


Packet = Init | Response | Stream | Notify


def _parse_init(root: ET.Element) -> Init:
    attrs = _attrs(root)
    engine = next((c for c in root if _local(c.tag) == "engine"), None)
    return Init(
        fileuri=attrs.get("fileuri", ""),
        appid=attrs.get("appid", ""),
        idekey=attrs.get("idekey", ""),
        language=attrs.get("language", ""),
        protocol_version=attrs.get("protocol_version", ""),
        engine=(engine.text or "").strip() if engine is not None else "",
        engine_version=engine.get("version", "") if engine is not None else "",
        attributes=attrs,
    )


def _parse_response(root: ET.Element) -> Response:
    attrs = _attrs(root)
    transaction_id = _int(attrs.get("transaction_id"))
    if transaction_id is None:
        raise DbgpError(f"response without a transaction id: {attrs}")
    filename: str | None = None
    lineno: int | None = None
    error_code: int | None = None
    error_message: str | None = None
    frames: list[Frame] = []
    for child in root:
        name = _local(child.tag)
        if name == "message" and _namespace(child.tag) != _namespace(root.tag):
            # <xdebug:message filename=... lineno=...>: where a step or run stopped.
            filename = child.get("filename")
            lineno = _int(child.get("lineno"))
        elif name == "error":
            error_code = _int(child.get("code"))
            text = next((m.text for m in child if _local(m.tag) == "message"), None)
            error_message = (text or "").strip()
        elif name == "stack":
            frames.append(
                Frame(
                    level=_int(child.get("level")) or 0,
                    where=child.get("where", ""),
                    filename=child.get("filename", ""),
                    lineno=_int(child.get("lineno")) or 0,
                    type=child.get("type", ""),
                )
            )
    return Response(
        command=attrs.get("command", ""),
        transaction_id=transaction_id,
        status=attrs.get("status", ""),
        reason=attrs.get("reason", ""),
        filename=filename,
        lineno=lineno,
        error_code=error_code,
        error_message=error_message,
        frames=tuple(sorted(frames, key=lambda f: f.level)),
        attributes=attrs,
    )


def parse_packet(xml: bytes) -> Packet:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DbgpError(f"not XML ({e}): {xml[:80]!r}") from e
    kind = _local(root.tag)
    if kind == "init":
        return _parse_init(root)
    if kind == "response":
        return _parse_response(root)
    if kind == "stream":
        text = (root.text or "").strip()
        data = base64.b64decode(text) if root.get("encoding") == "base64" else text.encode()
        return Stream(type=root.get("type", ""), data=data)
    if kind == "notify":
        return Notify(name=root.get("name", ""), attributes=_attrs(root))
    raise DbgpError(f"unknown DBGp packet <{kind}>: {xml[:80]!r}")


# --- the IDE side over TCP ---------------------------------------------------------------------


class DbgpSession:
    """One engine connection. Commands block until their response (or the timeout)."""

    def __init__(self, sock: socket.socket, init_timeout: float, timeout: float) -> None:
        self._sock = sock
        self._reader = PacketReader()
        self._pending: list[bytes] = []
        self._next_id = 1
        self.timeout = timeout
        self.streams: list[Stream] = []
        self.notifications: list[Notify] = []
        first = self._read_packet("the init packet", init_timeout)
        if not isinstance(first, Init):
            raise DbgpError(f"the engine's first packet is not <init>: {first}")
        self.init = first
        self.init_received_at = time.monotonic()  # for measuring how long the engine took

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _read_packet(self, what: str, timeout: float) -> Packet:
        end = time.monotonic() + timeout
        while not self._pending:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise DbgpError(f"timed out after {timeout:g} s waiting for {what}")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(_CHUNK)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                raise DbgpError(f"the engine closed the connection before {what}")
            self._pending += self._reader.feed(data)
        return parse_packet(self._pending.pop(0))

    def send(self, name: str, args: Mapping[str, str | int] | None = None) -> int:
        """Send a command without waiting; returns its transaction id."""
        transaction_id = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(encode_command(name, transaction_id, args))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise DbgpError(f"the engine closed the connection before {name}: {e}") from e
        return transaction_id

    def command(
        self,
        name: str,
        args: Mapping[str, str | int] | None = None,
        *,
        timeout: float | None = None,
    ) -> Response:
        """Send a command and return its response; streams and notifications that arrive
        first are kept in `streams` and `notifications`."""
        transaction_id = self.send(name, args)
        wait = self.timeout if timeout is None else timeout
        end = time.monotonic() + wait
        while True:
            packet = self._read_packet(
                f"the response to {name} (transaction {transaction_id})",
                max(end - time.monotonic(), 0.0),
            )
            if isinstance(packet, Stream):
                self.streams.append(packet)
            elif isinstance(packet, Notify):
                self.notifications.append(packet)
            elif isinstance(packet, Response) and packet.transaction_id == transaction_id:
                return packet
            else:
                raise DbgpError(f"unexpected packet while waiting for {name}: {packet}")

    def status(self) -> Response:
        return self.command("status")

    def feature_set(self, name: str, value: str | int) -> Response:
        return self.command("feature_set", {"n": name, "v": value})

    def step_into(self) -> Response:
        return self.command("step_into")

    def step_over(self) -> Response:
        return self.command("step_over")

    def run(self) -> Response:
        return self.command("run")

    def stack_get(self, depth: int | None = None) -> Response:
        return self.command("stack_get", {"d": depth} if depth is not None else None)

    def breakpoint_set(self, fileuri: str, lineno: int) -> Response:
        return self.command("breakpoint_set", {"t": "line", "f": fileuri, "n": lineno})

    def detach(self) -> Response:
        return self.command("detach")

    def stop(self) -> Response:
        return self.command("stop")

    def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for the engine to close the connection (after `stop` or `detach`)."""
        wait = self.timeout if timeout is None else timeout
        end = time.monotonic() + wait
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise DbgpError(f"the engine did not close the connection within {wait:g} s")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(_CHUNK)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return
            if not data:
                return
            self._reader.feed(data)


def socket_in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """A socket made by `make` inside the network namespace /run/netns/NETNS (needs root).

    setns() moves only the calling thread, so a throwaway thread makes the socket there; the
    socket stays in that namespace when used from any other thread. The CLI runs in the lab's
    namespace (`ip netns exec sandbox-lab`), so the IDE side must listen on that loopback.
    """
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into network namespace {netns}")
            made.append(make())
        except BaseException as e:
            failed.append(e)
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter_and_make, name=f"netns-{netns}")
    thread.start()
    thread.join(10)
    if failed:
        raise failed[0]
    if not made:
        raise DbgpError(f"could not make a socket in network namespace {netns} within 10 s")
    return made[0]


class DbgpListener:
    """The IDE's listening socket (xdebug.client_host/client_port point here), on this
    process's loopback or, with `netns`, on that network namespace's."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, netns: str | None = None) -> None:
        def make() -> socket.socket:
            return socket.create_server((host, port))

        self._server = make() if netns is None else socket_in_netns(netns, make)
        self.host = host
        self.port: int = self._server.getsockname()[1]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()

    def accept(self, timeout: float = 30.0, command_timeout: float = 10.0) -> DbgpSession:
        """Wait for the engine to connect and send its init packet, both within `timeout`;
        each later command waits `command_timeout` for its response."""
        end = time.monotonic() + timeout
        self._server.settimeout(timeout)
        try:
            sock, _ = self._server.accept()
        except TimeoutError as e:
            raise DbgpError(
                f"no debugger engine connected to {self.host}:{self.port} within {timeout:g} s"
            ) from e
        try:
            return DbgpSession(sock, max(end - time.monotonic(), 0.0), command_timeout)
        except BaseException:
            sock.close()
            raise

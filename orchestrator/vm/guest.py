"""The SSH edge: keys, a pinned host key, deadline-bound connect, commands and file copies.

Everything the orchestrator does inside the guest goes through `Guest`. The guest's host key is
generated on the host and pinned: paramiko gets only that key and `RejectPolicy`, so a guest that
presents any other key is refused (never trust on first use: the port may belong to someone else).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import select
import shlex
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, cast

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from orchestrator.errors import (
    GuestError,
    HostKeyMismatchError,
    OutputTooLarge,
    TimeoutExpired,
    UsageError,
)
from orchestrator.waits import Deadline

SSH_PORT = 22

# A socket factory: (host, port, timeout) -> connected socket. The default is plain TCP; callers
# that must reach a guest from inside a network namespace pass their own, and a guest of a remote
# libvirt host is reached through SSH channels to that host (jump.py).
SocketOpener = Callable[[str, int, float], "socket.socket | paramiko.Channel"]

_RETRY_FIRST = 0.1
_RETRY_MAX = 1.0
# One connection attempt may not use more than this much of the deadline: a peer that accepted
# TCP but hangs in kex must not eat a long deadline in one go.
_ATTEMPT_MAX = 20.0
_BANNER_LINE_MAX = 8192
# "Network is unreachable" for this long means this machine has no route to the guest's network
# at all (libvirt runs on another host, or in another network namespace): no later attempt can
# succeed, so the wait ends within seconds instead of at the boot deadline.
NO_ROUTE_SECONDS = 3.0
# A guest that has its lease answers a TCP connect at once: with sshd's banner, or with a
# refusal (RST) while sshd is not up yet, even when TCG makes the rest of it slow. Connects that
# time out with neither for this long mean something on the way drops the packets (a firewall,
# a route into someone else's network): waiting out the boot timeout would not change that.
SILENT_SECONDS = 15.0
_CONNECT_MAX = 5.0
SILENT_HINT = (
    "a firewall between this machine and the sandbox networks (network.subnets in the config), "
    "or between the libvirt host and them for a remote --connect, drops the packets: let TCP "
    "to port 22 of those networks through, or run sandbox where libvirtd runs; a remote "
    "libvirt host is best reached as --connect qemu+ssh://USER@HOST/system, through which "
    "sandbox reaches its guests"
)
UNREACHABLE_HINT = (
    "sandbox talks to its guests over their own network, from the machine (and network "
    "namespace) it runs in: run it where libvirtd runs, e.g. `ip netns exec NS sandbox ...` for "
    "a libvirtd in a namespace, or on the libvirt host for a remote --connect"
)


class UnreachableVia(OSError):
    """ENETUNREACH from an opener that reaches guests through another machine (`via`): that
    machine has no route to the guest's network, and `hint` says what to check there."""

    def __init__(self, detail: str, *, via: str, hint: str) -> None:
        super().__init__(errno.ENETUNREACH, detail)
        self.via = via
        self.hint = hint


_STDERR_TAIL_CHARS = 2000
_CHUNK = 32768
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SFTP_TIMEOUT = 300.0
# Reverse tunnels listen on the guest's loopback only: nothing outside the guest may reach them.
_GUEST_LOOPBACK = "127.0.0.1"
# How long a forwarded connection may take to reach the host side, and how long closing a tunnel
# waits for its connections' threads before leaving them (daemon threads) behind.
_RELAY_CONNECT_TIMEOUT = 5.0
_RELAY_JOIN_TIMEOUT = 5.0
# A guest whose SSH stops answering counts as gone after this long (see _detect_a_dead_peer).
_KEEPALIVE_SECONDS = 15.0
_DEAD_PEER_SECONDS = 90.0
# Connections one tunnel relays at once; more are closed at once (a guest looping on connect()
# must not make the host open sockets and threads without end).
_RELAY_MAX_LINKS = 8
# Connections at once through a local forward (`sandbox serve`): a browser opens about six.
_FORWARD_MAX_LINKS = 32
# The most of a command's output the host buffers whole (check(): collections of the connection
# records, `logs --sockets`, a run's bookkeeping); a caller that expects more gives its own.
DEFAULT_OUTPUT_LIMIT = 64 << 20

_RECREATE_HINT = (
    "the guest is not the VM this sandbox created (or its disk was replaced); "
    "destroy the sandbox and create it again"
)
_LOST_HINT = (
    "the guest may have crashed, rebooted or run out of memory: check its console log; "
    "if it is gone, destroy the sandbox and create it again"
)


class _Bounded:
    """Collects chunks up to `limit` bytes; one more raises OutputTooLarge (from inside the
    channel pump, which then closes the channel)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.size = 0
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise OutputTooLarge(
                f"{self.what} sent more than {self.limit >> 20} MiB: refused",
                "something in the guest floods its output: destroy the sandbox if it goes on",
            )
        self.chunks.append(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


class _Tail:
    """Keeps the last `keep` bytes of a stream (a command's stderr, for its error message)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.buffer = bytearray()

    def __call__(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 2 * self.keep:
            del self.buffer[: -self.keep]

    def text(self) -> str:
        return bytes(self.buffer[-self.keep :]).decode("utf-8", "replace")


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _detect_a_dead_peer(client: paramiko.SSHClient, sock: socket.socket | paramiko.Channel) -> None:
    """A guest that stops answering (hung, gone, or dropping its own replies) must not leave a
    command waiting forever: SSH keepalives keep data in flight, and TCP_USER_TIMEOUT drops the
    connection when it stays unacknowledged, which the waiting call then reports."""
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(int(_KEEPALIVE_SECONDS))
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None and isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(_DEAD_PEER_SECONDS * 1000))


# --- keys (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private_openssh: str  # "-----BEGIN OPENSSH PRIVATE KEY-----..." (what cloud-init wants)
    public_line: str  # "ssh-ed25519 AAAA... comment"


def generate_ed25519(comment: str) -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public.decode("ascii")
    if comment:
        line += " " + comment
    return KeyPair(private_openssh=private, public_line=line)


def _parse_public_line(public_line: str) -> tuple[str, bytes]:
    """(key type, key blob) of an OpenSSH public key line."""
    fields = public_line.split()
    if len(fields) >= 2:
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            blob = b""
        # The blob starts with its own type name; checking it catches swapped or truncated fields.
        name = fields[0].encode("ascii", "replace")
        if blob[4 : 4 + len(name)] == name and int.from_bytes(blob[:4], "big") == len(name):
            return fields[0], blob
    raise GuestError(
        f"not an SSH public key line: {public_line[:60]!r}",
        "the sandbox's key files are damaged; destroy the sandbox and create it again",
    )


def fingerprint(public_line: str) -> str:
    """`SHA256:...` as `ssh-keygen -l` prints it."""
    _, blob = _parse_public_line(public_line)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _host_pattern(host: str, port: int) -> str:
    return host if port == SSH_PORT else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, public_line: str) -> str:
    key_type, blob = _parse_public_line(public_line)
    return f"{_host_pattern(host, port)} {key_type} {base64.b64encode(blob).decode('ascii')}"


def _key_fingerprint(key: paramiko.PKey) -> str:
    return fingerprint(f"{key.get_name()} {key.get_base64()}")


# --- readiness ---------------------------------------------------------------------------------


def _read_banner(
    sock: socket.socket | paramiko.Channel, deadline: Deadline, received: bytearray | None = None
) -> str | None:
    """The `SSH-` line, or None if the peer closed first. RFC 4253 lets a server send other
    lines before it, so skip those. Every byte read is appended to `received`, if given."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.startswith(b"SSH-"):
                return line.rstrip(b"\r").decode("ascii", "replace")
        if len(buffer) > _BANNER_LINE_MAX:
            return None
        sock.settimeout(max(deadline.remaining(), 0.01))
        data = sock.recv(4096)
        if not data:
            return None
        buffer += data
        if received is not None:
            received += data


class Primed:
    """The connection on which sshd's banner came, handed to paramiko with the bytes read so
    far replayed first: the login needs no second connection, which costs sshd a fork and
    re-exec (~0.15 s under TCG) and the client a round trip. Socket-like, as paramiko wants."""

    def __init__(self, raw: socket.socket | paramiko.Channel, received: bytes) -> None:
        self.raw = raw
        self._pending = received

    def recv(self, size: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return self.raw.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def wait_for_banner(
    host: str,
    port: int,
    deadline: Deadline,
    *,
    opener: SocketOpener = tcp_connect,
    no_route_seconds: float = NO_ROUTE_SECONDS,
    silent_seconds: float = SILENT_SECONDS,
) -> str:
    """Connect until the peer sends its SSH banner line, and return that line.

    A forwarded port (QEMU's hostfwd) accepts TCP long before sshd runs and then closes the
    connection, so an accepted connection proves nothing: the banner is the signal.
    """
    banner, _ = _wait_for_banner(
        host, port, deadline, opener, no_route_seconds, silent_seconds, keep=False
    )
    return banner


def wait_for_sshd(
    host: str,
    port: int,
    deadline: Deadline,
    *,
    opener: SocketOpener = tcp_connect,
    no_route_seconds: float = NO_ROUTE_SECONDS,
    silent_seconds: float = SILENT_SECONDS,
) -> Primed:
    """wait_for_banner, keeping the connection the banner came on, for Guest.connect(first=)."""
    _banner, primed = _wait_for_banner(
        host, port, deadline, opener, no_route_seconds, silent_seconds, keep=True
    )
    assert primed is not None
    return primed


class _NoAnswer(Exception):
    """A connect that timed out: neither a reply nor a refusal."""


def _wait_for_banner(
    host: str,
    port: int,
    deadline: Deadline,
    opener: SocketOpener,
    no_route_seconds: float,
    silent_seconds: float,
    *,
    keep: bool,
) -> tuple[str, Primed | None]:
    delay = _RETRY_FIRST
    last = "no attempt finished"
    no_route_since: float | None = None
    silent_since: float | None = None  # when the connects that time out began
    while True:
        try:
            started = time.monotonic()
            try:
                sock = opener(host, port, max(min(deadline.remaining(), _CONNECT_MAX), 0.01))
            except TimeoutError as e:
                silent_since = started if silent_since is None else silent_since
                silent = time.monotonic() - silent_since
                if silent >= silent_seconds:
                    raise GuestError(
                        f"cannot reach the guest at {host}: nothing answers on TCP port {port} "
                        f"(no reply, no refusal) for {silent:.0f} s after it got its address; "
                        f"something on the way drops the packets ({e})",
                        SILENT_HINT,
                    ) from None
                raise _NoAnswer(f"no answer to a connect yet ({e})") from None
            silent_since = None
            received = bytearray()
            try:
                banner = _read_banner(sock, deadline, received)
            except BaseException:
                sock.close()
                raise
            if banner is not None and keep:
                return banner, Primed(sock, bytes(received))
            sock.close()
            if banner is not None:
                return banner, None
            last = "the peer closed the connection before sending an SSH banner"
        except _NoAnswer as e:
            last = str(e)
        except TimeoutError:
            last = "no SSH banner yet"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
            silent_since = None  # an answer, if only a refusal
            if e.errno == errno.ENETUNREACH:
                now = time.monotonic()
                no_route_since = no_route_since if no_route_since is not None else now
                if now - no_route_since >= no_route_seconds:
                    if isinstance(e, UnreachableVia):
                        raise GuestError(
                            f"cannot reach the guest at {host}: {e.via} has no route to its "
                            f"network ({last})",
                            e.hint,
                        ) from None
                    raise GuestError(
                        f"cannot reach the guest at {host}: this machine has no route to its "
                        f"network ({last})",
                        UNREACHABLE_HINT,
                    ) from None
            else:
                no_route_since = None
        if deadline.expired():
            raise deadline.error(f"SSH banner on {host}:{port}; last error: {last}")
        time.sleep(min(delay, deadline.remaining()))
        delay = min(delay * 1.5, _RETRY_MAX)


# --- the session -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    client_key: Path  # private key file (OpenSSH format)
    host_key: str  # pinned host public key line

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def quiet_paramiko() -> None:
    # paramiko logs every failed attempt at ERROR with a traceback; with no handler configured,
    # Python's last-resort handler would print them to stderr while we are merely retrying.
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def _load_client_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise GuestError(
            f"cannot load the SSH client key {path}: {e}",
            "the sandbox's key files are missing or damaged; destroy the sandbox and create it "
            "again",
        ) from e


def _env_prefix(env: Mapping[str, str]) -> str:
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise GuestError(
                f"not a valid environment variable name: {name!r}",
                "use letters, digits and underscores, not starting with a digit",
            )
    # sshd's AcceptEnv refuses most names, so the variables travel inside the command. `export`
    # rather than `env K=V cmd` so that a shell command string can expand them itself.
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"export {assignments}; " if env else ""


def _command_text(command: str | Sequence[str]) -> str:
    return command if isinstance(command, str) else shlex.join(command)


class Guest:
    """An authenticated SSH connection to the guest. Use as a context manager."""

    def __init__(self, client: paramiko.SSHClient, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint
        self._sftp: paramiko.SFTPClient | None = None
        # paramiko keeps one handler for all of a transport's remote forwards; this routes each
        # forwarded connection to its tunnel by the guest port it arrived on.
        self._forwards_lock = threading.Lock()
        self._forwards: dict[int, _Relay] = {}

    # -- connecting

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        deadline: Deadline,
        *,
        opener: SocketOpener = tcp_connect,
        first: Primed | None = None,
    ) -> Guest:
        """Connect and authenticate, retrying while sshd is not up yet. `first`: a connection
        wait_for_sshd made, for the first attempt (closed here whatever happens).

        Retried (short backoff, bounded by the deadline): refused, reset, no banner, EOF during
        key exchange. Not retried: a host key other than the pinned one, a refused client key.
        """
        quiet_paramiko()
        pkey = _load_client_key(endpoint.client_key)
        key_type, blob = _parse_public_line(endpoint.host_key)
        pinned = paramiko.PKey.from_type_string(key_type, blob)
        delay = _RETRY_FIRST
        while True:
            try:
                sock, first = first, None
                return cls(cls._attempt(endpoint, pkey, pinned, deadline, opener, sock), endpoint)
            except paramiko.BadHostKeyException as e:
                raise HostKeyMismatchError(
                    f"the SSH host key of {endpoint.host}:{endpoint.port} does not match the "
                    f"pinned key: expected {_key_fingerprint(e.expected_key)}, the guest presented "
                    f"{_key_fingerprint(e.key)}",
                    _RECREATE_HINT,
                ) from e
            except paramiko.AuthenticationException as e:
                raise GuestError(
                    f"the guest at {endpoint} refused the SSH client key {endpoint.client_key}: "
                    f"{e}",
                    "the guest does not hold this sandbox's public key (its cloud-init seed was "
                    "not applied, or it is another VM); destroy the sandbox and create it again",
                ) from e
            except (OSError, EOFError, paramiko.SSHException) as e:
                last = f"{type(e).__name__}: {e}".rstrip(": ")
            if deadline.expired():
                raise deadline.error(f"SSH login to {endpoint}; last error: {last}")
            time.sleep(min(delay, deadline.remaining()))
            delay = min(delay * 1.5, _RETRY_MAX)

    @staticmethod
    def _attempt(
        endpoint: Endpoint,
        pkey: paramiko.PKey,
        pinned: paramiko.PKey,
        deadline: Deadline,
        opener: SocketOpener,
        primed: Primed | None = None,
    ) -> paramiko.SSHClient:
        budget = max(min(deadline.remaining(), _ATTEMPT_MAX), 0.1)
        client = paramiko.SSHClient()
        # Only the pinned key, looked up under the name paramiko derives from host and port.
        client.get_host_keys().add(
            _host_pattern(endpoint.host, endpoint.port), pinned.get_name(), pinned
        )
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock: socket.socket | paramiko.Channel | Primed = (
            primed if primed is not None else opener(endpoint.host, endpoint.port, budget)
        )
        try:
            client.connect(
                endpoint.host,
                port=endpoint.port,
                username=endpoint.user,
                pkey=pkey,
                # paramiko duck-types its socket (recv, send, settimeout, close): Primed is one.
                sock=cast("socket.socket", sock),
                timeout=budget,
                banner_timeout=budget,
                auth_timeout=budget,
                channel_timeout=budget,
                allow_agent=False,
                look_for_keys=False,
            )
        except BaseException:
            client.close()
            sock.close()  # a transport that never started leaves it open
            raise
        _detect_a_dead_peer(client, sock.raw if isinstance(sock, Primed) else sock)
        return client

    # -- lifetime

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
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        self._client.close()

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @property
    def transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"the SSH connection to {self._endpoint} is closed", _LOST_HINT)
        return transport

    # -- commands

    def run(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | None = None,
        stdout: Callable[[bytes], None] | None = None,
        stderr: Callable[[bytes], None] | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        get_pty: bool = False,
    ) -> int:
        """Run a command, streaming its output to the callbacks as it arrives; return its exit
        status. A sequence is quoted with shlex.join; a string goes to the login shell as is.

        A command killed by a signal returns -1 (paramiko ignores `exit-signal`). With get_pty
        stderr arrives on stdout, as on a terminal.
        """
        text = _command_text(command)
        full = _env_prefix(env or {}) + text
        deadline = (
            Deadline(
                timeout,
                f"the command {text!r} in the guest",
                "the command may still be running in the guest; give it a longer timeout",
            )
            if timeout is not None
            else None
        )
        transport = self.transport
        try:
            channel = transport.open_session(timeout=deadline.remaining() if deadline else None)
            if get_pty:
                channel.get_pty()
            channel.exec_command(full)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise GuestError(
                f"could not start {text!r} on {self._endpoint}: {e}", _LOST_HINT
            ) from e
        with channel:
            return self._pump(channel, text, stdin, stdout, stderr, deadline)

    def _pump(
        self,
        channel: paramiko.Channel,
        text: str,
        stdin: bytes | None,
        stdout: Callable[[bytes], None] | None,
        stderr: Callable[[bytes], None] | None,
        deadline: Deadline | None,
    ) -> int:
        pending = memoryview(stdin or b"")
        if not pending:
            channel.shutdown_write()
        # The channel's fileno is a pipe paramiko sets whenever stdout or stderr data (or the
        # close) arrives, so select() wakes on output without polling.
        wake = channel.fileno()
        while True:
            while channel.recv_ready():
                data = channel.recv(_CHUNK)
                if stdout is not None and data:
                    stdout(data)
            while channel.recv_stderr_ready():
                data = channel.recv_stderr(_CHUNK)
                if stderr is not None and data:
                    stderr(data)
            # sshd sends EOF only once the command's output is drained (exit-status may come
            # first); a dropped connection shows as closed.
            done = channel.closed or (channel.eof_received and channel.exit_status_ready())
            if done and not (channel.recv_ready() or channel.recv_stderr_ready()):
                break
            if pending and channel.send_ready():
                try:
                    sent = channel.send(pending[:_CHUNK].tobytes())
                except (OSError, paramiko.SSHException):
                    sent = len(pending)  # the command closed its stdin; the rest is moot
                pending = pending[sent:]
                if not pending:
                    channel.shutdown_write()
                continue
            if deadline is not None and deadline.expired():
                raise deadline.error()
            wait = deadline.remaining() if deadline is not None else 1.0
            # While stdin is pending the window may reopen without any output arriving.
            select.select([wake], [], [], min(wait, 0.05 if pending else 1.0))
        # paramiko marks a dropped connection as closed with no exit status; tell that apart
        # from a command killed by a signal (also no status) by whether the transport lives.
        status = channel.recv_exit_status()
        transport = self._client.get_transport()
        if status == -1 and (transport is None or not transport.is_active()):
            raise GuestError(
                f"the SSH connection to {self._endpoint} dropped while running {text!r}",
                _LOST_HINT,
            )
        return status

    def check(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> str:
        """Run a command and return its stdout; a non-zero exit raises GuestError. More than
        `limit` bytes of stdout raise OutputTooLarge (the guest decides how much it sends);
        only the tail of stderr is kept."""
        text = _command_text(command)
        out = _Bounded(limit, f"the guest's output of {text[:60]!r}")
        err = _Tail(_STDERR_TAIL_CHARS)
        status = self.run(command, stdin=stdin, stdout=out, stderr=err, timeout=timeout)
        if status != 0:
            tail = err.text()[-_STDERR_TAIL_CHARS:].strip()
            message = f"{text!r} failed in the guest with exit status {status}"
            if tail:
                message += f":\n{tail}"
            raise GuestError(message, "see the command's error output above")
        return out.text()

    @staticmethod
    def _get_bounded(sftp: paramiko.SFTPClient, remote: str, out: IO[bytes], limit: int) -> int:
        with sftp.open(remote, "rb") as src:
            claimed = src.stat().st_size or 0
            if claimed > limit:
                raise OutputTooLarge(
                    f"{remote} is {claimed:,} bytes, more than the limit of {limit:,}: not fetched",
                    "raise limits.output_file_mib in the config file only if you trust it",
                )
            # Prefetch no more than the limit, whatever the guest said the size is.
            src.prefetch(min(claimed, limit) or None)
            size = 0
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise OutputTooLarge(
                        f"{remote} grew past the limit of {limit:,} bytes while it was fetched",
                        "raise limits.output_file_mib in the config file only if you trust it",
                    )
                out.write(chunk)
        return size

    # -- tunnels

    @contextlib.contextmanager
    def reverse_forward(
        self,
        local_host: str,
        local_port: int,
        *,
        remote_port: int = 0,
        on_refused: Callable[[str], None] | None = None,
    ) -> Iterator[int]:
        """Listen on the guest's 127.0.0.1:`remote_port` (0: a free port) and pass every
        connection made to it on to `local_host:local_port` on this machine, over the management
        SSH connection (`ssh -R`), so the guest reaches the host without any firewall opening.

        Yields the port bound in the guest. Bytes flow both ways until both sides have closed
        (an EOF on one side is passed on as an EOF to the other). When the host side cannot be
        reached, the guest's connection is closed and `on_refused` is called once for that
        connection with a message saying so; it runs on a background thread. On exit the guest
        stops listening, open connections are closed and their threads joined (bounded).
        """
        transport = self.transport
        relay = _Relay(local_host, local_port, on_refused)
        wanted = f"{_GUEST_LOOPBACK}:{remote_port}" if remote_port else "a free loopback port"
        try:
            # Not under _forwards_lock: the transport thread may need that lock (to route a
            # connection of another tunnel) before it can deliver this request's reply.
            port = transport.request_port_forward(
                _GUEST_LOOPBACK, remote_port, self._route_forwarded
            )
        except paramiko.SSHException as e:
            raise GuestError(
                f"the guest's sshd refused to listen on {wanted} for a reverse tunnel to "
                f"{local_host}:{local_port}: {e}",
                "the port may be taken in the guest (choose another one), or the guest's sshd "
                "forbids TCP forwarding (AllowTcpForwarding/DisableForwarding in "
                "/etc/ssh/sshd_config.d/)",
            ) from e
        except (OSError, EOFError) as e:
            raise GuestError(
                f"could not set up a reverse tunnel on {self._endpoint}: {e}", _LOST_HINT
            ) from e
        relay.guest_port = port
        with self._forwards_lock:
            self._forwards[port] = relay
        try:
            yield port
        finally:
            with self._forwards_lock:
                del self._forwards[port]
                last = not self._forwards
            # A dead connection has no listener left to cancel: nothing to report then.
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                if transport.is_active():
                    if last:
                        transport.cancel_port_forward(_GUEST_LOOPBACK, port)
                    else:
                        # cancel_port_forward would also drop the handler the other tunnels use.
                        transport.global_request(
                            "cancel-tcpip-forward", (_GUEST_LOOPBACK, port), wait=True
                        )
            relay.close()

    @contextlib.contextmanager
    def local_forward(
        self,
        local_host: str,
        local_port: int,
        guest_port: int,
        *,
        max_links: int = _FORWARD_MAX_LINKS,
    ) -> Iterator[int]:
        """Listen on this machine's `local_host:local_port` (0: a free port) and pass every
        connection made to it on to the guest's 127.0.0.1:`guest_port`, over the management SSH
        connection (`ssh -L`): ingress to a service in the guest opens nothing in its firewall,
        whose egress rules stay as they are. Yields the bound local port. At most `max_links`
        connections at once; more wait in the listen backlog. On exit the listener closes and
        open connections are closed, their threads joined (bounded)."""
        try:
            listener = socket.create_server((local_host, local_port), backlog=64)
        except OSError as e:
            raise UsageError(
                f"cannot listen on {local_host}:{local_port}: {e.strerror or e}",
                "choose another port with --port (or stop what uses this one)",
            ) from e
        forward = _Forward(self.transport, listener, guest_port, max_links)
        forward.start()
        try:
            yield int(listener.getsockname()[1])
        finally:
            forward.close()

    def _route_forwarded(
        self,
        channel: paramiko.Channel,
        origin: tuple[str, int],
        server: tuple[str, int],
    ) -> None:
        # Runs on paramiko's transport thread: it must not block.
        with self._forwards_lock:
            relay = self._forwards.get(server[1])
        if relay is None:
            # A tunnel being set up or torn down: no one to hand the connection to.
            channel.close()
        else:
            relay.accept(channel)

    # -- files

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp()
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise GuestError(
                    f"could not open SFTP to {self._endpoint}: {e}",
                    "the guest's sshd must offer the sftp subsystem; " + _LOST_HINT,
                ) from e
            # A dead connection otherwise blocks a transfer forever.
            self._sftp.get_channel().settimeout(_SFTP_TIMEOUT)  # type: ignore[union-attr]
        return self._sftp

    def _upload(self, source: IO[bytes], remote: str, mode: int | None, what: str) -> None:
        sftp = self._sftp_client()
        try:
            with sftp.open(remote, "wb") as f:
                # Before any data is written, so a secret is never readable by others.
                if mode is not None:
                    f.chmod(mode)
                f.set_pipelined(True)
                while chunk := source.read(_CHUNK):
                    f.write(chunk)
        except TimeoutError as e:
            raise TimeoutExpired(
                f"copying {what} to {self._endpoint}:{remote} stalled for {_SFTP_TIMEOUT:g} s",
                _LOST_HINT,
            ) from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise GuestError(
                f"could not copy {what} to {self._endpoint}:{remote}: {e}",
                "check that the remote directory exists and is writable",
            ) from e

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        try:
            source = local.open("rb")
        except OSError as e:
            raise GuestError(
                f"cannot read {local}: {e}", "check the path of the file to copy"
            ) from e
        with source:
            self._upload(source, remote, mode, str(local))

    def put_bytes(self, data: bytes, remote: str, mode: int | None = None) -> None:
        self._upload(io.BytesIO(data), remote, mode, f"{len(data)} bytes")

    def get(self, remote: str, local: Path, *, limit: int | None = None) -> int:
        """Copy a guest file to `local`, replacing it atomically (never a half-written file);
        return its size. With `limit`, a file larger than that many bytes is refused
        (OutputTooLarge) while it streams, whatever size the guest claims, and nothing is kept."""
        sftp = self._sftp_client()
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                if limit is None:
                    size = sftp.getfo(remote, f)
                else:
                    size = self._get_bounded(sftp, remote, f, limit)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
            return int(size)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, TimeoutError):
                raise TimeoutExpired(
                    f"copying {self._endpoint}:{remote} stalled for {_SFTP_TIMEOUT:g} s",
                    _LOST_HINT,
                ) from e
            if isinstance(e, OSError | EOFError | paramiko.SSHException):
                raise GuestError(
                    f"could not copy {self._endpoint}:{remote} to {local}: {e}",
                    "check that the file exists in the guest",
                ) from e
            raise


class _Link:
    """One connection the guest made through a tunnel, and the host socket it was joined to."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel
        self.sock: socket.socket | None = None
        # Set when the guest→host direction has ended, or when the tunnel closes.
        self.guest_done = threading.Event()


class _Relay:
    """One reverse tunnel's connections. Each gets a thread that connects to the host side and
    copies host→guest, and a second one that copies guest→host.

    Only the first thread ever sends on the channel (data, EOF and CLOSE): paramiko builds a
    message under the channel's lock but sends it after releasing it, so a close from another
    thread can overtake an EOF or data, and OpenSSH then drops the whole connection ("ieof packet
    referred to nonexistent channel", paramiko issues #1115 and #1705). Here that would take the
    management session down with the tunnel.
    """

    def __init__(self, host: str, port: int, on_refused: Callable[[str], None] | None) -> None:
        self._host = host
        self._port = port
        self._on_refused = on_refused
        self.guest_port = 0
        self._lock = threading.Lock()
        self._closing = False
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self.over_limit_reported = False

    def accept(self, channel: paramiko.Channel) -> None:
        """Take a connection the guest made; returns at once (called on the transport thread)."""
        with self._lock:
            if self._closing:
                channel.close()
                return
            if len(self._links) >= _RELAY_MAX_LINKS:
                channel.close()
                refused = self._on_refused
                if refused is not None and not self.over_limit_reported:
                    self.over_limit_reported = True
                    refused(
                        f"the guest opened more than {_RELAY_MAX_LINKS} connections at once "
                        f"to its {_GUEST_LOOPBACK}:{self.guest_port}; the extra ones were closed"
                    )
                return
            link = _Link(channel)
            self._links.add(link)
            self._start(self._serve, link)

    def _start(self, target: Callable[[_Link], None], link: _Link) -> threading.Thread:
        # Called with _lock held, so close() never sees a thread it cannot join yet.
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(
            target=target, args=(link,), name=f"tunnel-{self.guest_port}", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return thread

    def _serve(self, link: _Link) -> None:
        back: threading.Thread | None = None
        try:
            try:
                sock = socket.create_connection(
                    (self._host, self._port), timeout=_RELAY_CONNECT_TIMEOUT
                )
            except OSError as e:
                link.channel.close()
                self._refused(e)
                return
            sock.settimeout(None)
            with self._lock:
                link.sock = sock
                if self._closing:
                    return
                back = self._start(self._to_host, link)
            self._to_guest(link, sock)
            # A half-closed connection lives on until the guest side ends too (or the tunnel
            # closes, which shuts the socket down and sets the event).
            link.guest_done.wait()
        finally:
            link.channel.close()  # wakes `back` if it still waits for guest data
            if back is not None:
                back.join(_RELAY_JOIN_TIMEOUT)
            if link.sock is not None:
                link.sock.close()
            with self._lock:
                self._links.discard(link)

    def _refused(self, error: OSError) -> None:
        if self._on_refused is None or self._closing:
            return
        where = f"{self._host}:{self._port}"
        if isinstance(error, ConnectionRefusedError):
            reason = f"nothing is listening on {where}"
        elif isinstance(error, TimeoutError):
            reason = f"{where} did not answer within {_RELAY_CONNECT_TIMEOUT:g} s"
        else:
            reason = f"could not connect to {where}: {error.strerror or error}"
        self._on_refused(
            f"{reason}; the guest's connection to its {_GUEST_LOOPBACK}:{self.guest_port} "
            "was closed"
        )

    @staticmethod
    def _to_guest(link: _Link, sock: socket.socket) -> None:
        """Host → guest until the host side sends EOF, then pass the EOF on."""
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := sock.recv(_CHUNK):
                link.channel.sendall(data)
            link.channel.shutdown_write()

    @staticmethod
    def _to_host(link: _Link) -> None:
        """Guest → host until the guest side sends EOF, then pass the EOF on."""
        try:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                assert link.sock is not None
                while data := link.channel.recv(_CHUNK):
                    link.sock.sendall(data)
                link.sock.shutdown(socket.SHUT_WR)
        finally:
            link.guest_done.set()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            links = list(self._links)
            threads = list(self._threads)
        _close_links(links, threads)


def _close_links(links: list[_Link], threads: list[threading.Thread]) -> None:
    """End a tunnel's connections and join their threads, within _RELAY_JOIN_TIMEOUT."""
    for link in links:
        link.guest_done.set()
        if link.sock is not None:
            # shutdown, not close: it wakes the thread blocked in recv() on this socket,
            # which then closes the channel itself.
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_RDWR)
    start = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, start + _RELAY_JOIN_TIMEOUT / 2 - time.monotonic()))
    # A thread still here waits for SSH window space the guest program never frees by
    # reading. It is parked, not between building and sending a message, so closing its
    # channel from here is safe, and wakes it.
    for link in links:
        link.channel.close()
    for thread in threads:
        thread.join(max(0.0, start + _RELAY_JOIN_TIMEOUT - time.monotonic()))


class _Forward:
    """A local forward's connections: a thread accepts on the host's listener; each connection
    gets a channel to the guest port and, as in _Relay, one thread that copies host→guest and is
    the only one to send on the channel, and one that copies guest→host."""

    def __init__(
        self,
        transport: paramiko.Transport,
        listener: socket.socket,
        guest_port: int,
        max_links: int,
    ) -> None:
        self._transport = transport
        self._listener = listener
        self._guest_port = guest_port
        self._slots = threading.BoundedSemaphore(max_links)
        self._lock = threading.Lock()
        self._closing = False
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn(self._accept_loop, None)

    def _spawn(self, target: Callable[..., None], arg: object) -> None:
        with self._lock:
            if self._closing:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            args = () if arg is None else (arg,)
            thread = threading.Thread(
                target=target, args=args, name=f"forward-{self._guest_port}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _accept_loop(self) -> None:
        while True:
            while not self._slots.acquire(timeout=0.5):
                if self._closing:
                    return
            try:
                sock, _peer = self._listener.accept()
            except OSError:
                self._slots.release()
                return  # the listener was closed
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        back: threading.Thread | None = None
        link: _Link | None = None
        try:
            try:
                peer = sock.getpeername()
                channel = self._transport.open_channel(
                    "direct-tcpip",
                    (_GUEST_LOOPBACK, self._guest_port),
                    (str(peer[0]), int(peer[1])),
                    timeout=_RELAY_CONNECT_TIMEOUT,
                )
            except (OSError, EOFError, paramiko.SSHException):
                return  # nothing listens in the guest (yet): the client sees its connection end
            link = _Link(channel)
            link.sock = sock
            with self._lock:
                if self._closing:
                    channel.close()
                    return
                self._links.add(link)
                back = threading.Thread(
                    target=_Relay._to_host, args=(link,), name="forward-back", daemon=True
                )
                back.start()
            _Relay._to_guest(link, sock)
            link.guest_done.wait()
        finally:
            if link is not None:
                link.channel.close()
                if back is not None:
                    back.join(_RELAY_JOIN_TIMEOUT)
                with self._lock:
                    self._links.discard(link)
            sock.close()
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            links = list(self._links)
            threads = list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        _close_links(links, threads)

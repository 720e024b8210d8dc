"""Wildcard entries on a REMOTE libvirt host: the relay between that host's dnsmasq and the
client's wildcard resolver (wildcards.py).

dnsmasq forwards the wildcard domains only to an address on its own host, so a resolver on the
client needs a stand-in there: the standalone, stdlib-only wildcard_relay.py, written into the
sandbox's directory on the host and started there like the remote sinkhole (remoteprogram.py).
It listens on 127.0.0.1 on a free UDP port (`server=/DOMAIN/127.0.0.1#PORT`: known before the
network is defined) and on a unix socket beside it; the client reaches that socket by running
`attach_argv` as an SSH exec command, whose stdin and stdout then carry frames both ways:

    header FRAME = !HI (payload length, tag), then the payload.

relay -> client: one frame per query, the datagram as it came (1 to MAX_PAYLOAD bytes), under a
tag of the relay's. client -> relay: the answer under the query's tag (0 to MAX_PAYLOAD bytes;
0: no answer, the tag forgotten). The relay parses no DNS and trusts nothing of it: all parsing
stays in the client's resolver. A frame longer than MAX_PAYLOAD is malformed either way: the
relay closes the client's connection, and the client's Decoder raises RelayFrameError.

The pure parts (frames, commands) and the edges (start, stop, discard through HostFiles).
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from orchestrator.egress import remoteprogram
from orchestrator.egress import wildcard_relay as program
from orchestrator.egress.remoteprogram import Started
from orchestrator.errors import SandboxError

if TYPE_CHECKING:
    from orchestrator.vm.hostfiles import HostFiles

__all__ = [
    "FRAME",
    "MAX_PAYLOAD",
    "MAX_TAG",
    "Decoder",
    "RelayFrameError",
    "RemoteRelayError",
    "Started",
    "attach_argv",
    "discard",
    "encode",
    "program_text",
    "start",
    "stop",
]

# The program's own constants: one definition of the format for both ends.
FRAME = program.FRAME
MAX_PAYLOAD = program.MAX_PAYLOAD
MAX_TAG = program.MAX_TAG
PROGRAM = "wildcard-relay.py"
SOCKET_FILE = "wildcard-relay.sock"
OUT_FILE = "wildcard-relay.out"
ERRORS_FILE = "wildcard-relay.log"


class RemoteRelayError(SandboxError):
    """The wildcard resolver's relay could not be started or stopped on the remote host."""


class RelayFrameError(RemoteRelayError):
    """The relay's channel carried something that is not a frame."""


RELAY = remoteprogram.Program(
    source="wildcard_relay.py",
    file=PROGRAM,
    out=OUT_FILE,
    log=ERRORS_FILE,
    what="the wildcard resolver's relay",
    purpose="wildcard entries (--allow '*.DOMAIN:PORT') run a relay there",
    instead="allow the names one by one instead of a wildcard",
    error=RemoteRelayError,
)


def program_text() -> str:
    """The program the remote host runs: wildcard_relay.py, as shipped with this package."""
    return RELAY.text()


# ---- frames ------------------------------------------------------------------------------------


def encode(tag: int, payload: bytes) -> bytes:
    """One frame: `payload` (at most MAX_PAYLOAD bytes) under `tag`. Pure."""
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag {tag} is not a uint32")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return FRAME.pack(len(payload), tag) + payload


class Decoder:
    """The frames in a byte stream, as it comes in pieces. What it holds between pieces is
    less than one frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames `data` completes, in order, as (tag, payload). A header announcing more
        than MAX_PAYLOAD bytes raises RelayFrameError: the stream is not the relay's (or is
        out of step), and nothing after it can be trusted to be a frame."""
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        start = 0
        while len(self._buffer) - start >= FRAME.size:
            length, tag = FRAME.unpack_from(self._buffer, start)
            if length > MAX_PAYLOAD:
                raise RelayFrameError(
                    f"the wildcard relay's channel announced a frame of {length} bytes "
                    f"(at most {MAX_PAYLOAD})",
                    "the relay's channel is out of step: `sandbox destroy` and `up` again",
                )
            end = start + FRAME.size + length
            if len(self._buffer) < end:
                break
            frames.append((tag, bytes(self._buffer[start + FRAME.size : end])))
            start = end
        del self._buffer[:start]
        return frames


# ---- commands and the edges --------------------------------------------------------------------


def socket_path(where: str) -> str:
    """The relay's unix socket in the sandbox's directory. Pure."""
    return posixpath.join(RELAY.checked(where), SOCKET_FILE)


def program_args(
    where: str, max_pending: int | None = None, answer_seconds: float | None = None
) -> list[str]:
    """`serve`'s arguments (the program's defaults unless given). Pure."""
    args = ["serve", "--socket", socket_path(where)]
    if max_pending is not None:
        args += ["--max-pending", str(int(max_pending))]
    if answer_seconds is not None:
        args += ["--answer-seconds", repr(float(answer_seconds))]
    return args


def start_argv(
    where: str, max_pending: int | None = None, answer_seconds: float | None = None
) -> list[str]:
    """The command that starts the relay in `where` (written there before) detached, waits until
    it listens, and prints its pid and UDP port. Pure."""
    return remoteprogram.start_argv(RELAY, where, program_args(where, max_pending, answer_seconds))


def stop_argv(where: str) -> list[str]:
    """The command that stops every process of ours running the relay's program in `where`.
    Pure."""
    return remoteprogram.stop_argv(RELAY, where)


def attach_argv(where: str) -> list[str]:
    """What the client runs on the host (an SSH exec command, shlex.join'ed) to reach the relay
    in `where`: its stdin and stdout become the relay's unix socket. It exits 0 when either
    side ends, 1 with a message on stderr when no relay listens there. Pure."""
    return ["python3", RELAY.path(where), "attach", "--socket", socket_path(where)]


def start(
    host: HostFiles,
    where: str,
    *,
    max_pending: int | None = None,
    answer_seconds: float | None = None,
) -> Started:
    """Write the relay into `where` (made 0700 if it is not there) and start it on the host; its
    pid and UDP port (on the host's 127.0.0.1) once it listens."""
    args = program_args(where, max_pending, answer_seconds)
    return remoteprogram.start(host, RELAY, where, args, "listen on 127.0.0.1")


def stop(host: HostFiles, where: str) -> list[int]:
    """Stop every relay of ours in `where` (a pid never recorded too), and any `attach` of it
    still running; the pids stopped."""
    return remoteprogram.stop(host, RELAY, where)


def discard(uri: str, where: str) -> None:
    """Rollback of a half-built `up`: the relays of ours in `where` stopped. Best effort:
    `destroy --name NAME` tries again."""
    remoteprogram.discard(uri, RELAY, where)

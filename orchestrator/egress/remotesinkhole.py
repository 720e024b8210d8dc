"""Sinkhole mode on a REMOTE libvirt host (`up --sinkhole` with qemu+ssh://): the sinkhole runs
beside the sandbox's network on that host, and its records come back to the client's logs in
the local sinkhole's format, where `sinkhole.read_records` and `sinkhole.attach` take them
unchanged.

Nothing of sandbox is installed on a remote host, so the program that runs there is the
standalone, stdlib-only sinkhole_service.py: written over SFTP into the sandbox's directory of
host-side records (remotecapture.directory: root's, 0700, removed at destroy), started detached
there by the host's python3 as root, with the local sinkhole's bounds (remoteprogram.py: how,
shared with the wildcard resolver's relay). It binds the gateway on a free port (the host
guard's redirect leads there), gives up root, and writes one JSON line per connection with the
raw first bytes. Collections bring that file back over SFTP (bounded, only what is new) and
turn each line into a local record with the local sinkhole's own code (payload.summarize through
sinkhole.record): the guest's bytes are parsed on the client, by the tested parser, and every
line is validated first (the guest's bytes, through the host).

A process is signalled only if it is a live python running that sandbox's copy of the program
(its path, in a root-only directory, on its command line) as root or nobody
(remoteprogram.OURS).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import jsontext
from orchestrator.capture import payload
from orchestrator.egress import remoteprogram, sinkhole
from orchestrator.egress.remoteprogram import Started
from orchestrator.errors import SandboxError
from orchestrator.files import atomic_write

if TYPE_CHECKING:
    from orchestrator.vm.hostfiles import HostFiles

PROGRAM = "sinkhole.py"
# On the host, in the sandbox's directory: the raw records, and the program's own output.
RAW_FILE = "sinkhole-raw.jsonl"
OUT_FILE = "sinkhole.out"
ERRORS_FILE = "sinkhole.log"
# logs/: how far the host's raw records were taken, and for which sinkhole.
CURSOR_FILE = "sinkhole-remote.json"
# One raw line: base64 of the first bytes, and its other fields (a few dozen bytes each).
MAX_LINE = 4 * ((payload.READ_BYTES + 2) // 3) + 512
# The program stops writing at MAX_LOG_BYTES: the client reads no more than that (and a line).
MAX_RAW_BYTES = sinkhole.MAX_LOG_BYTES + MAX_LINE
# Record times: seconds since the epoch, before the year 5000.
_MAX_TIME = 1e11


class RemoteSinkholeError(SandboxError):
    """The sinkhole could not be started, stopped or read on the remote libvirt host."""


SINKHOLE = remoteprogram.Program(
    source="sinkhole_service.py",
    file=PROGRAM,
    out=OUT_FILE,
    log=ERRORS_FILE,
    what="the sinkhole",
    purpose="sinkhole mode runs its sinkhole there",
    instead="drop --sinkhole",
    error=RemoteSinkholeError,
)


def program_text() -> str:
    """The program the remote host runs: sinkhole_service.py, as shipped with this package."""
    return SINKHOLE.text()


def _checked(path: str) -> str:
    return SINKHOLE.checked(path)


def program_args(where: str, gateway: str) -> list[str]:
    """The program's arguments: the gateway, its record file in `where`, and the local
    sinkhole's bounds. Pure."""
    return [
        "--address",
        str(ipaddress.IPv4Address(gateway)),
        "--records",
        posixpath.join(_checked(where), RAW_FILE),
        "--read-bytes",
        str(payload.READ_BYTES),
        "--read-seconds",
        str(sinkhole.READ_SECONDS),
        "--max-open",
        str(sinkhole.MAX_OPEN),
        "--max-connections",
        str(sinkhole.MAX_CONNECTIONS),
        "--max-log-bytes",
        str(sinkhole.MAX_LOG_BYTES),
    ]


def start_argv(where: str, gateway: str) -> list[str]:
    """The command that starts the program in `where` (written there before) detached, waits
    until it listens, and prints its pid and port. Pure."""
    return remoteprogram.start_argv(SINKHOLE, where, program_args(where, gateway))


def stop_argv(where: str) -> list[str]:
    """The command that stops every sinkhole of ours running in `where`. Pure."""
    return remoteprogram.stop_argv(SINKHOLE, where)


def start(host: HostFiles, where: str, gateway: str) -> Started:
    """Write the program into `where` (made 0700 if it is not there) and start it on the host,
    listening on `gateway`; its pid and port once it listens."""
    args = program_args(where, gateway)
    return remoteprogram.start(host, SINKHOLE, where, args, f"listen on {gateway}")


def stop(host: HostFiles, where: str) -> list[int]:
    """Stop every sinkhole of ours in `where`; the pids stopped."""
    return remoteprogram.stop(host, SINKHOLE, where)


def discard(uri: str, where: str) -> None:
    """Rollback of a half-built `up`: every sinkhole of ours in `where` stopped (the directory
    goes with the host-side records', remotecapture.discard). Best effort: `destroy --name NAME`
    tries again."""
    remoteprogram.discard(uri, SINKHOLE, where)


# ---- bringing the records back ------------------------------------------------------------------


def _port(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return value
    return None


def _ipv4(value: object) -> str | None:
    if not isinstance(value, str) or len(value) > 15:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def convert(line: bytes) -> dict[str, object] | None:
    """One raw line of the remote program as the local sinkhole's record (sinkhole.record: the
    first bytes summarised here), or None if it is not a well-formed one. Pure."""
    if len(line) > MAX_LINE:
        return None
    data = jsontext.object_or_none(line)
    if data is None:
        return None
    stamp, src, sport = data.get("time"), _ipv4(data.get("src")), _port(data.get("sport"))
    if isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return None
    if not math.isfinite(stamp) or not 0 <= stamp < _MAX_TIME or src is None or sport is None:
        return None
    dst, dport = data.get("dst"), data.get("dport")
    target: tuple[str, int] | None = None
    if dst is not None or dport is not None:
        address, port = _ipv4(dst), _port(dport)
        if address is None or port is None:
            return None
        target = (address, port)
    raw = data.get("data")
    if not isinstance(raw, str):
        return None
    try:
        first = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    if len(first) > payload.READ_BYTES:
        return None
    return sinkhole.record(float(stamp), (src, sport), target, first)


@dataclass(frozen=True)
class Cursor:
    """How far the raw records of one remote sinkhole (`key`) were taken."""

    key: str = ""
    offset: int = 0

    @classmethod
    def load(cls, path: Path, key: str) -> Cursor:
        """The cursor of `key`; a fresh one for another key (a new sinkhole) or none."""
        try:
            data = jsontext.object_or_none(path.read_bytes()) or {}
        except FileNotFoundError:
            data = {}
        offset = data.get("offset")
        if data.get("key") != key or not isinstance(offset, int) or isinstance(offset, bool):
            return cls(key)
        return cls(key, max(0, min(offset, MAX_RAW_BYTES)))


@dataclass(frozen=True)
class Taken:
    """What a chunk of raw records gave: local record lines, bytes consumed, lines refused."""

    lines: tuple[bytes, ...]
    consumed: int
    refused: int


def take(chunk: bytes, final: bool = False) -> Taken:
    """The complete lines of `chunk` (raw records from a cursor on) as local record lines.
    A last line without its end is left for the next fetch, unless it cannot be a line (longer
    than MAX_LINE) or this is the `final` fetch. Pure."""
    lines: list[bytes] = []
    refused = 0
    end = chunk.rfind(b"\n") + 1
    body, rest = chunk[:end], chunk[end:]
    if rest and (final or len(rest) > MAX_LINE):
        body, rest = chunk, b""
    for raw in body.split(b"\n"):
        if not raw:
            continue
        converted = convert(raw)
        if converted is None:
            refused += 1
            continue
        lines.append((json.dumps(converted, separators=(",", ":")) + "\n").encode())
    return Taken(tuple(lines), len(chunk) - len(rest), refused)


@dataclass(frozen=True)
class Fetched:
    records: int = 0
    warnings: tuple[str, ...] = ()


def fetch(host: HostFiles, where: str, logs: Path, key: str, *, final: bool = False) -> Fetched:
    """The new raw records of the sinkhole `key` in `where` on the host, into the local
    sinkhole's record file in `logs` (bounded: at most MAX_RAW_BYTES of the host's file, and
    the local file at most sinkhole.MAX_LOG_BYTES). `final`: the sinkhole is stopped, a last
    line without its end is taken as it is."""
    remote = posixpath.join(_checked(where), RAW_FILE)
    logs.mkdir(parents=True, exist_ok=True)
    cursor_path = logs / CURSOR_FILE
    cursor = Cursor.load(cursor_path, key)
    if host.stat(remote) is None:
        return Fetched()
    warnings: list[str] = []
    with host.open_read(remote) as reader:
        size = min(reader.size, MAX_RAW_BYTES)
        if reader.size > MAX_RAW_BYTES:
            warnings.append(
                f"{remote} on {host.where} holds {reader.size} bytes, more than the sinkhole "
                f"writes: only the first {MAX_RAW_BYTES} were read"
            )
        offset = cursor.offset
        if size < offset:
            warnings.append(f"{remote} on {host.where} was rewritten: read again from its start")
            offset = 0
        chunk = reader.read_at(offset, size - offset) if size > offset else b""
    taken = take(chunk, final)
    if taken.refused:
        warnings.append(f"{taken.refused} malformed sinkhole record(s) from {host.where} skipped")
    records = logs / sinkhole.RECORDS_FILE
    with records.open("ab") as out:
        os.chmod(out.fileno(), 0o600)
        room = sinkhole.MAX_LOG_BYTES - out.tell()
        kept = 0
        for line in taken.lines:
            if len(line) > room:
                warnings.append("the sinkhole's records are full: later ones were not kept")
                break
            out.write(line)
            room -= len(line)
            kept += 1
    atomic_write(cursor_path, json.dumps({"key": key, "offset": offset + taken.consumed}) + "\n")
    return Fetched(kept, tuple(warnings))


def fetch_key(created: str, pid: int) -> str:
    """Which sinkhole a cursor is for: the sandbox's creation and the sinkhole's pid (a new
    sandbox of the same name starts its records anew). Pure."""
    return f"{created} {pid}"

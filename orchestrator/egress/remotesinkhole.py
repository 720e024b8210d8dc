"""Sinkhole mode on a REMOTE libvirt host (`up --sinkhole` with qemu+ssh://): the sinkhole runs
beside the sandbox's network on that host, and its records come back to the client's logs in
the local sinkhole's format, where `sinkhole.read_records` and `sinkhole.attach` take them
unchanged.

Nothing of sandbox is installed on a remote host, so the program that runs there is the
standalone, stdlib-only sinkhole_service.py: written over SFTP into the sandbox's directory of
host-side records (remotecapture.directory: root's, 0700, removed at destroy), started detached
there by the host's python3 as root, with the local sinkhole's bounds. It binds the gateway on a
free port (the host guard's redirect leads there), gives up root, and writes one JSON line per
connection with the raw first bytes. Collections bring that file back over SFTP (bounded, only
what is new) and turn each line into a local record with the local sinkhole's own code
(payload.summarize through sinkhole.record): the guest's bytes are parsed on the client, by the
tested parser, and every line is validated first (the guest's bytes, through the host).

A process is signalled only if it is a live python running that sandbox's copy of the program
(its path, in a root-only directory, on its command line) as root or nobody.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import math
import os
import posixpath
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import jsontext
from orchestrator.capture import payload, remotecapture
from orchestrator.capture.remotecapture import ROOT
from orchestrator.egress import sinkhole
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
_START_STEPS = 200  # of 0.05 s: within hostfiles.RUN_TIMEOUT
_MESSAGE_MAX = 2000
# Record times: seconds since the epoch, before the year 5000.
_MAX_TIME = 1e11


class RemoteSinkholeError(SandboxError):
    """The sinkhole could not be started, stopped or read on the remote libvirt host."""


@dataclass(frozen=True)
class Started:
    pid: int
    port: int


def program_text() -> str:
    """The program the remote host runs: sinkhole_service.py, as shipped with this package."""
    return resources.files("orchestrator.egress").joinpath("sinkhole_service.py").read_text()


def _checked(path: str) -> str:
    return remotecapture.checked(path, RemoteSinkholeError)


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


# $1: a pid. A live python (not a zombie), as root or nobody, running $prog: ours. Builtins
# first: a scan of every process forks only for the pythons.
_OURS = r"""
nobody=$(id -u nobody 2>/dev/null) || nobody=65534
ours() {
    c=
    read -r c 2>/dev/null <"/proc/$1/comm" || return 1
    case $c in python*) ;; *) return 1 ;; esac
    z= u=
    while read -r k v _; do
        case $k in State:) z=$v ;; Uid:) u=$v ;; esac
    done 2>/dev/null <"/proc/$1/status" || return 1
    [ "$z" != Z ] || return 1
    [ "$u" = 0 ] || [ "$u" = "$nobody" ] || return 1
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$prog"
}
"""

_START = (
    r"""set -u
dir=$1 prog=$2 out=$3 log=$4
shift 4
"""
    + _OURS
    + rf"""
command -v python3 >/dev/null 2>&1 || {{ echo "python3 is not installed" >&2; exit 127; }}
command -v setsid >/dev/null 2>&1 || {{ echo "setsid is not installed" >&2; exit 127; }}
# Its own session: it outlives this channel (no SIGHUP when the login ends).
setsid python3 "$prog" "$@" </dev/null >"$out" 2>"$log" &
pid=$!
i=0
while [ $i -lt {_START_STEPS} ]; do
    if [ ! -d "/proc/$pid" ] || grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"; then
        head -c {_MESSAGE_MAX} "$log" >&2
        exit 3
    fi
    port=$(sed -n 's/^listening \([0-9][0-9]*\)$/\1/p' "$out")
    if [ -n "$port" ] && ours $pid; then echo "$pid $port"; exit 0; fi
    sleep 0.05
    i=$((i + 1))
done
kill -TERM $pid
head -c {_MESSAGE_MAX} "$log" >&2
exit 4
"""
)

# $1: the directory; then recorded pids. Stops every sinkhole of ours running there (a pid not
# recorded too: an `up` killed mid-way) and prints the pids it stopped.
_STOP = (
    r"""set -u
dir=$1 prog=$1/"""
    + PROGRAM
    + r"""
shift
"""
    + _OURS
    + r"""
pids=""
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    ours "$p" && pids="$pids $p"
done
"""
    + remotecapture.STOP_PIDS
)


def start_argv(where: str, gateway: str) -> list[str]:
    """The command that starts the program in `where` (written there before) detached, waits
    until it listens, and prints its pid and port. Pure."""
    where = _checked(where)
    return [
        "sh",
        "-c",
        _START,
        "sh",
        where,
        posixpath.join(where, PROGRAM),
        posixpath.join(where, OUT_FILE),
        posixpath.join(where, ERRORS_FILE),
        *program_args(where, gateway),
    ]


def stop_argv(where: str) -> list[str]:
    """The command that stops every sinkhole of ours running in `where`. Pure."""
    return ["sh", "-c", _STOP, "sh", _checked(where)]


def start(host: HostFiles, where: str, gateway: str) -> Started:
    """Write the program into `where` (made 0700 if it is not there) and start it on the host,
    listening on `gateway`; its pid and port once it listens."""
    where = _checked(where)
    made = host.run(["mkdir", "-p", "-m", "0700", ROOT, where])
    if made.status != 0:
        raise RemoteSinkholeError(
            f"cannot make {where} on {host.where}: "
            f"{made.stderr.strip()[:_MESSAGE_MAX] or 'mkdir failed'}",
            "the sinkhole runs as root there: connect as root (qemu+ssh://root@HOST/system), "
            "or drop --sinkhole",
        )
    text = program_text().encode()
    with host.open_write(posixpath.join(where, PROGRAM)) as out:
        out.write_at(0, text)
    ran = host.run(start_argv(where, gateway))
    detail = ran.stderr.strip()[:_MESSAGE_MAX]
    if ran.status == 127:
        raise RemoteSinkholeError(
            f"{detail or 'python3 is not installed'} on {host.where}: sinkhole mode runs its "
            "sinkhole there with the host's python3",
            "install it there (apt-get install python3-minimal), or drop --sinkhole",
        )
    words = ran.stdout.split()
    if ran.status != 0 or len(words) != 2 or not all(w.isdigit() for w in words):
        raise RemoteSinkholeError(
            f"the sinkhole could not listen on {gateway} on {host.where}: "
            f"{detail or f'exit {ran.status}'}",
            "check that the login is root there and that libvirtd's networks are in the same "
            "network namespace as its sshd; or drop --sinkhole",
        )
    pid, port = int(words[0]), int(words[1])
    if not 0 < port < 65536:
        raise RemoteSinkholeError(
            f"the sinkhole on {host.where} reported port {port}", "try `sandbox up` again"
        )
    return Started(pid, port)


def stop(host: HostFiles, where: str) -> list[int]:
    """Stop every sinkhole of ours in `where`; the pids stopped."""
    ran = host.run(stop_argv(where))
    if ran.status != 0:
        raise RemoteSinkholeError(
            f"cannot stop the sinkhole in {where} on {host.where}: "
            f"{ran.stderr.strip()[:_MESSAGE_MAX] or f'exit {ran.status}'}",
            f"`sandbox destroy` tries again; or stop the python3 running {where}/{PROGRAM} there",
        )
    return [int(w) for w in ran.stdout.split() if w.isdigit()]


def discard(uri: str, where: str) -> None:
    """Rollback of a half-built `up`: every sinkhole of ours in `where` stopped (the directory
    goes with the host-side records', remotecapture.discard). Best effort: `destroy --name NAME`
    tries again."""
    from orchestrator.vm import hostfiles

    with contextlib.suppress(SandboxError), hostfiles.on_host(uri) as host:
        stop(host, where)


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

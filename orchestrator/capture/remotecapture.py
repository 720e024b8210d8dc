"""The host's records of a guest's traffic on a REMOTE libvirt host: the flow record
(hostflows.py) and `--pcap` (pcap.py), the same tcpdump invocations run on that host, over the
SSH login that reads its files (vm/hostfiles.py), and their files brought back to the client's
logs directory, where the local readers (hostflows.read_flows, payload.read_segments,
`tcpdump -r`) take them unchanged.

On the host each sandbox's rings live in one directory, ROOT/NAME: /var/lib/libvirt is root's
(no other user of the host can put a file or a symlink there first, as anyone can in /var/tmp),
it is where the host's operator already sized the disk for the sandboxes' volumes and libvirt's
dnsmasq logs, and systemd-tmpfiles does not age it. It is not the storage pool's own directory
(/var/lib/libvirt/sandbox), where libvirt would list it as a volume. The name is the sandbox's,
like its domain's, so that `destroy` finds it without state. tcpdump runs there detached
(`setsid`, its own session: it outlives the SSH channel that started it) and writes the same
bounded rings as locally; its pid goes into the sandbox's state.

The remote host's files are not trusted blindly: only the ring's own file names are read, each
at most what tcpdump can write into one (`Ring.max_file_bytes`); a process is signalled only if
it is a live tcpdump writing into that sandbox's directory.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from orchestrator import paths
from orchestrator.capture import hostflows, pcap
from orchestrator.errors import SandboxError
from orchestrator.state import validate_name

if TYPE_CHECKING:
    from orchestrator.vm.hostfiles import HostFiles

ROOT = "/var/lib/libvirt/sandbox-records"
# A copy is the remote file's prefix while their first bytes agree: the pcap header (24 bytes)
# and the first packet's header (16, its time stamp): a ring file tcpdump reopened (truncated
# and written anew) starts with another time stamp.
HEAD_BYTES = 64
# Bytes read at once from a remote file (one SFTP readv, kept in memory).
CHUNK = 4 << 20
# tcpdump moves to the ring's next file once one is past -C millions of bytes, after writing the
# packet that took it past: at most one more record, of at most libpcap's largest snap length.
_MAX_RECORD = 16 + 262144
# The start script waits this many steps of 0.05 s for tcpdump to listen (within hostfiles'
# RUN_TIMEOUT for the whole script).
_START_STEPS = 200
_STOP_STEPS = 100
_MESSAGE_MAX = 2000


class RemoteCaptureError(SandboxError):
    """tcpdump could not be started, stopped or read on the remote libvirt host."""


@dataclass(frozen=True)
class Ring:
    """One ring of tcpdump files: BASE0 .. BASE{files-1}, each at most `file_mib` millions of
    bytes (tcpdump -C) and one packet."""

    base: str
    file_mib: int
    files: int

    @property
    def max_file_bytes(self) -> int:
        return self.file_mib * 1_000_000 + _MAX_RECORD

    def names(self) -> list[str]:
        return [f"{self.base}{i}" for i in range(self.files)]


FLOWS = Ring(hostflows.FILE_PREFIX, hostflows.FILE_MIB, hostflows.FILES)
PCAP = Ring(paths.PCAP_FILE, pcap.RING_FILE_MIB, pcap.RING_FILES)
RINGS = (FLOWS, PCAP)


def rings_of(pcap_pid: int | None) -> tuple[Ring, ...]:
    """The rings a sandbox has on its host: the flow record, and --pcap's if it was started
    (each ring file looked for costs a round trip to the host). Pure."""
    return RINGS if pcap_pid else (FLOWS,)


def directory(name: str) -> str:
    """The sandbox's directory on the remote host. Pure."""
    return posixpath.join(ROOT, validate_name(name))


def checked(path: str, error: type[SandboxError] = RemoteCaptureError) -> str:
    """`path` if it is a sandbox's directory under ROOT, else `error`. Every script run on the
    host (here and in remotesinkhole.py) gets a directory of ours, never a path from elsewhere
    (a state file is the user's, but a removal with `rm -rf` is ours to bound)."""
    if posixpath.dirname(path) != ROOT:
        raise error(
            f"{path!r} is not a directory of sandbox's records on the libvirt host",
            f"the state file names another; records live under {ROOT}",
        )
    validate_name(posixpath.basename(path))
    return path


def flows_args(interface: str, where: str) -> list[str]:
    """tcpdump's arguments for the flow record of `interface` into the directory `where`."""
    return hostflows.tcpdump_args(
        interface,
        PurePosixPath(where) / FLOWS.base,
        file_mib=FLOWS.file_mib,
        files=FLOWS.files,
    )


def pcap_args(interface: str, where: str) -> list[str]:
    """tcpdump's arguments for `--pcap` of `interface` into the directory `where`."""
    return pcap.pcap_args(
        interface, PurePosixPath(where) / PCAP.base, file_mib=PCAP.file_mib, files=PCAP.files
    )


# $1: a pid. A live tcpdump (not a zombie) with an argument inside the directory $dir: ours.
_OURS = r"""
ours() {
    # `read`, a builtin: a scan of every process forks only for the tcpdumps.
    c=
    read -r c 2>/dev/null <"/proc/$1/comm" || return 1
    [ "$c" = tcpdump ] || return 1
    grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null && return 1
    tr '\0' '\n' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$dir/"
}
"""

_START = (
    r"""set -u
dir=$1 log=$2 first=$3
shift 3
"""
    + _OURS
    + rf"""
command -v tcpdump >/dev/null 2>&1 || {{ echo "tcpdump is not installed" >&2; exit 127; }}
command -v setsid >/dev/null 2>&1 || {{ echo "setsid is not installed" >&2; exit 127; }}
# Both named: both made 0700 (`up` removed an earlier sandbox's first, remotecapture.clear).
mkdir -p -m 0700 "${{dir%/*}}" "$dir" || exit 2
# Its own session: it outlives this channel (no SIGHUP when the login ends).
setsid tcpdump "$@" </dev/null >/dev/null 2>"$log" &
pid=$!
i=0
while [ $i -lt {_START_STEPS} ]; do
    # Not `ours` yet: until setsid has exec'd tcpdump, the child's name is another.
    if [ ! -d "/proc/$pid" ] || grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"; then
        head -c {_MESSAGE_MAX} "$log" >&2
        exit 3
    fi
    if grep -q "listening on" "$log" && [ -e "$first" ] && ours $pid; then echo $pid; exit 0; fi
    sleep 0.05
    i=$((i + 1))
done
kill -TERM $pid
head -c {_MESSAGE_MAX} "$log" >&2
exit 4
"""
)

# The end of every stop script here and in remotesinkhole.py: TERM the processes in $pids (each
# checked with the script's own `ours`), wait while any is still ours, KILL what is left (stuck
# writing to a dead disk or similar: what it held is lost either way); print the pids stopped.
STOP_PIDS = rf"""[ -n "$pids" ] || exit 0
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt {_STOP_STEPS} ]; do
    left=""
    for p in $pids; do ours "$p" && left="$left $p"; done
    [ -n "$left" ] || {{ echo $pids; exit 0; }}
    sleep 0.05
    i=$((i + 1))
done
kill -KILL $left 2>/dev/null
echo $pids
"""

# $1: the directory; then the recorded pids to stop (each only if ours), and every other tcpdump
# of ours there. Prints the pids it stopped.
_STOP = (
    r"""set -u
dir=$1
shift
"""
    + _OURS
    + r"""
pids=""
for p in "$@"; do ours "$p" && pids="$pids $p"; done
# And any other tcpdump writing there (a pid not recorded: an `up` killed mid-way), so that
# nothing goes on writing into the directory once it is removed.
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case " $pids " in *" $p "*) continue ;; esac
    ours "$p" && pids="$pids $p"
done
"""
    + STOP_PIDS
)


def start_argv(where: str, ring: Ring, tcpdump_args: Sequence[str]) -> list[str]:
    """The command that starts tcpdump ARGS detached in the directory `where` (made 0700 if
    it is not there), waits until it listens and its first file exists, and prints its pid. Pure."""
    where = checked(where)
    log = posixpath.join(where, ring.base + pcap.STDERR_SUFFIX)
    first = posixpath.join(where, ring.base + "0")
    return ["sh", "-c", _START, "sh", where, log, first, *tcpdump_args]


def stop_argv(where: str, pids: Iterable[int] = ()) -> list[str]:
    """The command that stops tcpdump `pids` (each only if it is a live tcpdump writing into
    `where`) and any other tcpdump writing there, and prints those it stopped. Pure."""
    return ["sh", "-c", _STOP, "sh", checked(where), *(str(int(p)) for p in pids)]


def remove_argv(where: str) -> list[str]:
    """The command that removes the directory `where` and everything in it. Pure."""
    return ["rm", "-rf", "--one-file-system", "--", checked(where)]


def start(
    host: HostFiles, interface: str, where: str, ring: Ring, args: Sequence[str], hint: str = ""
) -> int:
    """Start tcpdump ARGS on the remote host into `where` (`clear` it first); its pid once it
    listens on `interface`."""
    ran = host.run(start_argv(where, ring, args))
    detail = ran.stderr.strip()[:_MESSAGE_MAX]
    if ran.status == 127:
        raise RemoteCaptureError(
            f"{detail or 'tcpdump is not installed'} on {host.where}",
            "install it there (apt-get install tcpdump)" + (f", or {hint}" if hint else ""),
        )
    if ran.status == 2:
        raise RemoteCaptureError(
            f"cannot make {where} on {host.where}: {detail or 'mkdir failed'}",
            f"the login must be root there to capture packets: connect as root "
            f"(qemu+ssh://root@HOST/system){f', or {hint}' if hint else ''}",
        )
    words = ran.stdout.split()
    if ran.status != 0 or len(words) != 1 or not words[0].isdigit():
        raise RemoteCaptureError(
            f"tcpdump could not capture on {interface} on {host.where}: "
            f"{detail or f'exit {ran.status}'}",
            "check that the login is root there and that libvirtd's networks are in the same "
            "network namespace as its sshd" + (f"; or {hint}" if hint else ""),
        )
    return int(words[0])


def stop(host: HostFiles, where: str, pids: Iterable[int] = ()) -> list[int]:
    """Stop our tcpdump `pids` in `where`, and any other tcpdump writing there; the pids
    stopped. A pid that is gone or is not ours (reused) is left alone."""
    argv = stop_argv(where, pids)
    ran = host.run(argv)
    if ran.status != 0:
        raise RemoteCaptureError(
            f"cannot stop tcpdump in {where} on {host.where}: "
            f"{ran.stderr.strip()[:_MESSAGE_MAX] or f'exit {ran.status}'}",
            f"`sandbox destroy` tries again; or stop the tcpdump writing into {where} there",
        )
    return [int(w) for w in ran.stdout.split() if w.isdigit()]


def remove(host: HostFiles, where: str) -> None:
    ran = host.run(remove_argv(where))
    if ran.status != 0:
        raise RemoteCaptureError(
            f"cannot remove {where} on {host.where}: "
            f"{ran.stderr.strip()[:_MESSAGE_MAX] or f'exit {ran.status}'}",
            "`sandbox destroy` tries again; or remove it there yourself",
        )


def clear(host: HostFiles, where: str) -> None:
    """What an earlier sandbox of the same name left in `where` (an `up` killed mid-way): its
    tcpdump stopped, the directory removed."""
    stop(host, where)
    remove(host, where)


# ---- bringing the files back -------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """A local copy of a remote file: its size and first bytes (HEAD_BYTES at most)."""

    size: int
    head: bytes


def resume_at(copy: Copy | None, size: int, head: bytes) -> int | None:
    """Where to go on copying a remote file of `size` bytes starting with `head` into `copy`:
    None when the copy is whole, 0 when it must be copied anew (none yet, or the remote file
    was rewritten: shorter, or other first bytes), else the copy's size. Pure."""
    if copy is None:
        return 0
    common = min(len(copy.head), len(head))
    if size < copy.size or copy.head[:common] != head[:common]:
        return 0
    return None if size == copy.size else copy.size


def _local_copy(path: Path) -> Copy | None:
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return Copy(size, handle.read(HEAD_BYTES))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Fetched:
    """What a fetch brought back: bytes copied, files found on the host, and what it could not
    do."""

    copied: int = 0
    files: int = 0
    warnings: tuple[str, ...] = ()


def _fetch_file(
    host: HostFiles, remote: str, local: Path, limit: int
) -> tuple[int, list[str]] | None:
    """(bytes copied, warnings), None when the host has no such file."""
    stat = host.stat(remote)
    if stat is None:
        return None
    warnings = []
    with host.open_read(remote) as reader:
        size = min(reader.size, limit)
        if reader.size > limit:
            warnings.append(
                f"{remote} on {host.where} holds {reader.size} bytes, more than tcpdump writes "
                f"into one file of its ring: only the first {limit} were copied"
            )
        head = reader.read_at(0, min(size, HEAD_BYTES))
        start_at = resume_at(_local_copy(local), size, head)
        if start_at is None:
            return 0, warnings
        # Anew: into a file beside it, renamed over the copy once whole (readers of the logs
        # never see half of it); else appended (a reader sees at most a packet cut short,
        # which tcpdump -r and payload.py skip).
        target = local if start_at else local.with_name(f".{local.name}.part")
        copied = 0
        with target.open("r+b" if start_at else "wb") as out:
            out.seek(start_at)
            for offset in range(start_at, size, CHUNK):
                data = reader.read_at(offset, min(CHUNK, size - offset))
                if not data:
                    break
                out.write(data)
                copied += len(data)
            out.truncate()
        if not start_at:
            os.replace(target, local)
    # The ring's order is its files' times (pcap.ring_files): the copy keeps the host's.
    os.utime(local, (stat.mtime, stat.mtime))
    return copied, warnings


def fetch(host: HostFiles, where: str, logs: Path, rings: Sequence[Ring] = RINGS) -> Fetched:
    """Bring the files of `rings` in `where` on the remote host to `logs` (same names), only
    what is new since the last fetch. A file that cannot be read is a warning: the next fetch
    tries again."""
    where = checked(where)
    logs.mkdir(parents=True, exist_ok=True)
    copied, files, warnings = 0, 0, []
    for ring in rings:
        for name in ring.names():
            try:
                done = _fetch_file(
                    host, posixpath.join(where, name), logs / name, ring.max_file_bytes
                )
            except (SandboxError, OSError) as exc:
                message = exc.message if isinstance(exc, SandboxError) else str(exc)
                warnings.append(f"{name} not copied from {host.where}: {message}")
                continue
            if done is None:
                continue
            more, warned = done
            copied += more
            files += 1
            warnings += warned
    return Fetched(copied, files, tuple(warnings))


def discard(uri: str, where: str) -> None:
    """Rollback of a half-built `up`: every tcpdump of ours in `where` stopped, the directory
    removed. Best effort: `destroy --name NAME` tries again (the directory's name derives from
    the sandbox's)."""
    from orchestrator.vm import hostfiles

    with contextlib.suppress(SandboxError), hostfiles.on_host(uri) as host:
        clear(host, where)

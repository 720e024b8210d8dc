"""A program of ours that runs on a REMOTE libvirt host beside a sandbox's network: the sinkhole
(remotesinkhole.py, sinkhole_service.py) and the wildcard resolver's relay (remoterelay.py,
wildcard_relay.py). What they have in common lives here.

Nothing of sandbox is installed on a remote host, so each is a standalone, stdlib-only file of
this package: written over SFTP into the sandbox's directory of host-side records
(remotecapture.directory: root's, 0700, removed at destroy), started detached there by the
host's python3 as root, and ready once it prints `listening PORT` (it binds, then gives up root
to nobody). It is stopped by what it is, not by a recorded pid: a process is ours only if it is
a live python running that sandbox's copy of the program (its path, in a root-only directory, on
its command line) as root or nobody, so a pid reused by another process is never signalled and
one an `up` killed mid-way never recorded is found.
"""

from __future__ import annotations

import contextlib
import posixpath
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from orchestrator.capture import remotecapture
from orchestrator.errors import SandboxError

if TYPE_CHECKING:
    from orchestrator.vm.hostfiles import HostFiles

_START_STEPS = 200  # of 0.05 s: within hostfiles.RUN_TIMEOUT
_MESSAGE_MAX = 2000


@dataclass(frozen=True)
class Program:
    """One of our remote programs: its file in this package, its names in the sandbox's
    directory, and the words its errors use."""

    source: str  # the module file in orchestrator.egress
    file: str  # its name in the sandbox's directory, also what tells its processes apart
    out: str  # its standard output there (where `listening PORT` appears)
    log: str  # its standard error there
    what: str  # "the sinkhole"
    purpose: str  # why the host needs python3: "sinkhole mode runs its sinkhole there"
    instead: str  # what the user can do without it: "drop --sinkhole"
    error: type[SandboxError]

    def text(self) -> str:
        """The program the remote host runs, as shipped with this package."""
        return resources.files("orchestrator.egress").joinpath(self.source).read_text()

    def path(self, where: str) -> str:
        return posixpath.join(self.checked(where), self.file)

    def checked(self, where: str) -> str:
        return remotecapture.checked(where, self.error)


@dataclass(frozen=True)
class Started:
    pid: int
    port: int


# $1: a pid. A live python (not a zombie), as root or nobody, running $prog: ours. Builtins
# first: a scan of every process forks only for the pythons.
OURS = r"""
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

START = (
    r"""set -u
dir=$1 prog=$2 out=$3 log=$4
shift 4
"""
    + OURS
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

# $1: the directory, $2: the program's path there. Stops every process of ours running it (a
# pid not recorded too: an `up` killed mid-way) and prints the pids it stopped.
STOP = (
    r"""set -u
dir=$1 prog=$2
"""
    + OURS
    + r"""
pids=""
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    ours "$p" && pids="$pids $p"
done
"""
    + remotecapture.STOP_PIDS
)


def start_argv(program: Program, where: str, args: list[str]) -> list[str]:
    """The command that starts `program` (written into `where` before) detached with `args`,
    waits until it listens, and prints its pid and port. Pure."""
    where = program.checked(where)
    return [
        "sh",
        "-c",
        START,
        "sh",
        where,
        program.path(where),
        posixpath.join(where, program.out),
        posixpath.join(where, program.log),
        *args,
    ]


def stop_argv(program: Program, where: str) -> list[str]:
    """The command that stops every process of ours running `program` in `where`. Pure."""
    return ["sh", "-c", STOP, "sh", program.checked(where), program.path(where)]


def start(host: HostFiles, program: Program, where: str, args: list[str], doing: str) -> Started:
    """Write `program` into `where` (made 0700 if it is not there) and start it on the host with
    `args`; its pid and port once it listens. `doing`: what it failed to do, for the error
    ("listen on 192.168.208.1")."""
    where = program.checked(where)
    made = host.run(["mkdir", "-p", "-m", "0700", remotecapture.ROOT, where])
    if made.status != 0:
        raise program.error(
            f"cannot make {where} on {host.where}: "
            f"{made.stderr.strip()[:_MESSAGE_MAX] or 'mkdir failed'}",
            f"{program.what} runs as root there: connect as root "
            f"(qemu+ssh://root@HOST/system), or {program.instead}",
        )
    with host.open_write(program.path(where)) as out:
        out.write_at(0, program.text().encode())
    ran = host.run(start_argv(program, where, args))
    detail = ran.stderr.strip()[:_MESSAGE_MAX]
    if ran.status == 127:
        raise program.error(
            f"{detail or 'python3 is not installed'} on {host.where}: {program.purpose} with "
            "the host's python3",
            f"install it there (apt-get install python3-minimal), or {program.instead}",
        )
    words = ran.stdout.split()
    if ran.status != 0 or len(words) != 2 or not all(w.isdigit() for w in words):
        raise program.error(
            f"{program.what} could not {doing} on {host.where}: {detail or f'exit {ran.status}'}",
            "check that the login is root there and that libvirtd's networks are in the same "
            f"network namespace as its sshd; or {program.instead}",
        )
    pid, port = int(words[0]), int(words[1])
    if not 0 < port < 65536:
        raise program.error(
            f"{program.what} on {host.where} reported port {port}", "try `sandbox up` again"
        )
    return Started(pid, port)


def stop(host: HostFiles, program: Program, where: str) -> list[int]:
    """Stop every process of ours running `program` in `where`; the pids stopped."""
    ran = host.run(stop_argv(program, where))
    if ran.status != 0:
        raise program.error(
            f"cannot stop {program.what} in {where} on {host.where}: "
            f"{ran.stderr.strip()[:_MESSAGE_MAX] or f'exit {ran.status}'}",
            f"`sandbox destroy` tries again; or stop the python3 running {where}/{program.file} "
            "there",
        )
    return [int(w) for w in ran.stdout.split() if w.isdigit()]


def discard(uri: str, program: Program, where: str) -> None:
    """Rollback of a half-built `up`: every process of ours running `program` in `where` stopped
    (the directory goes with the host-side records', remotecapture.discard). Best effort:
    `destroy --name NAME` tries again."""
    from orchestrator.vm import hostfiles

    with contextlib.suppress(SandboxError), hostfiles.on_host(uri) as host:
        stop(host, program, where)

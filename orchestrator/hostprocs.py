"""This machine's helper processes of one sandbox, those that outlive the CLI: the packet
captures (tcpdump: `--pcap`'s and the host-side flow record), the sinkhole and the wildcard
resolver.

Their pids are in the sandbox's state, but a state may be lost (a killed `up`, a lost state
directory, `destroy --name`), a recorded pid may be another process by now (even another
sandbox's helper of the same kind), and a killed `up` may have started one whose pid never
reached the state. So `destroy` finds them by their command lines, each of which names the
sandbox's logs directory: tcpdump's `-w` file is in it, the python helpers have `--logs` (the
wildcard resolver reads its records there; the sinkhole only carries it, for this). A process is
one of them only if it is that program (its `comm`) and names that very directory: whole path
components, so sandbox `a` never matches `ab`'s."""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from orchestrator import detached


class Kind(enum.Enum):
    TCPDUMP = "tcpdump"
    SINKHOLE = "sinkhole"
    WILDCARDS = "wildcard resolver"


# The python helpers' modules (detached.start runs `python -m MODULE`): named, not imported
# (importing the sinkhole costs its packet parsing); test_hostprocs checks them.
MODULES = {
    Kind.SINKHOLE: "orchestrator.egress.sinkhole",
    Kind.WILDCARDS: "orchestrator.egress.wildcards",
}
# How long each is given after SIGTERM, before SIGKILL: tcpdump flushes its files first.
_TIMEOUTS = {Kind.TCPDUMP: 10.0, Kind.SINKHOLE: 5.0, Kind.WILDCARDS: 5.0}
_PROC = Path("/proc")


@dataclass(frozen=True)
class Helper:
    pid: int
    kind: Kind

    def describe(self) -> str:
        return f"{self.kind.value} (pid {self.pid})"


def _last_value(args: Sequence[str], option: str) -> str | None:
    """The value after the last `option` in `args` (what the program's parser keeps)."""
    value = None
    for flag, arg in itertools.pairwise(args):
        if flag == option:
            value = arg
    return value


def _same_dir(path: str, directory: PurePath) -> bool:
    # Lexical: the helpers are started with the same path `destroy` computes, and a lost
    # directory cannot be resolved. Whole strings after normalisation: `a/logs` is not `ab/logs`.
    return bool(path) and os.path.normpath(path) == os.path.normpath(directory)


def kind_of(comm: str, argv: Sequence[str], logs: PurePath) -> Kind | None:
    """Which helper of the sandbox whose logs directory is `logs` a process is, from its
    executable's name (`comm`) and its command line; None if none of that sandbox's. Pure."""
    if not argv:
        return None  # a zombie, or a kernel thread
    if comm == "tcpdump" and PurePath(argv[0]).name == "tcpdump":
        target = _last_value(argv[1:], "-w")
        if target is not None and _same_dir(os.path.dirname(target), logs):
            return Kind.TCPDUMP
        return None
    if not comm.startswith("python"):
        return None
    for kind, module in MODULES.items():
        if list(argv[1:3]) == ["-m", module]:
            where = _last_value(argv[3:], "--logs")
            return kind if where is not None and _same_dir(where, logs) else None
    return None


def unnamed_sinkhole(comm: str, argv: Sequence[str]) -> bool:
    """Whether a process is a sinkhole started before sinkholes named their sandbox (no
    `--logs`): one is stopped only by the pid its sandbox's state recorded. Pure."""
    return (
        comm.startswith("python")
        and list(argv[1:3]) == ["-m", MODULES[Kind.SINKHOLE]]
        and "--logs" not in argv[3:]
    )


def _read(pid: int) -> tuple[str, list[str]]:
    """(comm, argv) of `pid`; ("", []) if it is gone."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
        comm = (_PROC / str(pid) / "comm").read_text(errors="replace").strip()
    except OSError:
        return "", []
    return comm, [os.fsdecode(arg) for arg in raw.rstrip(b"\0").split(b"\0")] if raw else []


def _identify(pid: int, logs: Path, sinkhole_pid: int | None) -> Kind | None:
    comm, argv = _read(pid)
    kind = kind_of(comm, argv, logs)
    if kind is None and pid == sinkhole_pid and unnamed_sinkhole(comm, argv):
        return Kind.SINKHOLE
    return kind


def find(logs: Path, sinkhole_pid: int | None = None) -> list[Helper]:
    """The helper processes of the sandbox whose logs directory is `logs`, running on this
    machine; `sinkhole_pid`: its state's (it may be a sinkhole from before `--logs`)."""
    own = os.getpid()  # never this process, whatever its command line
    found = []
    for entry in os.listdir(_PROC):
        if entry.isdigit() and int(entry) != own:
            kind = _identify(int(entry), logs, sinkhole_pid)
            if kind is not None:
                found.append(Helper(int(entry), kind))
    return sorted(found, key=lambda h: h.pid)


def stop_all(logs: Path, sinkhole_pid: int | None = None) -> list[Helper]:
    """Stop every helper process of the sandbox whose logs directory is `logs` (see find): each
    SIGTERM, then SIGKILL if it has not gone in a few seconds. Those that were running."""
    stopped = []
    for helper in find(logs, sinkhole_pid):
        pid, kind = helper.pid, helper.kind

        def meant(pid: int = pid, kind: Kind = kind) -> bool:
            # Checked again before each signal: the pid may have been reused since the scan.
            return _identify(pid, logs, sinkhole_pid) is kind

        if detached.terminate(pid, meant, f"the {kind.value}", timeout=_TIMEOUTS[kind]):
            stopped.append(helper)
    return stopped

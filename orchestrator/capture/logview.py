"""The log store and `sandbox logs`: append records exactly once, read them back, filter, render.

A sandbox's logs are JSON lines under <state>/<name>/logs/ (paths.CONNECTIONS_LOG, paths.DNS_LOG),
one records.Attempt or records.DnsQuery a line. Appends skip ids already stored, so collecting the
same guest logs twice (at exec, then at destroy) stores each record once. Everything here is pure
except the file functions; rich appears only in the render functions.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from orchestrator import jsontext, paths
from orchestrator.capture.records import Attempt, DnsQuery, LogRecordError, Verdict, parse_time
from orchestrator.errors import UsageError
from orchestrator.files import atomic_write
from orchestrator.safetext import text as safe

if TYPE_CHECKING:
    from rich.table import Table


class _Record(Protocol):
    @property
    def id(self) -> str: ...

    def to_json(self) -> str: ...


R = TypeVar("R", bound=_Record)


# ---- the store -------------------------------------------------------------------------------


def _complete_lines(data: bytes) -> list[str]:
    """The whole lines of a log file's content: a last line without its newline is a write cut
    short by a crash (or one still in progress) and is left out."""
    lines = data.split(b"\n")
    lines.pop()
    return [line.decode("utf-8", errors="replace") for line in lines if line.strip()]


def _ids(lines: Iterable[str]) -> set[str]:
    found = set()
    for line in lines:
        value = jsontext.object_or_none(line)
        if value is None:
            continue  # reading reports it; appending must not be blocked by it
        if isinstance(value.get("id"), str):
            found.add(value["id"])
    return found


def _open_locked(path: Path, flags: int) -> int:
    """Open and flock the log file. Two collectors at once (an `exec` and a `destroy`) must not
    both add the same ids; and a rewrite replaces the file, so a lock won on the old file after a
    rewrite is a lock on nothing: open again."""
    while True:
        fd = os.open(path, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _append(path: Path, records: Iterable[R]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        end = data.rfind(b"\n") + 1
        if end != len(data):
            # A torn last line from a crash: drop it, or the next line would be glued to it.
            os.ftruncate(fd, end)
        seen = _ids(_complete_lines(data))
        lines = []
        for record in records:
            if record.id in seen:
                continue
            seen.add(record.id)
            lines.append(record.to_json() + "\n")
        if lines:
            # One write of whole lines: a crash leaves at most one torn line, at the end.
            os.write(fd, "".join(lines).encode())
            os.fsync(fd)
        return len(lines)
    finally:
        os.close(fd)


def append_attempts(logs_dir: Path, attempts: Iterable[Attempt]) -> int:
    """Append connection attempts to <logs_dir>/connections.jsonl, skipping ids already stored;
    return how many were new. Call after every collection from the guest (run, exec, destroy)."""
    return _append(logs_dir / paths.CONNECTIONS_LOG, attempts)


def rewrite_attempts(logs_dir: Path, change: Callable[[list[Attempt]], list[Attempt]]) -> int:
    """Replace the stored attempts by `change(stored)` (same ids, same order) when that changes
    any; atomically, under the appenders' lock. Return how many records changed."""
    path = logs_dir / paths.CONNECTIONS_LOG
    if not path.exists():
        return 0
    fd = _open_locked(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        stored = [Attempt.from_json(line) for line in _complete_lines(os.pread(fd, size, 0))]
        updated = change(stored)
        changed = sum(1 for old, new in zip(stored, updated, strict=True) if old != new)
        if changed:
            # Readers hold no lock: they see the old file or the new one, never half of each.
            atomic_write(path, "".join(a.to_json() + "\n" for a in updated))
        return changed
    finally:
        os.close(fd)


def append_dns(logs_dir: Path, queries: Iterable[DnsQuery]) -> int:
    """Append DNS queries (dnslog.read_for) to <logs_dir>/dns.jsonl, skipping ids already
    stored; return how many were new. Call at the same points as append_attempts."""
    return _append(logs_dir / paths.DNS_LOG, queries)


def _read(path: Path, parse: Callable[[str], R]) -> list[R]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(_complete_lines(data), 1):
        try:
            records.append(parse(line))
        except LogRecordError as error:
            raise LogRecordError(f"{path}:{number}: {error.message}", error.hint) from None
    return records


def read_attempts(logs_dir: Path) -> list[Attempt]:
    """Every stored connection attempt, in the order collected; none if the log does not exist.
    A damaged line raises records.LogRecordError naming the file and line."""
    return _read(logs_dir / paths.CONNECTIONS_LOG, Attempt.from_json)


def read_dns(logs_dir: Path) -> list[DnsQuery]:
    """Every stored DNS query of the sandbox, in the order collected."""
    return _read(logs_dir / paths.DNS_LOG, DnsQuery.from_json)


def purge(logs_dir: Path) -> bool:
    """Delete a sandbox's logs (`sandbox logs --purge --name N`); return whether there were any.
    The caller decides whether the sandbox may still be running (its logs would start again)."""
    if not logs_dir.exists():
        return False
    shutil.rmtree(logs_dir)
    return True


# ---- filters ---------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a relative age ("90s", "10m", "2h", "1d") before `now`, or an ISO 8601 time
    (a time without a zone is this host's local time). Returns an aware datetime."""
    relative = _RELATIVE.match(text)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNITS[relative.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither an age nor a time",
            "give an age like 10m, 2h, 1d or a time like 2026-11-23T12:00:00",
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


_BLOCKED = frozenset({Verdict.BLOCKED, Verdict.BOOT, Verdict.HOST_BLOCKED})


@dataclass(frozen=True)
class Filter:
    """What `sandbox logs` shows. blocked/allowed both false (or both true): every verdict.
    `process`: a pid (all digits) or a substring of the executable or the command line."""

    blocked: bool = False
    allowed: bool = False
    since: datetime | None = None
    process: str | None = None
    run: str | None = None  # a run id, or "last" resolved by the caller
    # glibc's address-sorting probes (Verdict.PROBE): the lookup's, not the software's; hidden
    # unless asked for (--probes).
    probes: bool = False

    @classmethod
    def from_options(
        cls,
        *,
        blocked: bool = False,
        allowed: bool = False,
        since: str | None = None,
        process: str | None = None,
        run: str | None = None,
        probes: bool = False,
        now: datetime | None = None,
    ) -> Filter:
        """Build from the CLI's flags; `since` as typed (see parse_since)."""
        moment = None
        if since is not None:
            moment = parse_since(since, now or datetime.now(UTC))
        return cls(
            blocked=blocked,
            allowed=allowed,
            since=moment,
            process=process or None,
            run=run,
            probes=probes,
        )

    def matches(self, attempt: Attempt) -> bool:
        if attempt.verdict is Verdict.PROBE and not self.probes:
            return False
        # "allowed" is everything let through: the policy, DNS to the resolver, loopback.
        if self.blocked != self.allowed and (attempt.verdict in _BLOCKED) != self.blocked:
            return False
        if self.since is not None and parse_time(attempt.time) < self.since:
            return False
        if self.run is not None and attempt.run != self.run:
            return False
        if self.process:
            if self.process.isdigit():
                return attempt.pid == int(self.process)
            haystack = (attempt.exe or "", attempt.cmdline or "")
            return any(self.process in text for text in haystack)
        return True


def apply(filter: Filter, attempts: Iterable[Attempt]) -> list[Attempt]:
    """The attempts `filter` lets through, in their order. Pure."""
    return [attempt for attempt in attempts if filter.matches(attempt)]


def apply_dns(filter: Filter, queries: Iterable[DnsQuery]) -> list[DnsQuery]:
    """DNS queries under the same filter: only --since applies (a query has no process, and
    whether it was refused is its result)."""
    if filter.since is None:
        return list(queries)
    since = filter.since
    return [q for q in queries if parse_time(q.time) >= since.replace(microsecond=0)]


# ---- rendering -------------------------------------------------------------------------------

_VERDICT_STYLE = {
    Verdict.ALLOWED: "green",
    Verdict.BLOCKED: "bold red",
    Verdict.BOOT: "red",
    Verdict.DNS: "cyan",
    Verdict.LOOPBACK: "dim",
    Verdict.UNLOGGED: "bold yellow",
    Verdict.HOST_BLOCKED: "bold red",
    Verdict.TAMPER: "bold magenta",
    Verdict.UNSENT: "yellow",
    Verdict.SINKHOLED: "magenta",
    Verdict.PROBE: "dim",
}


def destination(address: str, port: int | None) -> str:
    """addr:port, [v6]:port, or the bare address for protocols without ports (ICMP)."""
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def process_label(exe: str | None, pid: int | None) -> str:
    name = os.path.basename(exe) if exe else "?"
    return name if pid is None else f"{name} ({pid})"


def _short_time(stamp: str) -> str:
    return stamp.replace("T", " ").removesuffix("Z")


def render_table(attempts: Sequence[Attempt]) -> Table:
    """The default `sandbox logs` view; print it with rich.console.Console().print(table).
    For --json print each record's to_json() instead (the lines as stored)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="connection attempts (UTC)", expand=False)
    # Optional columns only when some attempt fills them: other software has no PHP stack, and
    # most attempts have no DNS name.
    names = any(a.dns_name for a in attempts)
    source = any(a.stack for a in attempts)
    tampered = any(a.verdict is Verdict.TAMPER for a in attempts)
    served = any(a.request for a in attempts)
    sent = any(a.sni or a.http or a.payload for a in attempts)
    columns = ["time", "verdict", "process", "uid", "proto", "destination"]
    columns += ["dns name"] * names + ["http request"] * served + ["sent"] * sent
    columns += ["php source"] * source
    columns += ["what changed"] * tampered
    for column in columns:
        table.add_column(
            column,
            no_wrap=column in ("time", "destination", "process"),
        )
    for a in attempts:
        # A tamper row is no attempt: it has no destination, and a process only when the capture
        # saw one make the change; its evidence says what changed.
        tamper = a.verdict is Verdict.TAMPER
        # Every cell from the guest is a Text: data, never markup or terminal control.
        table.add_row(
            safe(_short_time(a.time)),
            Text(a.verdict.value, style=_VERDICT_STYLE[a.verdict]),
            safe("" if tamper and a.pid is None else process_label(a.exe, a.pid)),
            "" if a.uid is None else str(a.uid),
            safe(a.proto),
            safe("" if tamper else destination(a.dst, a.dport)),
            *((safe(_dns_cell(a)),) if names else ()),
            *((safe(a.request or ""),) if served else ()),
            *((safe(sent_summary(a)),) if sent else ()),
            # A frame a line: the innermost call first, as in a stack trace.
            *((Text("\n← ").join(safe(f.describe()) for f in a.stack),) if source else ()),
            *((safe(a.evidence if tamper else ""),) if tampered else ()),
        )
    return table


def sent_summary(attempt: Attempt) -> str:
    """What the connection sent first: "TLS sni NAME", "HTTP GET HOST /path", or the sinkhole's
    summary of its first bytes."""
    parts = []
    if attempt.sni:
        parts.append(f"TLS sni {attempt.sni}")
    if attempt.http:
        parts.append(f"HTTP {attempt.http}")
    if attempt.payload and not parts:
        parts.append(attempt.payload)
    return "; ".join(parts)


def _dns_cell(attempt: Attempt) -> str:
    """A query's name and the types asked ("www.example (A, AAAA)"), or the name an answer gave
    for the destination."""
    if attempt.dns_name and attempt.dns_type:
        return f"{attempt.dns_name} ({attempt.dns_type})"
    return attempt.dns_name or ""


def render_dns_table(queries: Sequence[DnsQuery]) -> Table:
    """The DNS queries the sandbox's resolver received, below the attempts in `sandbox logs`."""
    from rich.table import Table

    table = Table(title="DNS queries (UTC)", expand=False)
    for column in ("time", "client", "name", "type", "result"):
        table.add_column(column, no_wrap=column == "time")
    for q in queries:
        refused = not q.addresses()
        table.add_row(
            safe(_short_time(q.time)),
            safe(q.client),
            safe(q.name),
            safe(q.qtype),
            safe(q.result, style="red" if refused else "green"),
        )
    return table


# ---- current sockets (--sockets) ---------------------------------------------------------------


@dataclass(frozen=True)
class Socket:
    """One open internet socket in the guest, from lsof's field output."""

    command: str
    pid: int
    ppid: int | None
    user: str
    fd: str
    family: int  # 4 | 6
    proto: str  # "tcp" | "udp" | ...
    local: str
    remote: str | None
    state: str | None  # TCP state; None for UDP


def sockets_command() -> list[str]:
    """The guest command for `sandbox logs --sockets` (run as root over SSH, e.g. Guest.run,
    and pass its stdout to parse_sockets). lsof's field output (-F) is made to be parsed; -n -P
    keep numbers. lsof exits 1 when there is no socket at all: treat 1 with empty output as none.
    """
    return ["lsof", "-i", "-n", "-P", "-T", "s", "-F", "pcuLRftPnT"]


def _split_name(name: str) -> tuple[str, str | None]:
    local, _, remote = name.partition("->")
    return local, remote or None


_PID = re.compile(r"[0-9]{1,9}")


def parse_sockets(text: str) -> list[Socket]:
    """Parse `lsof -F pcuLRftPnT` output: a 'p' line starts a process, an 'f' line a file,
    every other line is one field of the current one. Pure."""
    sockets: list[Socket] = []
    proc: dict[str, str] = {}
    file: dict[str, str] = {}

    def flush() -> None:
        # lsof's output is the guest's word: a field that is not what lsof writes drops the
        # socket from the listing, it does not break it.
        if not _PID.fullmatch(proc.get("p", "")) or not _PID.fullmatch(proc.get("R", "0")):
            return
        if file and "n" in file and "p" in proc:
            local, remote = _split_name(file["n"])
            sockets.append(
                Socket(
                    command=proc.get("c", "?"),
                    pid=int(proc["p"]),
                    ppid=int(proc["R"]) if "R" in proc else None,
                    user=proc.get("L") or proc.get("u", "?"),
                    fd=file.get("f", "?"),
                    family=6 if file.get("t") == "IPv6" else 4,
                    proto=file.get("P", "?").lower(),
                    local=local,
                    remote=remote,
                    state=file.get("TST"),
                )
            )

    for raw in text.splitlines():
        if not raw:
            continue
        tag, value = raw[0], raw[1:]
        if tag == "p":
            flush()
            proc, file = {"p": value}, {}
        elif tag == "f":
            flush()
            file = {"f": value}
        elif tag == "T":
            key, _, info = value.partition("=")
            file["T" + key] = info
        elif file:
            file[tag] = value
        else:
            proc[tag] = value
    flush()
    return sockets


def render_sockets(sockets: Sequence[Socket]) -> Table:
    """`sandbox logs --sockets`: the guest's open sockets, like `lsof -i -nP`."""
    from rich.table import Table

    table = Table(title="open sockets in the guest", expand=False)
    for column in ("process", "user", "fd", "proto", "local", "remote", "state"):
        table.add_column(column)
    for s in sockets:
        table.add_row(
            safe(f"{s.command} ({s.pid})"),
            safe(s.user),
            safe(s.fd),
            safe(f"{s.proto}{'6' if s.family == 6 else ''}"),
            safe(s.local),
            safe(s.remote or ""),
            safe(s.state or ""),
        )
    return table


def json_lines(records: Iterable[_Record]) -> list[str]:
    """`--json`: the records as stored, one JSON object per line."""
    return [record.to_json() for record in records]


def new_records(records: Iterable[R], seen: set[str]) -> list[R]:
    """For `--follow`: the records not shown yet; adds their ids to `seen`."""
    fresh = []
    for record in records:
        if record.id not in seen:
            seen.add(record.id)
            fresh.append(record)
    return fresh

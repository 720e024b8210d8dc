"""The sandbox network's own record of DNS: dnsmasq's query log, read on the host.

The network's dnsmasq runs with `log-queries=extra` and `log-facility=FILE` (domain.render_network,
NetworkSpec.dns_log), so every query of the sandbox's guest lands in its network's own file:

    Nov 23 12:07:27 dnsmasq[28793]: 1 192.168.213.50/43224 query[A] allowed.example from 192.1...
    Nov 23 12:07:27 dnsmasq[28793]: 1 192.168.213.50/43224 /var/...addnhosts allowed.example is...
    Nov 23 12:07:27 dnsmasq[28793]: 3 192.168.213.50/38410 config error is REFUSED (EDE: not r...

(tests/data/ has whole logs.)

`extra` gives each query a serial (restarting at 1 with each dnsmasq process) and the client's
address and port on every line, which ties a reply or a refusal to its query. A query belongs to a
sandbox by the client address; the caller also passes the sandbox's start time, because a later
sandbox may be given the same address by DHCP.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import NoReturn

from orchestrator import jsontext
from orchestrator.capture.records import DnsQuery, iso_time
from orchestrator.errors import SandboxError
from orchestrator.vm import hostfiles

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}

# "%b %e %H:%M:%S dnsmasq[PID]: SERIAL CLIENT/PORT REST" (log-queries=extra, log-facility=FILE).
_LINE = re.compile(
    r"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d) "
    r"dnsmasq\[(?P<pid>\d+)\]: (?P<serial>\d+) (?P<client>[0-9A-Fa-f.:%\w-]+)/(?P<port>\d+) "
    r"(?P<rest>.*)$"
)
_QUERY = re.compile(r"^query\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from (?P<frm>\S+)$")
# "<source> <name> is <value>": source is cached, config, reply, a hosts file path, ...
_RESULT = re.compile(r"^(?P<source>.+) (?P<name>\S+) is (?P<value>.+)$")

UNANSWERED = "UNANSWERED"  # a query with no result line (yet): dnsmasq is still working on it


class DnsLogError(SandboxError):
    """The sandbox network's DNS log cannot be read."""


@dataclass
class _Pending:
    """A query being assembled from its lines; becomes a DnsQuery."""

    id: str
    time: str
    client: str
    name: str
    qtype: str
    port: int
    addresses: list[str] = field(default_factory=list)
    status: str | None = None

    def record(self) -> DnsQuery:
        result = ", ".join(self.addresses) if self.addresses else self.status or UNANSWERED
        return DnsQuery(self.id, self.time, self.client, self.name, self.qtype, result, self.port)


def _client(text: str) -> str:
    # A link-local client comes with its zone ("fe80::1%virbr0"); the state knows no zones.
    bare = text.split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return bare


def _status(value: str) -> str | None:
    """What a result line's value means: an address, a status word, or nothing (a CNAME link)."""
    word = value.split(" ", 1)[0]
    if word.startswith("<"):  # "<CNAME>": the chain continues on the next line
        return None
    if word.startswith("NODATA"):  # NODATA, NODATA-IPv4, NODATA-IPv6
        return "NODATA"
    return word


def _years(stamps: list[tuple[int, int, str]], last_year: int) -> list[int]:
    """The year of each timestamp, counting back from the last line's year: a month going down
    between two consecutive lines (Dec -> Jan) is a new year. Days are not compared: a clock
    stepped back a little must not cost a year."""
    years = [last_year] * len(stamps)
    year = last_year
    for i in range(len(stamps) - 1, 0, -1):
        if stamps[i - 1][0] > stamps[i][0]:
            year -= 1
        years[i - 1] = year
    return years


def parse(text: str, *, year: int, tz: tzinfo | None = None) -> list[DnsQuery]:
    """Every query in a dnsmasq `log-queries=extra` log, in log order, each with its result.

    `year` is the year of the LAST line (dnsmasq's timestamps have none; read_for passes the
    file's modification year); earlier lines crossing a new year get the year before. `tz` is the
    zone dnsmasq wrote its local times in (default: this host's). Lines that are not queries or
    results (startup, DHCP, a torn last line) are skipped. Pure.
    """
    lines = text.split("\n")
    # The last line is torn (dnsmasq is writing it) unless the text ends with a newline; a torn
    # "... is 203.0.11" would read as a wrong answer.
    lines.pop()
    matches = [m for m in map(_LINE.match, lines) if m]
    stamps = [(_MONTHS.get(m["mon"], 0), int(m["day"]), m["hms"]) for m in matches]
    years = _years(stamps, year)
    pending: dict[tuple[str, str, str], _Pending] = {}
    order: list[_Pending] = []
    for m, (month, day, hms), line_year in zip(matches, stamps, years, strict=True):
        # The serial restarts with each dnsmasq process; the client address and port tell apart
        # queries that overlap in time.
        key = (m["pid"], m["serial"], m["client"])
        rest = m["rest"]
        query = _QUERY.match(rest)
        if query:
            if month == 0:
                continue
            hour, minute, second = (int(x) for x in hms.split(":"))
            local = datetime(line_year, month, day, hour, minute, second)
            moment = local.replace(tzinfo=tz) if tz is not None else local.astimezone()
            when = iso_time(moment.astimezone(UTC).timestamp())
            item = _Pending(
                id=f"d{m['pid']}.{m['serial']}.{when}",
                time=when,
                client=_client(query["frm"]),
                name=query["name"],
                qtype=query["qtype"],
                port=int(m["port"]),
            )
            pending[key] = item
            order.append(item)
            continue
        result = _RESULT.match(rest)
        target = pending.get(key)
        if result is None or target is None:
            continue
        value = result["value"]
        try:
            target.addresses.append(str(ipaddress.ip_address(value.split(" ", 1)[0])))
            continue
        except ValueError:
            pass
        status = _status(value)
        if status is not None and target.status is None:
            target.status = status
    return [item.record() for item in order]


def select(
    queries: Iterable[DnsQuery], client_ips: Collection[str], since: datetime | None
) -> list[DnsQuery]:
    """The queries asked by one of `client_ips` at or after `since` (aware datetime). Pure."""
    wanted = {_client(ip) for ip in client_ips}
    chosen = []
    for query in queries:
        if query.client not in wanted:
            continue
        if since is not None:
            moment = datetime.fromisoformat(query.time.replace("Z", "+00:00"))
            # The log has whole seconds: a query in the same second as `since` counts.
            if moment < since.replace(microsecond=0):
                continue
        chosen.append(query)
    return chosen


# The log is rotated (to FILE.1, emptied in place) once it is this large, and
# one collection reads at most READ_MAX of it: the guests decide how much dnsmasq writes.
ROTATE_BYTES = 64 << 20
READ_MAX = 64 << 20
# Each read starts this far before where the last one ended, so that a query whose reply line
# came after that read is assembled whole (the records are stored once, by id).
OVERLAP = 64 << 10


# Bytes before a cursor's offset whose digest the cursor keeps: the file it was read from is the
# one that still has them there (SFTP gives no inode; and an inode is reused once freed).
TAIL = 256
# Rotation copies in pieces of this size (a remote log's pass through this machine).
_COPY_PIECE = 1 << 20


@dataclass(frozen=True)
class LogCursor:
    """Where a sandbox's last read of its DNS log ended: the byte, and the digest of the TAIL
    bytes before it (the file's identity: dnsmasq only appends, so the same file has them
    there still; "" for a cursor from before, which trusts the size alone)."""

    offset: int = 0
    tail: str = ""

    def to_json(self) -> str:
        return json.dumps({"offset": self.offset, "tail": self.tail})

    @classmethod
    def load(cls, path: Path) -> LogCursor:
        """The cursor kept in `path`; a fresh one where there is none yet."""
        return cls.from_json(path.read_text()) if path.exists() else cls()

    @classmethod
    def from_json(cls, text: str) -> LogCursor:
        data = jsontext.object_or_none(text) or {}
        try:
            return cls(int(data["offset"]), str(data.get("tail", "")))
        except (ValueError, KeyError, TypeError):
            return cls()  # a damaged cursor costs a re-read, not the collection


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _holds(reader: hostfiles.Reader, cursor: LogCursor) -> bool:
    """Whether the file `reader` reads is the one `cursor` was taken from: the bytes before
    its offset are still those it read."""
    if reader.size < cursor.offset:
        return False
    if not cursor.tail or cursor.offset == 0:
        return True
    length = min(TAIL, cursor.offset)
    return _digest(reader.read_at(cursor.offset - length, length)) == cursor.tail


def _fail(error: hostfiles.HostFileError) -> NoReturn:
    raise DnsLogError(
        f"cannot read the sandbox network's DNS log: {error.message}", error.hint
    ) from None


def read_new(
    path: str | Path, cursor: LogCursor, files: hostfiles.HostFiles = hostfiles.LOCAL
) -> tuple[str, LogCursor]:
    """The log's text since `cursor` (with a small overlap), the rotated copy's rest included
    when it was rotated since, and the cursor to pass next time. `files`: the libvirt host's
    (this machine's by default)."""
    file = str(path)
    parts: list[bytes] = []
    try:
        if files.stat(file) is None:
            return "", LogCursor()
        with files.open_read(file) as reader:
            start = cursor.offset
            if not _holds(reader, cursor):
                # Rotated since (rotate_if_large: copied to FILE.1, then emptied in place), or
                # a new file: finish the old content from the copy, then this file from its
                # start.
                parts.append(_rest_of_copy(files, file, cursor))
                start = 0
            data, after = _whole_lines(reader, start, cursor)
            parts.append(data)
    except hostfiles.HostFileError as error:
        _fail(error)
    return b"".join(parts).decode("utf-8", "replace"), after


def _rest_of_copy(files: hostfiles.HostFiles, file: str, cursor: LogCursor) -> bytes:
    """What the rotated copy holds after `cursor`, if it is the copy of the file `cursor` was
    taken from."""
    rotated = str(rotated_copy(file))
    if cursor.offset == 0 or files.stat(rotated) is None:
        return b""
    with files.open_read(rotated) as reader:
        if not cursor.tail or not _holds(reader, cursor):
            return b""
        return _whole_lines(reader, cursor.offset, cursor)[0]


def _whole_lines(
    reader: hostfiles.Reader, start: int, cursor: LogCursor
) -> tuple[bytes, LogCursor]:
    """The whole lines of the file from about `start` (OVERLAP earlier) on, at most READ_MAX
    bytes, and the cursor after the last of them (`cursor` when there is none)."""
    size = reader.size
    begin = max(0, min(start, size) - OVERLAP)
    data = reader.read_at(begin, min(size - begin, READ_MAX))
    skip = 0
    if begin > 0:
        # Started mid-file: the first, partial line is not ours to parse.
        skip = data.find(b"\n") + 1
    end = data.rfind(b"\n") + 1
    if end <= skip:
        if start == cursor.offset:
            return b"", cursor
        return b"", LogCursor(start, _digest(data[: max(0, start - begin)][-TAIL:]))
    tail = data[max(0, end - TAIL) : end]
    if len(tail) < min(TAIL, begin + end):
        tail = b""  # cannot happen for a start at a line's end; then only the size counts
    return data[skip:end], LogCursor(begin + end, _digest(tail) if tail else "")


def rotated_copy(path: str | Path) -> Path:
    """Where rotate_if_large keeps the log's previous content."""
    file = Path(path)
    return file.with_name(file.name + ".1")


def rotate_if_large(
    path: str | Path,
    limit: int = ROTATE_BYTES,
    files: hostfiles.HostFiles = hostfiles.LOCAL,
    keep_from: int = 0,
) -> bool:
    """Once the log is over `limit` bytes, copy it to FILE.1 and empty it in place, so it
    never grows without end. In place, because the network's dnsmasq keeps it open (with
    O_APPEND: it goes on writing at the new end) and, running as nobody by then, could not
    create a new one. Readers whose cursor points into the old content finish it from FILE.1
    (read_new). A line written between the copy and the emptying is lost: a bounded log costs
    that much.

    The copy holds only what a reader from `keep_from` (its cursor's offset) can still read:
    the READ_MAX bytes from OVERLAP before it, at their own offsets (the rest of the copy is a
    hole). So a flood costs at most that much of a copy, which for a remote host crosses the
    network twice."""
    file = str(path)
    try:
        stat = files.stat(file)
        if stat is None or stat.size <= limit:
            return False
        tmp = file + ".1.tmp"
        with files.open_read(file) as reader, files.open_write(tmp) as writer:
            begin = max(0, min(keep_from, reader.size) - OVERLAP)
            end = min(reader.size, begin + READ_MAX)
            for offset in range(begin, end, _COPY_PIECE):
                writer.write_at(offset, reader.read_at(offset, min(_COPY_PIECE, end - offset)))
        files.replace(tmp, str(rotated_copy(file)))
        files.truncate(file)
    except hostfiles.HostFileError as error:
        raise DnsLogError(
            f"cannot rotate the sandbox network's DNS log: {error.message}", error.hint
        ) from None
    return True


def read_for(
    path: str | Path,
    client_ips: Collection[str],
    since: datetime | None,
    cursor: LogCursor | None = None,
    files: hostfiles.HostFiles = hostfiles.LOCAL,
) -> tuple[list[DnsQuery], LogCursor]:
    """The queries one sandbox asked that the log gained since `cursor` (plus the overlap; None:
    the whole log), and the cursor to save for the next call. Call at collection time with
    NetworkSpec.dns_log, the sandbox's guest addresses (state `ip`, and its IPv6 address if it
    has one), the time the sandbox was started (DHCP may have given the same address to an
    earlier sandbox) and the libvirt host's files (hostfiles.on_host). Append the result with
    logview.append_dns, which skips the queries already stored.

    A missing file is no queries (the network was created before query logging, or has not
    answered anything yet). The lines have no year: it is the year the file was last written;
    and no zone: the libvirt host's.
    """
    text, after = read_new(path, cursor or LogCursor(), files)
    try:
        stat = files.stat(str(path))
        tz = files.timezone() if text else None
    except hostfiles.HostFileError as error:
        _fail(error)
    moment = datetime.fromtimestamp(stat.mtime, tz) if stat is not None else datetime.now(tz)
    return select(parse(text, year=moment.year, tz=tz), client_ips, since), after

"""`sandbox report`: one run's stored records as a report people can share, and two runs compared.

The core is pure: `build` turns the records (the run's RunRecord, the sandbox's attempts and
resolver queries) into a Report model; `to_json` writes it in a stable, versioned shape (SCHEMA,
documented in docs/report.md); `render_html` renders the same model into one self-contained HTML
file; `diff` compares two models. Files and the choice of run are lifecycle's (reporting.py).

Everything in the model that came from the guest (process names, command lines, PHP files and
functions, DNS names, served requests) is attacker input. The JSON keeps it as data (escaped by
json.dumps, ASCII only); the HTML goes through jinja2 with autoescape on and a finalize hook that
makes control and bidirectional characters visible (safetext.clean) before escaping, and carries a
Content-Security-Policy that forbids scripts and every load from the network, so that even an
escaping mistake could neither run code nor call home when the report is opened.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import posixpath
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator import jsontext, safetext
from orchestrator.capture.logview import destination as address_port
from orchestrator.capture.logview import process_label
from orchestrator.capture.records import Attempt, DnsQuery, Frame, Verdict, iso_time, parse_time
from orchestrator.errors import UsageError

if TYPE_CHECKING:
    import jinja2
    from rich.table import Table

    from orchestrator.run.target import RunRecord

SCHEMA = "sandbox-report/1"
DIFF_SCHEMA = "sandbox-report-diff/1"

# Verdicts that are no destination of the software's: queries to the sandbox's own resolver (the
# DNS section has them), traffic that never left the guest, the firewall's own changes, and glibc's
# address-sorting probes (hidden by `sandbox logs` too).
_NOT_DESTINATIONS = frozenset({Verdict.DNS, Verdict.LOOPBACK, Verdict.TAMPER, Verdict.PROBE})
_BLOCKED = frozenset({Verdict.BLOCKED, Verdict.BOOT, Verdict.HOST_BLOCKED, Verdict.UNSENT})
# Resolver queries are logged by the host with a one-second clock: a run's first query may be
# stamped up to a second before the run's (guest clock) start. After its end, records of its
# last moments still count (run/target.py's window).
_DNS_BEFORE, _DNS_AFTER = 1.0, 5.0


@dataclass(frozen=True)
class Place:
    """The PHP line behind an attempt: the innermost frame of its stack that names a file."""

    function: str
    file: str
    line: int

    def describe(self) -> str:
        return f"{self.function}() at {posixpath.basename(self.file)}:{self.line}"


@dataclass(frozen=True)
class RunInfo:
    sandbox: str
    id: str
    argv: tuple[str, ...]
    php: bool
    user: str
    xdebug: str
    started: str
    ended: str | None
    exit_code: int | None
    timed_out: bool
    leftovers: int


@dataclass(frozen=True)
class NameInfo:
    host: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class PolicyInfo:
    """The egress policy in force for the run, as `sandbox policy show` says it."""

    allow: tuple[str, ...]
    names: tuple[NameInfo, ...]
    dns: bool
    blocked: str
    # "allow-all": a learn-mode run (`--learn`), every outside destination allowed; "sinkhole":
    # one learned under the sinkhole (`--learn --sinkhole`), nothing let out; "off": not.
    learn: str = "off"
    # Sinkhole mode: other names led to the sandbox's sinkhole (a field added within version 1:
    # files written before it read as false).
    sinkhole: bool = False


@dataclass(frozen=True)
class Counts:
    attempts: int  # the run's records, DNS queries to the resolver included, probes not
    allowed: int
    blocked: int
    destinations: int
    dns_queries: int


@dataclass(frozen=True)
class Destination:
    """Every attempt of the run to one protocol, address and port."""

    key: str  # "tcp 203.0.113.7:443", "udp [2001:db8::1]:53": unique in a report
    proto: str
    address: str
    port: int | None
    names: tuple[str, ...]  # the names lookups returned this address for
    verdict: str  # one verdict, or several joined with "+" when they differed
    count: int
    first: str  # time of the first attempt
    last: str
    process: str  # the first attempt's process, "php8.2 (326)"
    php: Place | None  # the first attempt's PHP line
    # What was or would have been sent. `requests`: the HTTP requests being served when the
    # attempts were made (`sandbox serve`). `sni`, `http` and `payloads`: the TLS server names,
    # HTTP request lines and first bytes seen (issue 16 items 1-2 fill them); empty when unknown.
    requests: tuple[str, ...] = ()
    sni: tuple[str, ...] = ()
    http: tuple[str, ...] = ()
    payloads: tuple[str, ...] = ()

    @property
    def has_payload(self) -> bool:
        return bool(self.requests or self.sni or self.http or self.payloads)


@dataclass(frozen=True)
class Event:
    """A line of the run's timeline."""

    time: str
    kind: str  # "start" | "end" | "attempt" | "dns" (a query the resolver received) | "tamper"
    verdict: str | None = None
    process: str | None = None
    destination: str | None = None
    name: str | None = None  # the name asked (dns) or the name the address came from
    php: Place | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Process:
    """A process that made attempts, in tree order (`depth` below its nearest known parent)."""

    pid: int
    ppid: int | None
    exe: str | None
    cmdline: str | None
    uid: int | None
    depth: int
    attempts: int
    first: str


@dataclass(frozen=True)
class Query:
    """A query the sandbox's resolver received during the run."""

    time: str
    name: str
    qtype: str
    result: str
    refused: bool
    process: str | None  # who asked, when the guest's record of the query was matched
    php: Place | None


@dataclass(frozen=True)
class Report:
    schema: str
    run: RunInfo
    policy: PolicyInfo | None  # None: a run recorded before runs kept their policy
    counts: Counts
    destinations: tuple[Destination, ...]
    processes: tuple[Process, ...]
    dns: tuple[Query, ...]
    timeline: tuple[Event, ...]


# ---- records -> model -------------------------------------------------------------------------


def _place(stack: Sequence[Frame]) -> Place | None:
    for frame in stack:
        if frame.file:
            return Place(frame.function, frame.file, frame.line)
    return None


def _policy(data: Mapping[str, Any] | None) -> PolicyInfo | None:
    if data is None:
        return None
    from orchestrator.egress.policy import EgressPolicy

    policy = EgressPolicy.from_dict(data)
    return PolicyInfo(
        allow=(
            *(entry.describe() for entry in policy.allow),
            *(f"{w.describe()} (names as the resolver answers)" for w in policy.wildcards),
        ),
        names=tuple(NameInfo(host, addrs) for host, addrs in policy.names),
        dns=policy.dns,
        blocked=policy.blocked.value,
        learn=policy.learn.value,
        sinkhole=policy.sinkhole,
    )


def _verdict(verdicts: Iterable[Verdict]) -> str:
    return "+".join(sorted({v.value for v in verdicts}))


def _destinations(attempts: Sequence[Attempt]) -> tuple[Destination, ...]:
    groups: dict[tuple[str, str, int | None], list[Attempt]] = {}
    for attempt in attempts:
        if attempt.verdict not in _NOT_DESTINATIONS:
            groups.setdefault((attempt.proto, attempt.dst, attempt.dport), []).append(attempt)
    found = []
    for (proto, address, port), group in groups.items():
        group.sort(key=lambda a: a.time)
        first = group[0]
        names = tuple(sorted({a.dns_name for a in group if a.dns_name}))
        found.append(
            Destination(
                key=f"{proto} {address_port(address, port)}",
                proto=proto,
                address=address,
                port=port,
                names=names,
                verdict=_verdict(a.verdict for a in group),
                count=len(group),
                first=first.time,
                last=group[-1].time,
                process=process_label(first.exe, first.pid),
                php=next((p for p in (_place(a.stack) for a in group) if p), None),
                requests=tuple(dict.fromkeys(a.request for a in group if a.request)),
                sni=tuple(dict.fromkeys(a.sni for a in group if a.sni)),
                http=tuple(dict.fromkeys(a.http for a in group if a.http)),
                payloads=tuple(dict.fromkeys(a.payload for a in group if a.payload)),
            )
        )
    return tuple(sorted(found, key=lambda d: (d.first, d.key)))


def _processes(attempts: Sequence[Attempt]) -> tuple[Process, ...]:
    seen: dict[int, Attempt] = {}
    counts: dict[int, int] = {}
    for attempt in sorted(attempts, key=lambda a: a.time):
        if attempt.pid is None:
            continue
        seen.setdefault(attempt.pid, attempt)
        counts[attempt.pid] = counts.get(attempt.pid, 0) + 1
    children: dict[int | None, list[int]] = {}
    for pid, attempt in seen.items():
        # ppid is the guest's word: a parent we never saw (or a pid its own parent) is a root.
        parent = attempt.ppid if attempt.ppid in seen and attempt.ppid != pid else None
        children.setdefault(parent, []).append(pid)
    ordered: list[Process] = []
    placed: set[int] = set()

    def by_time(pids: Iterable[int]) -> list[int]:
        return sorted(pids, key=lambda p: (seen[p].time, p))

    # Depth first without recursion: the guest decides how deep the chain of parents goes.
    roots = by_time(children.get(None, []))
    for start in [*roots, *sorted(seen)]:  # after the roots, only a cycle of ppids leaves any
        pending = [(start, 0)]
        while pending:
            pid, depth = pending.pop()
            if pid in placed:
                continue
            placed.add(pid)
            a = seen[pid]
            ordered.append(
                Process(pid, a.ppid, a.exe, a.cmdline, a.uid, depth, counts[pid], a.time)
            )
            pending += [(child, depth + 1) for child in reversed(by_time(children.get(pid, [])))]
    return tuple(ordered)


def _moment(stamp: str) -> float:
    return parse_time(stamp).timestamp()


def _queries(
    run: RunRecord,
    mine: Sequence[Attempt],
    everyone: Sequence[Attempt],
    queries: Sequence[DnsQuery],
) -> tuple[Query, ...]:
    """The resolver's queries of the run: those whose client socket is one of the run's DNS
    records (exact), and those no record of any run claims that came while it was going."""
    # A record without its socket's port (older ones) claims nothing.
    Socket = tuple[str | None, int | None]
    asked: dict[Socket, Attempt] = {
        (a.src, a.sport): a for a in mine if a.verdict is Verdict.DNS and a.sport
    }
    claimed: set[Socket] = {
        (a.src, a.sport) for a in everyone if a.verdict is Verdict.DNS and a.sport
    }
    start = run.started - _DNS_BEFORE
    end = (run.ended if run.ended is not None else float("inf")) + _DNS_AFTER
    found = []
    for q in queries:
        socket = (q.client, q.port)
        by = asked.get(socket)
        if by is None and (socket in claimed or not start <= _moment(q.time) <= end):
            continue
        found.append(
            Query(
                time=q.time,
                name=q.name,
                qtype=q.qtype,
                result=q.result,
                refused=not q.addresses(),
                process=process_label(by.exe, by.pid) if by else None,
                php=_place(by.stack) if by else None,
            )
        )
    return tuple(sorted(found, key=lambda q: q.time))


def _timeline(run: RunRecord, mine: Sequence[Attempt], dns: Sequence[Query]) -> tuple[Event, ...]:
    events = [Event(iso_time(run.started), "start", detail=" ".join(run.argv))]
    for a in mine:
        if a.verdict is Verdict.TAMPER:
            events.append(Event(a.time, "tamper", a.verdict.value, detail=a.evidence))
            continue
        events.append(
            Event(
                time=a.time,
                kind="attempt",
                verdict=a.verdict.value,
                process=process_label(a.exe, a.pid),
                destination=f"{a.proto} {address_port(a.dst, a.dport)}",
                name=a.dns_name,
                php=_place(a.stack),
                detail=a.request,
            )
        )
    events += [Event(q.time, "dns", None, q.process, None, q.name, q.php, q.result) for q in dns]
    if run.ended is not None:
        code = "timed out" if run.timed_out else f"exit {run.exit_code}"
        events.append(Event(iso_time(run.ended), "end", detail=code))
    # Stable: the run's start first and its end last among equal stamps.
    order = {"start": 0, "attempt": 1, "dns": 1, "tamper": 1, "end": 2}
    return tuple(sorted(events, key=lambda e: (e.time, order[e.kind])))


def build(
    sandbox: str, run: RunRecord, attempts: Sequence[Attempt], queries: Sequence[DnsQuery]
) -> Report:
    """The report of `run`, from every stored attempt and resolver query of its sandbox. Pure."""
    mine = [a for a in attempts if a.run == run.id and a.verdict is not Verdict.PROBE]
    destinations = _destinations(mine)
    dns = _queries(run, mine, attempts, queries)
    shown = [a for a in mine if a.verdict is not Verdict.TAMPER]
    return Report(
        schema=SCHEMA,
        run=RunInfo(
            sandbox=sandbox,
            id=run.id,
            argv=run.argv,
            php=run.php,
            user=run.user,
            xdebug=run.xdebug,
            started=iso_time(run.started),
            ended=iso_time(run.ended) if run.ended is not None else None,
            exit_code=run.exit_code,
            timed_out=run.timed_out,
            leftovers=run.leftovers,
        ),
        policy=_policy(run.policy),
        counts=Counts(
            attempts=len(shown),
            allowed=sum(1 for a in shown if a.verdict is Verdict.ALLOWED),
            blocked=sum(1 for a in shown if a.verdict in _BLOCKED),
            destinations=len(destinations),
            dns_queries=len(dns),
        ),
        destinations=destinations,
        processes=_processes(shown),
        dns=dns,
        timeline=_timeline(run, mine, dns),
    )


# ---- model -> JSON ----------------------------------------------------------------------------


def to_dict(model: Any) -> dict[str, Any]:
    """A report (or diff) as JSON-ready data: the dataclasses' fields in their order."""
    value: dict[str, Any] = dataclasses.asdict(model)
    return value


def to_json(model: Report | Diff) -> str:
    """The JSON of a report or diff: stable key order, two-space indent, ASCII only (a guest's
    bidi or control characters arrive as \\u escapes, never raw)."""
    return json.dumps(to_dict(model), indent=2, ensure_ascii=True) + "\n"


class ReportFileError(UsageError):
    """A saved report that is not one this version reads."""


def from_json(text: str | bytes, where: str) -> Report:
    """A report saved with `--json` (`where` names it in errors): read back to compare it with
    another run (`--diff`), on another machine or after its logs were purged. Checked field by
    field against the model: a file is anybody's word."""
    try:
        value = jsontext.parse_object(text)
    except jsontext.JsonObjectError as error:
        raise ReportFileError(f"{where}: {error}", REPORT_HINT) from None
    if value.get("schema") != SCHEMA:
        raise ReportFileError(
            f"{where}: schema {str(value.get('schema'))[:40]!r}, not {SCHEMA!r}", REPORT_HINT
        )
    try:
        report: Report = _typed(Report, value)
    except (TypeError, ValueError) as error:
        raise ReportFileError(f"{where}: {error}", REPORT_HINT) from None
    return report


REPORT_HINT = "give a file `sandbox report --json FILE` wrote, or a run ([SANDBOX:]RUN)"


def _typed(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as `kind`: a model dataclass, a tuple[X, ...], X | None, str, int or
    bool; TypeError naming what does not fit. Unknown keys are left out (a newer version may add
    fields); a missing one is an error unless it has a default."""
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _typed(inner, value)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"a list expected, not {type(value).__name__}")
        (inner, _dots) = typing.get_args(kind)
        return tuple(_typed(inner, item) for item in value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"an object expected for {kind.__name__}")
        hints = typing.get_type_hints(kind)
        given = {}
        for field in dataclasses.fields(kind):
            if field.name in value:
                try:
                    given[field.name] = _typed(hints[field.name], value[field.name])
                except TypeError as error:
                    raise TypeError(f"{field.name}: {error}") from None
            elif field.default is dataclasses.MISSING:
                raise TypeError(f"{kind.__name__} without {field.name}")
        return kind(**given)
    # bool is an int to Python: check it first, and never take one for the other.
    if kind is bool or kind is int:
        if type(value) is not kind:
            raise TypeError(f"{kind.__name__} expected, not {type(value).__name__}")
        return value
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(f"{getattr(kind, '__name__', kind)} expected, not {type(value).__name__}")


# ---- model -> HTML ----------------------------------------------------------------------------


def _finalize(value: Any) -> Any:
    # Every {{ expression }} passes here before autoescape: guest text with control or bidi
    # characters is shown with them as visible escapes, as in the terminal.
    if value is None:
        return ""
    return safetext.clean(value) if isinstance(value, str) else value


TEMPLATE = "report.html.j2"  # in orchestrator/capture/templates/, package data of the wheel


def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator.capture", "templates"),
        autoescape=True,  # every template, whatever its name: the model is attacker input
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_path() -> str:
    """Where the HTML template is loaded from (the checkout's, or the installed wheel's)."""
    env = _environment()
    assert env.loader is not None
    _source, filename, _uptodate = env.loader.get_source(env, TEMPLATE)
    return str(filename)


def render_html(report: Report) -> str:
    """One self-contained HTML page of the report: inline CSS, no script, no external load."""
    return _environment().get_template(TEMPLATE).render(report=report, schema=SCHEMA)


# ---- two runs compared ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRef:
    sandbox: str
    run: str


@dataclass(frozen=True)
class Change:
    status: str  # "new" | "gone" | "changed" | "same"
    key: str  # run B's destination key (run A's for a gone one)
    names: tuple[str, ...]  # the names either run's lookups gave its address under
    verdict_a: str | None
    verdict_b: str | None
    count_a: int
    count_b: int
    php_a: str | None
    php_b: str | None


@dataclass(frozen=True)
class Diff:
    schema: str
    a: RunRef
    b: RunRef
    changes: tuple[Change, ...]  # new, gone and changed first, then the same

    def counts(self) -> dict[str, int]:
        found = {status: 0 for status in ("new", "gone", "changed", "same")}
        for change in self.changes:
            found[change.status] += 1
        return found


def _same_place(a: Destination, b: Destination) -> bool:
    """Two runs' destinations are one when protocol and port match and they share an address or
    a name: a name may resolve to other addresses in another run (a CDN), and an address may be
    named in one run and not in the other (a policy without the name)."""
    if (a.proto, a.port) != (b.proto, b.port):
        return False
    return _address(a.address) == _address(b.address) or bool(set(a.names) & set(b.names))


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def diff(a: Report, b: Report) -> Diff:
    """What changed from run A to run B, destination by destination. Pure."""
    unmatched = list(a.destinations)
    rows: list[Change] = []
    for dest in b.destinations:
        match = next((old for old in unmatched if _same_place(old, dest)), None)
        if match is None:
            rows.append(
                Change(
                    "new", dest.key, dest.names, None, dest.verdict, 0, dest.count, None, _php(dest)
                )
            )
            continue
        unmatched.remove(match)
        status = "same" if match.verdict == dest.verdict else "changed"
        rows.append(
            Change(
                status,
                dest.key,
                tuple(sorted(set(match.names) | set(dest.names))),
                match.verdict,
                dest.verdict,
                match.count,
                dest.count,
                _php(match),
                _php(dest),
            )
        )
    rows += [
        Change("gone", d.key, d.names, d.verdict, None, d.count, 0, _php(d), None)
        for d in unmatched
    ]
    order = {"new": 0, "gone": 1, "changed": 2, "same": 3}
    return Diff(
        schema=DIFF_SCHEMA,
        a=RunRef(a.run.sandbox, a.run.id),
        b=RunRef(b.run.sandbox, b.run.id),
        changes=tuple(sorted(rows, key=lambda r: (order[r.status], r.key))),
    )


def _php(dest: Destination) -> str | None:
    return dest.php.describe() if dest.php else None


_STATUS_STYLE = {"new": "bold yellow", "gone": "cyan", "changed": "bold red", "same": "dim"}


def render_diff(result: Diff, *, all_rows: bool = False) -> Table:
    """The diff as a rich table: new, gone and changed destinations (and the same with
    `all_rows`). Guest text only as rich Text, never markup."""
    from rich.table import Table
    from rich.text import Text

    counts = result.counts()
    table = Table(
        title=safetext.text(
            f"{result.a.sandbox}:{result.a.run} -> {result.b.sandbox}:{result.b.run}"
        ),
        caption=f"{counts['new']} new, {counts['gone']} gone, {counts['changed']} changed, "
        f"{counts['same']} the same",
        expand=False,
    )
    columns = ("change", "destination", "name", "verdict A", "verdict B", "count A", "count B")
    for column in (*columns, "php"):
        table.add_column(column, no_wrap=column in ("change", "destination"))
    for row in result.changes:
        if row.status == "same" and not all_rows:
            continue
        php = row.php_b or row.php_a or ""
        table.add_row(
            Text(row.status, style=_STATUS_STYLE[row.status]),
            safetext.text(row.key),
            safetext.text(", ".join(row.names)),
            safetext.text(row.verdict_a or "-"),
            safetext.text(row.verdict_b or "-"),
            str(row.count_a),
            str(row.count_b),
            safetext.text(php),
        )
    return table


def render_summary(report: Report) -> Table:
    """`sandbox report` without a file: the per-destination summary as a rich table."""
    from rich.table import Table

    run = report.run
    table = Table(
        title=safetext.text(f"run {run.sandbox}:{run.id}: {' '.join(run.argv)}"), expand=False
    )
    for column in ("destination", "name", "verdict", "count", "process", "first php line"):
        table.add_column(column, no_wrap=column == "destination")
    for dest in report.destinations:
        table.add_row(
            safetext.text(dest.key),
            safetext.text(", ".join(dest.names)),
            safetext.text(dest.verdict),
            str(dest.count),
            safetext.text(dest.process),
            safetext.text(dest.php.describe() if dest.php else ""),
        )
    return table

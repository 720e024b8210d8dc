"""The sinkhole of a sandbox in sinkhole mode (`sandbox up --sinkhole`): what the guest would have
sent, with nothing ever sent on.

In sinkhole mode the sandbox network's resolver answers every name with the network's gateway
(domain.render_network), both filters let the guest reach the gateway on any port
(EgressPolicy.with_sinkhole), and the host's guard of the bridge redirects every TCP port of the
gateway but DNS to the one port this process listens on (hostguard.render_ruleset); UDP to the
gateway is dropped there without an answer. This process accepts each connection, reads its
first bytes (at most payload.READ_BYTES, for at most READ_SECONDS), answers minimally (an HTTP 200
with an empty body, a TLS handshake_failure alert, nothing to anything else), closes it, and
appends one JSON line per connection to the sandbox's logs, with the port the guest asked for
(SO_ORIGINAL_DST: the redirect's conntrack entry keeps it). It never opens a connection itself.

It is attacker-facing, so it is bounded: MAX_OPEN connections at once (more wait in the listen
backlog), MAX_CONNECTIONS recorded over its life (later ones are closed unread), READ_SECONDS per
connection, MAX_LOG_BYTES of records; and it gives up root (to nobody) once it holds its socket
and its log file. `up` starts it (the listening socket is bound by `up`, on the gateway, and
handed over), `destroy` stops it. On a remote libvirt host the sinkhole runs there instead
(remotesinkhole.py: a standalone program whose raw records become these records on the client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator import detached, jsontext
from orchestrator.capture import payload
from orchestrator.capture.records import Attempt, Verdict, parse_time

# The remote hosts' sinkhole program, standard library only: one reading of the redirect for both.
from orchestrator.egress.sinkhole_service import original_destination
from orchestrator.errors import SandboxError

RECORDS_FILE = "sinkhole.jsonl"
ERRORS_FILE = "sinkhole.log"
MAX_OPEN = 32
MAX_CONNECTIONS = 4096
READ_SECONDS = 3.0
# Raw bytes (neither a request nor a ClientHello): the guest may send more in a moment.
IDLE_SECONDS = 0.5
MAX_LOG_BYTES = 8 << 20
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
# A fatal handshake_failure alert (TLS 1.0 record version: every client takes it).
TLS_ALERT = bytes.fromhex("15030100020228")
NOBODY = 65534
_MODULE = "orchestrator.egress.sinkhole"
_READY = "sinkhole ready"


class SinkholeError(SandboxError):
    """The sinkhole could not be started or stopped."""


@dataclass(frozen=True)
class Started:
    pid: int
    port: int


def start(gateway: ipaddress.IPv4Address, logs: Path, *, timeout: float = 15.0) -> Started:
    """Bind the sinkhole's socket on `gateway` (a free port), start the sinkhole detached with it
    (its own session: it outlives `up`), and return its pid and port once it serves."""
    logs.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((str(gateway), 0))
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise SinkholeError(
            f"cannot listen on the sandbox network's gateway {gateway}: {error.strerror}",
            "run sandbox as root in the network namespace of libvirt's networks",
        ) from None
    port = listener.getsockname()[1]
    with listener, (logs / RECORDS_FILE).open("ab") as records:
        os.chmod(records.fileno(), 0o600)
        pid = detached.start(
            _MODULE,
            [
                *("--listen-fd", str(listener.fileno()), "--log-fd", str(records.fileno())),
                # Unused by the service: it names the sandbox, for a `destroy` without its pid.
                *("--logs", str(logs)),
            ],
            pass_fds=(listener.fileno(), records.fileno()),
            errors_file=logs / ERRORS_FILE,
            ready=_READY,
            what="the sinkhole",
            error=SinkholeError,
            timeout=timeout,
        )
    return Started(pid, port)


def stop(pid: int, *, timeout: float = 5.0) -> bool:
    """Stop the sinkhole `pid`; False if it was gone already."""
    return detached.stop(pid, _MODULE, "the sinkhole", timeout=timeout)


# ---- the service (runs as nobody, detached) ---------------------------------------------------


def _complete(data: bytes) -> bool:
    """Whether `data` holds enough to summarise: an HTTP request head, a whole TLS record."""
    if len(data) >= payload.READ_BYTES or b"\r\n\r\n" in data:
        return True
    if len(data) >= 5 and data[0] == 0x16:
        return len(data) >= 5 + int.from_bytes(data[3:5], "big")
    return False


def answer(summary: payload.Payload) -> bytes:
    """What the sinkhole says back: as little as lets the client finish. Pure."""
    if summary.kind == "http":
        return HTTP_OK
    if summary.kind == "tls":
        return TLS_ALERT
    return b""


def record(
    now: float, peer: tuple[str, int], target: tuple[str, int] | None, data: bytes
) -> dict[str, object]:
    """The JSON record of one connection. Pure."""
    summary = payload.summarize(data)
    return {
        "time": round(now, 6),
        "src": peer[0],
        "sport": peer[1],
        "dst": target[0] if target else None,
        "dport": target[1] if target else None,
        "kind": summary.kind,
        "sni": summary.sni,
        "http": summary.http,
        "summary": summary.describe(),
        "bytes": summary.size,
    }


class _Service:
    def __init__(self, log_fd: int) -> None:
        self.log = os.fdopen(log_fd, "ab", buffering=0)
        self.logged = self.log.tell()
        self.open = 0
        self.total = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        self.total += 1
        if self.open >= MAX_OPEN or self.total > MAX_CONNECTIONS:
            writer.close()
            return
        self.open += 1
        try:
            target = original_destination(sock) if sock is not None else None
            data = await self._read(reader)
            line = record(time.time(), (str(peer[0]), int(peer[1])), target, data)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                writer.write(answer(payload.summarize(data)))
                await asyncio.wait_for(writer.drain(), 1.0)
            self._write(line)
        finally:
            self.open -= 1
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        data = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + READ_SECONDS
        while not _complete(data):
            left = end - loop.time()
            if left <= 0:
                break
            wait = min(left, IDLE_SECONDS) if data else left
            try:
                chunk = await asyncio.wait_for(reader.read(payload.READ_BYTES - len(data)), wait)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def _write(self, line: dict[str, object]) -> None:
        text = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        if self.logged + len(text) > MAX_LOG_BYTES:
            return
        self.log.write(text)
        self.logged += len(text)


def _drop_root() -> None:
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


async def _serve(listen_fd: int, log_fd: int) -> None:
    listener = socket.socket(fileno=listen_fd)
    service = _Service(log_fd)
    _drop_root()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(service.handle, sock=listener, backlog=128)
    print(_READY, file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_MODULE)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--log-fd", type=int, required=True)
    parser.add_argument("--logs", type=Path, required=True)  # names the sandbox (hostprocs.py)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen_fd, args.log_fd))
    return 0


# ---- on the host, at collection ---------------------------------------------------------------


@dataclass(frozen=True)
class Sinkholed:
    """One connection the sinkhole took, as it recorded it."""

    time: float
    src: str
    sport: int
    dport: int
    sni: str | None
    http: str | None
    summary: str


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def parse_records(text: str) -> list[Sinkholed]:
    """The sinkhole's records (lines it wrote from what the guest sent: checked again). Pure."""
    found = []
    for line in text.splitlines():
        data = jsontext.object_or_none(line)
        if data is None:
            continue
        stamp, src, sport, dport = (data.get(k) for k in ("time", "src", "sport", "dport"))
        if not isinstance(stamp, int | float) or not isinstance(src, str):
            continue
        if not isinstance(sport, int) or not isinstance(dport, int):
            continue
        found.append(
            Sinkholed(
                float(stamp),
                src,
                sport,
                dport,
                _text(data.get("sni"), payload.MAX_NAME),
                _text(data.get("http"), payload.MAX_PATH + 300),
                _text(data.get("summary"), 400) or "",
            )
        )
    return found


def read_records(logs: Path) -> list[Sinkholed]:
    path = logs / RECORDS_FILE
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_LOG_BYTES).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return parse_records(text)


_SERVICE_PORTS = {("udp", 53), ("tcp", 53), ("udp", 67)}
JOIN_WINDOW = 120.0


def attach(
    attempts: Sequence[Attempt],
    records: Sequence[Sinkholed],
    gateway: str,
    history: Iterable[Attempt] = (),
) -> list[Attempt]:
    """The attempts, those to the sinkhole (`gateway`, any port but the resolver's) marked
    sinkholed, given what the sinkhole read on their connection (same source port and port,
    nearest in time), and the name their process last looked up (the guest's own record of its
    queries: every name resolves to the same address, so the resolver's log, by the second,
    cannot tell them apart). `history`: attempts stored before, for their queries. Pure."""
    by_key: dict[tuple[str, int, int], list[Sinkholed]] = {}
    for item in records:
        by_key.setdefault((item.src, item.sport, item.dport), []).append(item)
    queries = sorted(
        (
            (parse_time(a.time).timestamp(), a.pid, a.dns_name)
            for a in [*history, *attempts]
            if a.verdict is Verdict.DNS and a.dns_name and a.pid is not None
        ),
        key=lambda q: q[0],
    )
    out = []
    for attempt in attempts:
        if (
            attempt.dst != gateway
            or attempt.proto not in ("tcp", "udp")
            or (attempt.proto, attempt.dport) in _SERVICE_PORTS
            or attempt.verdict in (Verdict.DNS, Verdict.PROBE, Verdict.TAMPER)
        ):
            out.append(attempt)
            continue
        when = parse_time(attempt.time).timestamp()
        named = [n for t, pid, n in queries if pid == attempt.pid and t <= when]
        attempt = replace(
            attempt, verdict=Verdict.SINKHOLED, dns_name=named[-1] if named else attempt.dns_name
        )
        if attempt.src is not None and attempt.sport is not None and attempt.dport is not None:
            near = [
                r
                for r in by_key.get((attempt.src, attempt.sport, attempt.dport), [])
                if abs(r.time - when) <= JOIN_WINDOW
            ]
            if near:
                best = min(near, key=lambda r: abs(r.time - when))
                attempt = replace(attempt, sni=best.sni, http=best.http, payload=best.summary)
        out.append(attempt)
    return out


if __name__ == "__main__":
    sys.exit(main())

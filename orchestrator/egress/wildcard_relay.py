"""The relay of a sandbox's wildcard resolver on a REMOTE libvirt host: a standalone program,
written into the sandbox's directory there (remoterelay.py) and run by that host's python3.

The network's dnsmasq forwards the wildcard domains to a resolver on its own host's loopback;
the resolver (wildcards.py) runs on the client, which is where the upstream lookup, the parsing
and the allowing happen. This program joins the two: dnsmasq's queries come to its UDP socket on
127.0.0.1, and each goes, framed, to the one client attached to its unix socket (the client runs
this program's `attach` mode as an SSH exec command: the channel's stdin and stdout become that
connection); the client's answer comes back the same way and goes to the query's sender.

Nothing of sandbox is installed on a remote host: this file imports the standard library alone
(tests/test_wildcard_relay.py checks) and keeps to syntax that older Debian releases' python3
runs. It parses no DNS: a datagram is bytes with a tag. What it bounds is its own state: at most
MAX_PAYLOAD bytes a message, `--max-pending` queries waiting for an answer (more are dropped),
each for `--answer-seconds` at most, one client at a time (a new one replaces it). Without a
client a query is dropped: dnsmasq retries, then fails the lookup, so nothing resolves that the
client did not answer.

Frames, both directions: a header struct `!HI` (payload length, tag), then the payload. Queries
have a payload of 1 to MAX_PAYLOAD bytes; an answer of length 0 means "no answer, forget the
tag"; a length above MAX_PAYLOAD closes that client's connection.

`serve`, as root: binds 127.0.0.1 on a free UDP port and the unix socket (0600, root's), gives
up root (to nobody), prints `listening PORT` and serves until SIGTERM.
`attach`: copies stdin to the unix socket and the socket to stdout until either ends.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pwd
import selectors
import signal
import socket
import stat
import struct
import sys
import time

FRAME = struct.Struct("!HI")
MAX_PAYLOAD = 4096
READY = "listening"
NOBODY = 65534
MAX_TAG = 0xFFFFFFFF
# The most read at once: any datagram (one over MAX_PAYLOAD is then dropped whole, not cut), or
# a piece of a stream.
CHUNK = 65536
# How often serve looks up from its sockets at least (expiry is checked then too).
IDLE_SECONDS = 1.0


class Relay:
    """The serve loop's state: the sockets, the client, the pending queries."""

    def __init__(
        self,
        udp: socket.socket,
        listener: socket.socket,
        max_pending: int,
        answer_seconds: float,
    ) -> None:
        self.udp = udp
        self.listener = listener
        self.max_pending = max_pending
        self.answer_seconds = answer_seconds
        self.selector = selectors.DefaultSelector()
        self.selector.register(udp, selectors.EVENT_READ, self.on_query)
        self.selector.register(listener, selectors.EVENT_READ, self.on_connect)
        self.client: socket.socket | None = None
        self.inbox = b""
        self.outbox = b""
        # What the client has not read yet: the frames of the pending queries, at most.
        self.max_outbox = max_pending * (FRAME.size + MAX_PAYLOAD)
        # tag -> (sender, deadline), in the order they came: the first one expires first.
        self.pending: dict[int, tuple[tuple[str, int], float]] = {}
        self.next_tag = int.from_bytes(os.urandom(4), "big")

    def serve(self) -> None:
        while True:
            self.expire(time.monotonic())
            for key, events in self.selector.select(IDLE_SECONDS):
                key.data(events)

    # ---- the client ------------------------------------------------------------------------

    def drop_client(self) -> None:
        if self.client is not None:
            self.selector.unregister(self.client)
            self.client.close()
        self.client = None
        self.inbox = self.outbox = b""
        # Its questions are no one's now: a new client does not know their tags.
        self.pending.clear()

    def on_connect(self, events: int) -> None:
        try:
            conn, _peer = self.listener.accept()
        except OSError:
            return
        self.drop_client()
        conn.setblocking(False)
        self.client = conn
        self.selector.register(conn, selectors.EVENT_READ, self.on_client)

    def on_client(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush()
        client = self.client
        if client is None or not events & selectors.EVENT_READ:
            return
        try:
            data = client.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop_client()
            return
        self.inbox += data
        while len(self.inbox) >= FRAME.size:
            length, tag = FRAME.unpack_from(self.inbox)
            if length > MAX_PAYLOAD:
                self.drop_client()
                return
            end = FRAME.size + length
            if len(self.inbox) < end:
                break
            answer = self.inbox[FRAME.size : end]
            self.inbox = self.inbox[end:]
            self.answer(tag, answer)

    def answer(self, tag: int, answer: bytes) -> None:
        entry = self.pending.pop(tag, None)
        if entry is None or entry[1] < time.monotonic() or not answer:
            return
        with contextlib.suppress(OSError):  # the sender went away: nothing to do
            self.udp.sendto(answer, entry[0])

    def send(self, frame: bytes) -> bool:
        """Queue `frame` for the client; False when its backlog is full (a client that does
        not read)."""
        if len(self.outbox) + len(frame) > self.max_outbox:
            return False
        self.outbox += frame
        self.flush()
        return True

    def flush(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            sent = client.send(self.outbox) if self.outbox else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop_client()
            return
        self.outbox = self.outbox[sent:]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        if self.selector.get_key(client).events != wanted:
            self.selector.modify(client, wanted, self.on_client)

    # ---- the queries -----------------------------------------------------------------------

    def on_query(self, events: int) -> None:
        try:
            data, sender = self.udp.recvfrom(CHUNK)
        except OSError:
            return
        now = time.monotonic()
        self.expire(now)
        if self.client is None or not data or len(data) > MAX_PAYLOAD:
            return
        if len(self.pending) >= self.max_pending:
            return
        tag = self.fresh_tag()
        # A client that broke while it was sent to is gone: no answer will come.
        if self.send(FRAME.pack(len(data), tag) + data) and self.client is not None:
            self.pending[tag] = (sender, now + self.answer_seconds)

    def fresh_tag(self) -> int:
        while True:
            self.next_tag = (self.next_tag + 1) & MAX_TAG
            if self.next_tag not in self.pending:
                return self.next_tag

    def expire(self, now: float) -> None:
        while self.pending:
            tag = next(iter(self.pending))
            if self.pending[tag][1] >= now:
                return
            del self.pending[tag]


def drop_root() -> None:
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = NOBODY
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise SystemExit("could not give up root")


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600; a stale socket there is replaced, anything
    else is refused."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SystemExit(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(mask)
    os.chmod(path, 0o600)
    listener.listen(1)
    return listener


def serve(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    listener = bind_unix(args.socket)
    os.chdir("/")
    drop_root()
    udp.setblocking(False)
    listener.setblocking(False)
    relay = Relay(udp, listener, args.max_pending, args.answer_seconds)
    print(READY, udp.getsockname()[1], flush=True)
    relay.serve()
    return 0


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def attach(args: argparse.Namespace) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(args.socket)
    except OSError as e:
        sys.stderr.write(f"cannot connect to the relay at {args.socket}: {e.strerror}\n")
        return 1
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(conn, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj == 0:
                    data = os.read(0, CHUNK)
                    if not data:
                        return 0
                    conn.sendall(data)
                else:
                    data = conn.recv(CHUNK)
                    if not data:
                        return 0
                    write_all(1, data)
    except OSError as e:
        # The other end went away while we wrote: the channel or the relay ended.
        if e.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0
        sys.stderr.write(f"relay attach: {e}\n")
        return 1


def count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 86400:  # NaN included
        raise argparse.ArgumentTypeError("must be positive seconds, under a day")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wildcard-relay")
    modes = parser.add_subparsers(dest="mode")
    serving = modes.add_parser("serve")
    serving.add_argument("--socket", required=True)
    serving.add_argument("--max-pending", type=count, default=256)
    serving.add_argument("--answer-seconds", type=seconds, default=10.0)
    attaching = modes.add_parser("attach")
    attaching.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    if args.mode is None:
        parser.error("a mode is required: serve or attach")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "serve":
        return serve(args)
    return attach(args)


if __name__ == "__main__":
    sys.exit(main())

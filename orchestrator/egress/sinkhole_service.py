"""The sinkhole of a sandbox on a REMOTE libvirt host: a standalone program, written into the
sandbox's directory there (remotesinkhole.py) and run by that host's python3.

Nothing of sandbox is installed on a remote host, only standard Debian packages: this file
imports the standard library alone (tests/test_remotesinkhole.py checks), and keeps to syntax
that older Debian releases' python3 runs. It does the part of the local sinkhole (sinkhole.py)
that must happen beside the guest's network, and no parsing: it accepts each connection the
host guard redirects to it, reads its first bytes (bounded in count and time), answers by a
prefix check (a TLS handshake record: the TLS alert; an HTTP method: an empty 200; else nothing),
and appends one JSON line per connection with the port the guest asked for (SO_ORIGINAL_DST) and
the raw bytes (base64). The client fetches that file and summarises the bytes with the same,
tested code as the local sinkhole's records (payload.summarize, sinkhole.record): the
attacker-facing parsing stays there.

Run as root, it binds the given address on a free port, opens its record file, gives up root
(to nobody), prints `listening PORT` and serves until SIGTERM. The bounds are arguments (the
client passes the local sinkhole's): connections open at once (more wait in the listen
backlog), connections recorded over its life (later ones are closed unread), seconds read per
connection, bytes of records.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import socket
import struct
import sys
import threading
import time

HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
# A fatal handshake_failure alert (TLS 1.0 record version: every client takes it).
TLS_ALERT = bytes.fromhex("15030100020228")
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
# The request methods the client's HTTP parser (dpkt) takes: an answer for what it will show.
METHODS = (
    b"GET", b"PUT", b"ICY", b"COPY", b"HEAD", b"LOCK", b"MOVE", b"POLL", b"POST", b"BCOPY",
    b"BMOVE", b"MKCOL", b"TRACE", b"LABEL", b"MERGE", b"DELETE", b"SEARCH", b"UNLOCK",
    b"REPORT", b"UPDATE", b"NOTIFY", b"BDELETE", b"CONNECT", b"OPTIONS", b"CHECKIN",
    b"PROPFIND", b"CHECKOUT", b"CCM_POST", b"SUBSCRIBE", b"PROPPATCH", b"BPROPFIND",
    b"BPROPPATCH", b"UNCHECKOUT", b"MKACTIVITY", b"MKWORKSPACE", b"UNSUBSCRIBE",
    b"RPC_CONNECT", b"VERSION-CONTROL", b"BASELINE-CONTROL",
)  # fmt: skip
READY = "listening"
# Once data came, the guest may send more in a moment, but not this long after.
IDLE_SECONDS = 0.5
SEND_SECONDS = 1.0
NOBODY = 65534


def complete(data: bytes, read_bytes: int) -> bool:
    """Whether `data` holds enough to summarise: an HTTP request head, a whole TLS record. Pure."""
    if len(data) >= read_bytes or b"\r\n\r\n" in data:
        return True
    if len(data) >= 5 and data[0] == 0x16:
        return len(data) >= 5 + int.from_bytes(data[3:5], "big")
    return False


def answer(data: bytes) -> bytes:
    """What the sinkhole says back, by the first bytes alone: as little as lets the client
    finish. Pure."""
    if data[:1] == b"\x16":
        return TLS_ALERT
    method = data.split(b" ", 1)[0]
    if len(method) < len(data) and method in METHODS:
        return HTTP_OK
    return b""


def record(
    now: float,
    peer: tuple[str, int],
    target: tuple[str, int] | None,
    data: bytes,
    read_bytes: int,
) -> bytes:
    """The JSON line of one connection: who, where to, and the first bytes as they came
    (base64, at most `read_bytes`). Pure."""
    line = {
        "time": round(now, 6),
        "src": peer[0],
        "sport": peer[1],
        "dst": target[0] if target else None,
        "dport": target[1] if target else None,
        "data": base64.b64encode(data[:read_bytes]).decode("ascii"),
    }
    return (json.dumps(line, separators=(",", ":")) + "\n").encode("ascii")


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The address and port the guest connected to, before the redirect."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(address), port


class Service:
    """The bounded service: one thread per connection, at most `max_open` at once."""

    def __init__(self, args: argparse.Namespace, log_fd: int) -> None:
        self.args = args
        self.log_fd = log_fd
        self.logged = os.fstat(log_fd).st_size
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(args.max_open)
        self.total = 0

    def serve(self, listener: socket.socket) -> None:
        while True:
            # A free slot before the next accept: the others wait in the listen backlog.
            self.slots.acquire()
            try:
                conn, peer = listener.accept()
            except OSError:  # out of file descriptors, say: not a busy loop meanwhile
                self.slots.release()
                time.sleep(0.05)
                continue
            self.total += 1
            if self.total > self.args.max_connections:
                conn.close()
                self.slots.release()
                continue
            thread = threading.Thread(target=self.handle, args=(conn, peer), daemon=True)
            thread.start()

    def handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            target = original_destination(conn)
            data = self.read(conn)
            try:
                conn.settimeout(SEND_SECONDS)
                conn.sendall(answer(data))
            except OSError:
                pass
            self.write(record(time.time(), (peer[0], peer[1]), target, data, self.args.read_bytes))
        finally:
            conn.close()
            self.slots.release()

    def read(self, conn: socket.socket) -> bytes:
        data = b""
        limit = self.args.read_bytes
        end = time.monotonic() + self.args.read_seconds
        while not complete(data, limit):
            left = end - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(min(left, IDLE_SECONDS) if data else left)
            try:
                chunk = conn.recv(limit - len(data))
            except OSError:  # a timeout included
                break
            if not chunk:
                break
            data += chunk
        return data

    def write(self, line: bytes) -> None:
        with self.lock:
            if self.logged + len(line) > self.args.max_log_bytes:
                return
            # One write of an O_APPEND file: a line is whole, even if SIGTERM comes.
            os.write(self.log_fd, line)
            self.logged += len(line)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sinkhole")
    parser.add_argument("--address", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--read-bytes", type=int, required=True)
    parser.add_argument("--read-seconds", type=float, required=True)
    parser.add_argument("--max-open", type=int, required=True)
    parser.add_argument("--max-connections", type=int, required=True)
    parser.add_argument("--max-log-bytes", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir("/")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((args.address, 0))
    listener.listen(128)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    log_fd = os.open(args.records, flags, 0o600)
    drop_root()
    service = Service(args, log_fd)
    print(READY, listener.getsockname()[1], flush=True)
    service.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())

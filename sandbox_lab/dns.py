"""The fake internet's DNS server: an authority for inet.test on 198.51.100.53:53 (UDP), so that
what a sandbox's resolver forwards upstream (wildcard entries: orchestrator/egress/wildcards.py)
has somewhere to go that is not the real internet. Names and addresses from `ZONE`; any other
name under inet.test is NXDOMAIN, any name outside it REFUSED. Every query is appended to the
accept log like the servers' connections (server 198.51.100.53, port 53, proto udp, and `name`).
It runs as its own process (`sandbox-lab _dns`, pid in LAB_DNS_PID), beside the servers."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from orchestrator.files import atomic_write
from orchestrator.waits import Deadline, wait_for

DNS_SERVER = ipaddress.IPv4Address("198.51.100.53")
LAB_DNS_PID = "dns.pid"
LAB_DNS_LOG = "dns.log"
ZONE_ORIGIN = "inet.test"
ZONE: dict[str, tuple[str, ...]] = {
    "www.inet.test": ("203.0.113.7", "2001:db8:1::9"),
    "api.inet.test": ("198.51.100.9",),
    # Two names of one "CDN", on two addresses: `--allow '*.cdn.inet.test:80'` in the tests.
    "a.cdn.inet.test": ("203.0.113.7", "2001:db8:1::9"),
    "b.cdn.inet.test": ("198.51.100.9",),
}
_A, _AAAA = 1, 28
_NXDOMAIN, _REFUSED = 3, 5


def answer(query: bytes) -> bytes | None:
    """The server's answer to one query (None: not a query). Pure."""
    import dpkt

    try:
        msg = dpkt.dns.DNS(query)
    except (dpkt.UnpackError, ValueError, IndexError):
        return None
    if msg.qr != dpkt.dns.DNS_Q or len(msg.qd) != 1:
        return None
    question = msg.qd[0]
    name = str(question.name).lower().rstrip(".")
    msg.qr, msg.aa, msg.ra = dpkt.dns.DNS_R, 1, 0
    msg.an, msg.ns, msg.ar = [], [], []
    if name != ZONE_ORIGIN and not name.endswith("." + ZONE_ORIGIN):
        msg.rcode = _REFUSED
        return bytes(msg)
    if name not in ZONE:
        msg.rcode = _NXDOMAIN
        return bytes(msg)
    msg.rcode = 0
    for text in ZONE[name]:
        address = ipaddress.ip_address(text)
        rtype = _A if address.version == 4 else _AAAA
        if question.type == rtype:
            rr = dpkt.dns.DNS.RR(name=question.name, type=rtype, cls=1, ttl=60)
            rr.rdata = address.packed
            rr.rlen = len(rr.rdata)
            msg.an.append(rr)
    return bytes(msg)


def serve(lab_dir: Path, accept_log: Path) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((str(DNS_SERVER), 53))
    signal.signal(signal.SIGTERM, _stop)
    with accept_log.open("a") as log:
        atomic_write(lab_dir / LAB_DNS_PID, f"{os.getpid()}\n", mode=0o644)
        print(f"serving DNS for {ZONE_ORIGIN} on {DNS_SERVER}:53", flush=True)
        while True:
            try:
                query, peer = sock.recvfrom(4096)
            except InterruptedError:
                continue
            reply = answer(query)
            name = None
            with contextlib.suppress(Exception):
                import dpkt

                name = str(dpkt.dns.DNS(query).qd[0].name)
            entry = {
                "time": time.time(),
                "server": str(DNS_SERVER),
                "port": 53,
                "proto": "udp",
                "peer": peer[0],
                "peer_port": peer[1],
                "bytes": len(query),
                "name": name,
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, peer)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def ensure(lab_dir: Path, spawn: Callable[[], subprocess.Popen[bytes]]) -> None:
    """Start the server with `spawn` (which runs `serve` in the fake internet); wait until it
    serves."""
    pid_file = lab_dir / LAB_DNS_PID
    pid_file.unlink(missing_ok=True)
    proc = spawn()

    def ready() -> bool | None:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the fake internet's DNS server exited with status {proc.returncode}: "
                + (lab_dir / LAB_DNS_LOG).read_text(errors="replace")[-500:]
            )
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        return True if text == str(proc.pid) else None

    wait_for(ready, Deadline(20, "the fake internet's DNS server to listen"), interval=0.05)

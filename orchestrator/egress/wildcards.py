"""The sandbox's resolver for wildcard entries (`--allow '*.example.org:443'`, policy.Wildcard).

The names under a wildcard cannot be resolved at `up`, and a CDN's addresses change: they are
resolved when the guest asks, and what the answer says becomes allowed at that moment. The
network's dnsmasq sends the wildcard domains (and only those) to this process on the host's
loopback (`server=/DOMAIN/127.0.0.1#PORT`, domain.render_network); for each query it:

1. refuses a name that is not under a wildcard (dnsmasq forwards the domain itself too);
2. forwards the query to the upstream resolvers (the config's network.resolvers, else the
   host's), never anywhere the guest chose;
3. records each new (address, protocol, port) in the sandbox's logs (HANDED_OUT_FILE) before
   anything is allowed: the read-back of the guest's firewall tolerates exactly these rules;
4. appends them to the guest's SBX-WILD chain over SSH (pinned host key, the sandbox's client
   key), then to the host guard's sets (hostguard.py: the host-side layer, which guest root
   cannot touch);
5. only then returns the answer, so the guest never holds an address that is not yet allowed.

If step 4 fails the guest gets SERVFAIL, not an address it cannot reach. Addresses stay allowed
for the sandbox's life (not the answer's TTL), at most hostguard.WILD_MAX of them. The answers
come from the internet and the questions from the guest: both are parsed bounded (dpkt), and a
malformed message is dropped. UDP only: an answer too large for a datagram reaches the guest
truncated, as from any resolver that does not do TCP.

The process runs as root, detached (its own session), for the sandbox's life: it needs nft on
the host and the sandbox's SSH key.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import detached
from orchestrator.egress import firewall, hostguard
from orchestrator.egress.policy import Proto, Wildcard
from orchestrator.errors import SandboxError
from orchestrator.waits import Deadline

HANDED_OUT_FILE = "wildcards.jsonl"
ERRORS_FILE = "wildcards.log"
CONFIG_FILE = "wildcards.json"
_MODULE = "orchestrator.egress.wildcards"
_READY = "wildcard resolver ready"
# Where the guest keeps the rule files it loads: their names (a nonce each) are in the command
# line the guest's capture records, which is how a collection tells these loads from tampering.
GUEST_DIR = "/run/sandbox-wild"
UPSTREAM_SECONDS = 2.0
MAX_MESSAGE = 4096
MAX_ADDRESSES = 64  # per answer
PUSH_SECONDS = 20.0
_IDLE_SECONDS = 0.5  # how often the service looks up from its socket for `up`'s signal
_A, _AAAA = 1, 28
_REFUSED, _SERVFAIL = 5, 2


class WildcardError(SandboxError):
    """The wildcard resolver could not start or stop."""


@dataclass(frozen=True)
class Guest:
    """How the resolver reaches the guest (orchestrator.vm.guest.Endpoint's fields)."""

    host: str
    port: int
    user: str
    client_key: str
    host_key: str


@dataclass(frozen=True)
class Config:
    bridge: str
    wildcards: tuple[Wildcard, ...]
    upstream: tuple[str, ...]
    guest: Guest

    def to_json(self) -> str:
        return json.dumps(
            {
                "bridge": self.bridge,
                "wildcards": [
                    {"domain": w.domain, "proto": w.proto.value, "port": w.port}
                    for w in self.wildcards
                ],
                "upstream": list(self.upstream),
                "guest": vars(self.guest),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        return cls(
            bridge=str(data["bridge"]),
            wildcards=tuple(
                Wildcard(str(w["domain"]), Proto(w["proto"]), int(w["port"]))
                for w in data["wildcards"]
            ),
            upstream=tuple(str(ipaddress.ip_address(a)) for a in data["upstream"]),
            guest=Guest(**data["guest"]),
        )


@dataclass(frozen=True)
class HandedOut:
    """One address a wildcard's answer made allowed, on one protocol and port."""

    time: float
    name: str
    address: str
    proto: str
    port: int
    nonce: str  # of the guest-side load that added it

    @property
    def rule(self) -> str:
        return firewall.wildcard_rule(ipaddress.ip_address(self.address), self.proto, self.port)

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


def read_handed_out(logs: Path) -> list[HandedOut]:
    """What the resolver of the sandbox with these logs handed out (its own file: host side)."""
    try:
        text = (logs / HANDED_OUT_FILE).read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            found.append(
                HandedOut(
                    float(data["time"]),
                    str(data["name"]),
                    str(ipaddress.ip_address(data["address"])),
                    str(data["proto"]),
                    int(data["port"]),
                    str(data["nonce"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return found


def handed_out_rules(logs: Path) -> frozenset[str]:
    return frozenset(h.rule for h in read_handed_out(logs))


def load_command(nonce: str, version: int) -> str:
    """The command line of the guest-side load of one push (what the capture records)."""
    tool = "iptables-restore" if version == 4 else "ip6tables-restore"
    return f"{tool} -w --noflush {GUEST_DIR}/{nonce}.v{version}"


def own_loads(logs: Path) -> frozenset[str]:
    """The command lines of every guest-side load the resolver made (collection.py tells them
    from tampering by these; each nonce is used once)."""
    return frozenset(load_command(h.nonce, h.version) for h in read_handed_out(logs))


# ---- start and stop (the CLI's side) ------------------------------------------------------------


def bind() -> socket.socket:
    """The resolver's socket on the host's loopback (a free port), bound before the network is
    defined: its XML names the port, and dnsmasq's first queries wait in the socket's buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def start(sock: socket.socket, config: Config, logs: Path, *, timeout: float = 15.0) -> int:
    """Start the resolver detached on `sock` (closed here); its pid once it serves."""
    logs.mkdir(parents=True, exist_ok=True)
    config_path = logs / CONFIG_FILE
    config_path.write_text(config.to_json() + "\n")
    with sock:
        return detached.start(
            _MODULE,
            ["--fd", str(sock.fileno()), "--config", str(config_path), "--logs", str(logs)],
            pass_fds=(sock.fileno(),),
            errors_file=logs / ERRORS_FILE,
            ready=_READY,
            what="the wildcard resolver",
            error=WildcardError,
            timeout=timeout,
        )


def running(pid: int) -> bool:
    """Whether `pid` is a wildcard resolver (and not another process with a reused pid)."""
    return detached.runs_module(pid, _MODULE)


def guest_ready(pid: int) -> None:
    """Tell the resolver `pid` that the guest is up and its policy loaded (`up` is done): it logs
    in now, not at the first wildcard lookup."""
    if detached.runs_module(pid, _MODULE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)


def stop(pid: int, *, timeout: float = 5.0) -> bool:
    """Stop the resolver `pid`; False if it was gone already."""
    return detached.stop(pid, _MODULE, "the wildcard resolver", timeout=timeout)


# ---- the service --------------------------------------------------------------------------------


def reply_with(query: bytes, rcode: int) -> bytes:
    """An answer to `query` carrying only its header and question, with `rcode`. Pure."""
    import dpkt

    msg = dpkt.dns.DNS(query)
    msg.qr = dpkt.dns.DNS_R
    msg.rcode = rcode
    msg.an, msg.ns, msg.ar = [], [], []
    return bytes(msg)


def question(query: bytes) -> tuple[int, str, int] | None:
    """(id, name, type) of a one-question query; None if it is not one. Pure."""
    import dpkt

    try:
        msg = dpkt.dns.DNS(query)
    except (dpkt.UnpackError, ValueError, IndexError):
        return None
    if msg.qr != dpkt.dns.DNS_Q or len(msg.qd) != 1:
        return None
    return msg.id, str(msg.qd[0].name).lower().rstrip("."), int(msg.qd[0].type)


def answer_addresses(answer: bytes, query_id: int) -> list[str] | None:
    """The A and AAAA addresses of an upstream answer to query `query_id`, at most
    MAX_ADDRESSES; None if it is not such an answer. Pure."""
    import dpkt

    try:
        msg = dpkt.dns.DNS(answer)
    except (dpkt.UnpackError, ValueError, IndexError):
        return None
    if msg.qr != dpkt.dns.DNS_R or msg.id != query_id:
        return None
    found: list[str] = []
    for rr in msg.an:
        if rr.type == _A and len(rr.rdata) == 4:
            found.append(str(ipaddress.IPv4Address(rr.rdata)))
        elif rr.type == _AAAA and len(rr.rdata) == 16:
            found.append(str(ipaddress.IPv6Address(rr.rdata)))
    return sorted(set(found))[:MAX_ADDRESSES]


def restore_text(rules: Sequence[str]) -> str:
    """iptables-restore --noflush input appending `rules` to the filter table. Pure."""
    return "\n".join(["*filter", *rules, "COMMIT", ""])


class _Service:
    def __init__(self, sock: socket.socket, config: Config, logs: Path) -> None:
        self.sock = sock
        self.config = config
        self.logs = logs
        self.known = {(h.address, h.proto, h.port) for h in read_handed_out(logs)}
        self.guest: Any = None  # orchestrator.vm.guest.Guest, opened at the first push
        self.login_wanted = False  # `up` says the guest is ready (SIGUSR1): log in ahead

    def log(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    def serve(self) -> None:
        self.sock.settimeout(_IDLE_SECONDS)
        while True:
            if self.login_wanted:
                self.login_wanted = False
                self.log_in_ahead()
            try:
                query, peer = self.sock.recvfrom(MAX_MESSAGE)
            except (InterruptedError, TimeoutError):
                continue
            try:
                reply = self.handle(query)
            except Exception as error:  # one query's failure must not stop the resolver
                self.log(f"query failed: {type(error).__name__}: {error}")
                reply = reply_with(query, _SERVFAIL) if question(query) else None
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(reply, peer)

    def handle(self, query: bytes) -> bytes | None:
        asked = question(query)
        if asked is None:
            return None
        query_id, name, _ = asked
        matching = [w for w in self.config.wildcards if w.matches(name)]
        if not matching:
            return reply_with(query, _REFUSED)
        answer = self.forward(query, query_id)
        if answer is None:
            return reply_with(query, _SERVFAIL)
        addresses = answer_addresses(answer, query_id) or []
        new = sorted(
            {
                (address, proto, w.port)
                for address in addresses
                for w in matching
                for proto in w.protos
            }
            - self.known
        )
        if len(self.known) + len(new) > hostguard.WILD_MAX:
            self.log(f"{name}: more than {hostguard.WILD_MAX} addresses handed out; refused")
            return reply_with(query, _SERVFAIL)
        if new and not self.allow(name, new):
            return reply_with(query, _SERVFAIL)
        return answer

    def forward(self, query: bytes, query_id: int) -> bytes | None:
        for server in self.config.upstream:
            address = ipaddress.ip_address(server)
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            with socket.socket(family, socket.SOCK_DGRAM) as up:
                up.settimeout(UPSTREAM_SECONDS)
                try:
                    up.connect((server, 53))
                    up.send(query)
                    deadline = time.monotonic() + UPSTREAM_SECONDS
                    while time.monotonic() < deadline:
                        answer = up.recv(MAX_MESSAGE)
                        if answer_addresses(answer, query_id) is not None:
                            return answer
                except OSError as error:
                    self.log(f"upstream {server}: {error}")
        return None

    def allow(self, name: str, new: list[tuple[str, str, int]]) -> bool:
        nonce = secrets.token_hex(8)
        now = time.time()
        handed = [HandedOut(now, name, a, proto, port, nonce) for a, proto, port in new]
        # Recorded first: a read-back in between sees a rule that is on record.
        with (self.logs / HANDED_OUT_FILE).open("a") as out:
            for h in handed:
                out.write(json.dumps(vars(h)) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            self.push_guest(nonce, handed)
        except SandboxError as error:
            self.log(f"{name}: the guest's rules could not be added: {error}")
            self.guest = None
            return False
        hostguard.add_handed_out(self.config.bridge, new)
        self.known.update(new)
        self.log(f"{name}: allowed {', '.join(f'{a} {p}/{n}' for a, p, n in new)}")
        return True

    def log_in_ahead(self) -> None:
        """The guest's first wildcard answer would otherwise wait for this login (~1 s under
        TCG): made once `up` is done, before the software runs, never during the boot."""
        if self.guest is not None:
            return
        try:
            self.connect_guest()
        except SandboxError as error:
            self.log(f"logging in to the guest ahead failed (the first push will retry): {error}")

    def connect_guest(self) -> None:
        from orchestrator.vm.guest import Endpoint
        from orchestrator.vm.guest import Guest as GuestSession

        g = self.config.guest
        endpoint = Endpoint(g.host, g.port, g.user, Path(g.client_key), g.host_key)
        self.guest = GuestSession.connect(
            endpoint, Deadline(PUSH_SECONDS, f"SSH to the guest at {endpoint}")
        )

    def push_guest(self, nonce: str, handed: list[HandedOut]) -> None:
        # The rules in the script itself (made of parsed addresses and numbers only): the load's
        # file name, with the nonce, is what the guest's capture records as its command line.
        script = [f"umask 077; mkdir -p {GUEST_DIR}"]
        for version in (4, 6):
            rules = [h.rule for h in handed if h.version == version]
            if not rules:
                continue
            path = f"{GUEST_DIR}/{nonce}.v{version}"
            script.append(f"printf %s {shlex.quote(restore_text(rules))} > {path}")
            script.append(f"{load_command(nonce, version)}; status=$?; rm -f {path}")
            script.append('[ "$status" = 0 ] || exit "$status"')
        for attempt in (1, 2):
            if self.guest is None:
                self.connect_guest()
            try:
                self.guest.check(["sh", "-c", "\n".join(script)], timeout=PUSH_SECONDS)
                return
            except SandboxError:
                self.guest = None
                if attempt == 2:
                    raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_MODULE)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    config = Config.from_json(args.config.read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = _Service(sock, config, args.logs)

    def want_login(signum: int, frame: object) -> None:
        service.login_wanted = True

    signal.signal(signal.SIGUSR1, want_login)
    service.log(_READY)
    service.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

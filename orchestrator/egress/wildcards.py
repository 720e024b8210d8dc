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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import detached
from orchestrator.egress import firewall, hostguard, remoterelay
from orchestrator.egress.policy import Proto, Wildcard
from orchestrator.errors import SandboxError
from orchestrator.waits import Deadline

if TYPE_CHECKING:
    import paramiko

    from orchestrator.vm.guest import SocketOpener
    from orchestrator.vm.hostfiles import HostFiles

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
# A remote host's relay: the first attach (`up` waits for it), and how soon a lost one is
# tried again.
ATTACH_SECONDS = 20.0
_REATTACH_SECONDS = 2.0
_RECV_BYTES = 65536
_MESSAGE_MAX = 2000
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
class Remote:
    """A remote libvirt host's relay (remoterelay.py) that the queries come through: the
    hypervisor URI (how to log in to the host) and the sandbox's directory there."""

    uri: str
    where: str


@dataclass(frozen=True)
class Config:
    bridge: str
    wildcards: tuple[Wildcard, ...]
    upstream: tuple[str, ...]
    guest: Guest
    remote: Remote | None = None

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
                "remote": None if self.remote is None else vars(self.remote),
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
            remote=None if data.get("remote") is None else Remote(**data["remote"]),
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


def start(sock: socket.socket | None, config: Config, logs: Path, *, timeout: float = 15.0) -> int:
    """Start the resolver detached, its pid once it serves: on `sock` (closed here) for a
    network on this machine; for a remote host's (config.remote, sock None), once it is
    attached to the relay there."""
    logs.mkdir(parents=True, exist_ok=True)
    config_path = logs / CONFIG_FILE
    config_path.write_text(config.to_json() + "\n")
    args = ["--config", str(config_path), "--logs", str(logs)]
    fds: tuple[int, ...] = ()
    if sock is not None:
        args += ["--fd", str(sock.fileno())]
        fds = (sock.fileno(),)
    else:
        timeout = max(timeout, ATTACH_SECONDS + 5)  # it attaches before it says it serves
    try:
        return detached.start(
            _MODULE,
            args,
            pass_fds=fds,
            errors_file=logs / ERRORS_FILE,
            ready=_READY,
            what="the wildcard resolver",
            error=WildcardError,
            timeout=timeout,
        )
    finally:
        if sock is not None:
            sock.close()


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


class _Loopback:
    """The queries of dnsmasq on this machine: datagrams on the resolver's own socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(_IDLE_SECONDS)

    def receive(self) -> tuple[bytes, object] | None:
        try:
            return self.sock.recvfrom(MAX_MESSAGE)
        except (InterruptedError, TimeoutError):
            return None

    def send(self, reply: bytes, peer: object) -> None:
        assert isinstance(peer, tuple)
        with contextlib.suppress(OSError):
            self.sock.sendto(reply, peer)

    def host(self) -> HostFiles | None:
        return None

    def opener(self) -> SocketOpener | None:
        return None

    def close(self) -> None:
        self.sock.close()


class _Relayed:
    """The queries of dnsmasq on a remote libvirt host: framed by the relay there
    (remoterelay.py), over an exec channel of one SSH connection to that host (jump.py: the
    user's own login, its known_hosts). The same connection reaches the guest (direct-tcpip)
    and runs nft there. A lost connection is made again: meanwhile the relay drops the
    queries (dnsmasq gets no answer: nothing is allowed)."""

    def __init__(self, remote: Remote) -> None:
        from orchestrator.vm.hostfiles import RemoteFiles
        from orchestrator.vm.jump import Jump, jump_host

        host = jump_host(remote.uri)
        if host is None:
            raise WildcardError(
                f"{remote.uri} is not a remote libvirt host", "start the sandbox again"
            )
        self.remote = remote
        self.jump = Jump(host)
        self.files = RemoteFiles(self.jump)
        self.channel: paramiko.Channel | None = None
        self.decoder = remoterelay.Decoder()
        self.frames: deque[tuple[int, bytes]] = deque()
        self.retry_at = 0.0

    def attach(self) -> None:
        """Attach to the relay (its `attach` mode, run on the host over this connection)."""
        self.detach()
        channel = self.jump.start(remoterelay.attach_argv(self.remote.where), ATTACH_SECONDS)
        self.decoder = remoterelay.Decoder()
        self.channel = channel

    def detach(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.frames.clear()

    def _reattach(self) -> bool:
        now = time.monotonic()
        if now < self.retry_at:
            time.sleep(_IDLE_SECONDS)
            return False
        try:
            self.attach()
        except (SandboxError, OSError) as error:
            self.retry_at = now + _REATTACH_SECONDS
            log(f"attaching to the relay on the libvirt host failed (retrying): {error}")
            return False
        log("attached to the relay on the libvirt host")
        return True

    def receive(self) -> tuple[bytes, object] | None:
        if self.frames:
            tag, query = self.frames.popleft()
            return query, tag
        if self.channel is None and not self._reattach():
            return None
        channel = self.channel
        assert channel is not None
        channel.settimeout(_IDLE_SECONDS)
        try:
            data = channel.recv(_RECV_BYTES)
        except TimeoutError:
            return None
        except (OSError, EOFError) as error:
            log(f"the relay's channel failed: {error}")
            self.detach()
            return None
        if not data:
            said = b""
            with contextlib.suppress(OSError, EOFError):
                if channel.recv_stderr_ready():
                    said = channel.recv_stderr(_MESSAGE_MAX)
            log(
                "the relay's channel ended"
                + (f": {said.decode('utf-8', 'replace').strip()!r}" if said else "")
            )
            self.detach()
            return None
        try:
            self.frames.extend(self.decoder.feed(data))
        except SandboxError as error:
            log(f"the relay sent a malformed frame: {error}")
            self.detach()
        return None

    def send(self, reply: bytes, tag: object) -> None:
        assert isinstance(tag, int)
        if self.channel is None:
            return
        try:
            self.channel.sendall(remoterelay.encode(tag, reply))
        except (OSError, EOFError) as error:
            log(f"the relay's channel failed: {error}")
            self.detach()

    def host(self) -> HostFiles | None:
        return self.files

    def opener(self) -> SocketOpener | None:
        return self.jump.open

    def close(self) -> None:
        self.detach()
        self.files.close()
        self.jump.close()


class _Service:
    def __init__(self, queries: _Loopback | _Relayed, config: Config, logs: Path) -> None:
        self.queries = queries
        self.config = config
        self.logs = logs
        self.known = {(h.address, h.proto, h.port) for h in read_handed_out(logs)}
        self.guest: Any = None  # orchestrator.vm.guest.Guest, opened at the first push
        self.login_wanted = False  # `up` says the guest is ready (SIGUSR1): log in ahead

    def serve(self) -> None:
        while True:
            if self.login_wanted:
                self.login_wanted = False
                self.log_in_ahead()
            received = self.queries.receive()
            if received is None:
                continue
            query, peer = received
            try:
                reply = self.handle(query)
            except Exception as error:  # one query's failure must not stop the resolver
                log(f"query failed: {type(error).__name__}: {error}")
                reply = reply_with(query, _SERVFAIL) if question(query) else None
            if reply is not None:
                self.queries.send(reply, peer)

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
            log(f"{name}: more than {hostguard.WILD_MAX} addresses handed out; refused")
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
                    log(f"upstream {server}: {error}")
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
            log(f"{name}: the guest's rules could not be added: {error}")
            self.guest = None
            return False
        hostguard.add_handed_out(self.config.bridge, new, host=self.queries.host())
        self.known.update(new)
        log(f"{name}: allowed {', '.join(f'{a} {p}/{n}' for a, p, n in new)}")
        return True

    def log_in_ahead(self) -> None:
        """The guest's first wildcard answer would otherwise wait for this login (~1 s under
        TCG): made once `up` is done, before the software runs, never during the boot."""
        if self.guest is not None:
            return
        try:
            self.connect_guest()
        except SandboxError as error:
            log(f"logging in to the guest ahead failed (the first push will retry): {error}")

    def connect_guest(self) -> None:
        from orchestrator.vm.guest import Endpoint, tcp_connect
        from orchestrator.vm.guest import Guest as GuestSession

        g = self.config.guest
        endpoint = Endpoint(g.host, g.port, g.user, Path(g.client_key), g.host_key)
        self.guest = GuestSession.connect(
            endpoint,
            Deadline(PUSH_SECONDS, f"SSH to the guest at {endpoint}"),
            opener=self.queries.opener() or tcp_connect,
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


def log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_MODULE)
    parser.add_argument("--fd", type=int)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    args = parser.parse_args(argv)
    config = Config.from_json(args.config.read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queries: _Loopback | _Relayed
    if config.remote is not None:
        queries = _Relayed(config.remote)
        try:
            queries.attach()  # `up` fails now, with the reason, if the relay cannot be reached
        except (SandboxError, OSError) as error:
            log(f"cannot attach to the relay on the libvirt host: {error}")
            return 1
    elif args.fd is not None:
        queries = _Loopback(socket.socket(fileno=args.fd))
    else:
        parser.error("--fd is needed for a network on this machine")
    service = _Service(queries, config, args.logs)

    def want_login(signum: int, frame: object) -> None:
        service.login_wanted = True

    signal.signal(signal.SIGUSR1, want_login)
    log(_READY)
    try:
        service.serve()
    finally:
        queries.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

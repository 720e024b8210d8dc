"""Reaching guests on a remote libvirt host: the host itself as an SSH jump.

A guest's network exists only on the machine libvirtd runs on. With a remote hypervisor URI
(`qemu+ssh://user@host/system`) this machine has no route to it, but the user can already log
in to that host over SSH: every connection to a guest becomes a `direct-tcpip` channel of ONE
SSH connection to the host, made as the user's own `ssh user@host` would make it (the URI's
user, port and keyfile, then ~/.ssh/config) and trusting only the host keys the user's
known_hosts files hold (RejectPolicy: never trust on first use).

The guest's own host key stays pinned end to end: the jump only carries the bytes.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import paramiko

from orchestrator.errors import GuestError, HostKeyMismatchError, UsageError
from orchestrator.vm.guest import (
    SocketOpener,
    UnreachableVia,
    fingerprint,
    quiet_paramiko,
    tcp_connect,
)
from orchestrator.vm.remoteuri import SSH_PORT, JumpTarget, jump_target

# What OpenSSH reads when ~/.ssh/config names no UserKnownHostsFile / GlobalKnownHostsFile.
_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_SSH_CONFIG = "~/.ssh/config"
# The jump connection lives as long as the guest sessions through it; keepalives notice a
# host that went away (the guest session has its own).
_KEEPALIVE_SECONDS = 15
_LOGIN_TIMEOUT = 20.0
# RFC 4254: the reason code of a channel the server will not open by its own rules.
_PROHIBITED = 1


@dataclass(frozen=True)
class JumpHost:
    """How to log in to the libvirt host: the URI's values completed by the user's SSH config."""

    name: str  # as the URI names it (what messages show and `ssh` is given)
    hostname: str  # where to connect (HostName)
    port: int
    user: str
    identity_files: tuple[Path, ...]  # the URI's keyfile first, then IdentityFile
    keyfile: Path | None  # the URI's
    identities_only: bool
    known_hosts: tuple[Path, ...]
    host_key_alias: str | None = None
    proxy_command: str | None = None

    def __str__(self) -> str:
        where = self.name if self.port == SSH_PORT else f"{self.name}:{self.port}"
        return f"{self.user}@{where}"

    def ssh_command(self) -> str:
        """The command that logs in as the jump does: what the user runs to check or trust it."""
        argv = ["ssh"]
        if self.port != SSH_PORT:
            argv += ["-p", str(self.port)]
        if self.keyfile is not None:
            argv += ["-i", str(self.keyfile)]
        argv += [f"{self.user}@{self.name}"]
        return shlex.join(argv)

    def key_name(self) -> str:
        """The name the host's key is filed under in known_hosts, as OpenSSH looks it up."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == SSH_PORT else f"[{self.hostname}]:{self.port}"


def _words(value: object) -> list[str]:
    # paramiko keeps IdentityFile as a list, every other option as one string.
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split() if value is not None else []


def _hop(spec: str) -> tuple[str, str | None]:
    """A ProxyJump hop `[user@]host[:port]` (or `ssh://...`) as ssh's destination and port."""
    spec = spec.strip().removeprefix("ssh://")
    user, at, rest = spec.rpartition("@")
    host, port = rest, None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":") or None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    return f"{user}{at}{host}", port


def resolve(target: JumpTarget, config: paramiko.SSHConfig, *, local_user: str) -> JumpHost:
    """Complete the URI's values with the SSH config's, as `ssh` does (pure: no file is read)."""
    options: dict[str, Any] = dict(config.lookup(target.host))
    try:
        config_port = int(options["port"]) if "port" in options else SSH_PORT
    except ValueError:
        raise UsageError(
            f"~/.ssh/config gives {target.host} a bad Port: {options['port']!r}",
            "fix the Port line in ~/.ssh/config",
        ) from None
    identities = [target.keyfile] if target.keyfile is not None else []
    identities += [Path(os.path.expanduser(p)) for p in _words(options.get("identityfile"))]
    user_files = _words(options.get("userknownhostsfile")) or list(_USER_KNOWN_HOSTS)
    global_files = _words(options.get("globalknownhostsfile")) or list(_GLOBAL_KNOWN_HOSTS)
    known = [
        Path(os.path.expanduser(p))
        for p in (*user_files, *global_files)
        if p.lower() != "none" and p != "/dev/null"
    ]
    proxy = options.get("proxycommand")
    jump = options.get("proxyjump")
    port = target.port or config_port
    hostname = str(options.get("hostname") or target.host)
    if jump and str(jump).lower() != "none" and not proxy:
        # What OpenSSH itself runs for ProxyJump: the last hop carries the stream, the earlier
        # ones are its own jumps.
        *earlier, last = str(jump).split(",")
        last_host, last_port = _hop(last)
        argv = ["ssh", *(["-J", ",".join(earlier)] if earlier else [])]
        argv += [*(["-p", last_port] if last_port else []), "-W", f"[{hostname}]:{port}"]
        proxy = shlex.join([*argv, "--", last_host])
    return JumpHost(
        name=target.host,
        hostname=hostname,
        port=port,
        user=target.user or str(options.get("user") or local_user),
        identity_files=tuple(identities),
        keyfile=target.keyfile,
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        known_hosts=tuple(known),
        host_key_alias=str(options["hostkeyalias"]) if options.get("hostkeyalias") else None,
        proxy_command=str(proxy) if proxy else None,
    )


def load_ssh_config(path: Path | None = None) -> paramiko.SSHConfig:
    """The user's ~/.ssh/config (an empty one when there is none)."""
    path = path or Path(os.path.expanduser(_SSH_CONFIG))
    try:
        return paramiko.SSHConfig.from_path(path)
    except FileNotFoundError:
        return paramiko.SSHConfig()
    except (OSError, ValueError, paramiko.SSHException) as e:
        raise UsageError(
            f"cannot read the SSH config {path}: {e}",
            "sandbox reads it to reach a remote libvirt host as `ssh` would; fix it",
        ) from None


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(f"{name} is not in known_hosts")
        self.key = key


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that says which key it refused, for the message."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHostKey(hostname, key)


class _JumpTransport(paramiko.Transport):
    """A Transport that keeps the reason text of a refused channel: paramiko logs it and raises
    only the generic reason code ("Connect failed"), and the text is what tells "no route" from
    "refused" from "not up yet"."""

    last_refusal = ""

    def _parse_channel_open_failure(self, m: paramiko.Message) -> None:
        m.get_int()  # channel id
        m.get_int()  # reason code (the exception keeps it)
        self.last_refusal = m.get_text()
        m.rewind()
        super()._parse_channel_open_failure(m)  # type: ignore[misc]


def _key_text(key: paramiko.PKey) -> str:
    return fingerprint(f"{key.get_name()} {key.get_base64()}")


class Jump:
    """One SSH connection to the libvirt host, made on first use and kept; its `open` is a
    SocketOpener whose connections are channels of it. Use as a context manager: leaving it
    closes the connection (and so every guest session through it)."""

    def __init__(self, host: JumpHost) -> None:
        self.host = host
        self._client: paramiko.SSHClient | None = None
        self._transport: _JumpTransport | None = None
        # One open at a time: the refusal text is read back from the transport after it.
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = self._transport = None

    def open(self, host: str, port: int, timeout: float) -> paramiko.Channel:
        with self._lock:
            transport = self._connected(timeout)
            try:
                return transport.open_channel(
                    "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout
                )
            except paramiko.ChannelException as e:
                raise self._refused(e.code, transport.last_refusal, host, port) from None
            except (EOFError, paramiko.SSHException) as e:
                if transport.is_active():
                    raise TimeoutError(
                        f"the libvirt host {self.host} did not connect to {host}:{port} "
                        f"within {timeout:g} s"
                    ) from None
                # The connection to the host dropped: the next attempt makes a new one.
                self._client = self._transport = None
                raise ConnectionResetError(
                    errno.ECONNRESET,
                    f"the SSH connection to the libvirt host {self.host} ended: {e}",
                ) from None

    def _session(self, timeout: float) -> paramiko.Channel:
        """A new session channel of this connection (made first if need be)."""
        with self._lock:
            transport = self._connected(timeout)
            try:
                return transport.open_session(timeout=timeout)
            except (EOFError, paramiko.SSHException) as e:
                self._client = self._transport = None
                raise ConnectionResetError(
                    errno.ECONNRESET, f"the libvirt host {self.host} refused a session: {e}"
                ) from None

    def run(
        self, argv: Sequence[str], stdin: str | None, timeout: float, limit: int
    ) -> tuple[int, str, str]:
        """`argv` on the libvirt host over this connection (an exec channel, as the login user):
        its exit status and at most `limit` bytes of each output stream (the ends kept). 127
        when the shell did not find the program."""
        channel = self._session(timeout)
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        with channel:
            channel.settimeout(timeout)
            channel.exec_command(shlex.join(argv))
            if stdin is not None:
                channel.sendall(stdin.encode())
            channel.shutdown_write()
            while not (channel.exit_status_ready() and not channel.recv_ready()
                       and not channel.recv_stderr_ready()):  # fmt: skip
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{shlex.join(argv)} did not finish within {timeout:g} s on the libvirt "
                        f"host {self.host}"
                    )
                if channel.recv_ready():
                    out += channel.recv(65536)
                    del out[:-limit]
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                    del err[:-limit]
                else:
                    time.sleep(0.005)
            status = channel.recv_exit_status()
        return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def start(self, argv: Sequence[str], timeout: float) -> paramiko.Channel:
        """`argv` started on the libvirt host over this connection and left running: its exec
        channel, which the caller reads, writes and closes (its stdin and stdout; the wildcard
        resolver's relay, egress/wildcards.py). Ends with the channel or this connection."""
        channel = self._session(timeout)
        try:
            channel.settimeout(timeout)
            channel.exec_command(shlex.join(argv))
        except (OSError, EOFError, paramiko.SSHException) as e:
            channel.close()
            raise ConnectionResetError(
                errno.ECONNRESET, f"the libvirt host {self.host} did not start {argv[0]}: {e}"
            ) from None
        return channel

    def sftp(self, timeout: float) -> paramiko.SFTPClient:
        """An SFTP session on this same connection, for the files on the libvirt host
        (vm/hostfiles.py): one login serves the guests' channels and the host's files. Every
        request of the session waits at most `timeout` seconds."""
        with self._lock:
            transport = self._connected(timeout)
            try:
                client = paramiko.SFTPClient.from_transport(transport)
            except (EOFError, paramiko.SSHException) as e:
                client = None
                reason = f": {e}"
            else:
                reason = ""
            if client is None:
                raise GuestError(
                    f"the libvirt host {self.host} refused an SFTP session{reason}",
                    f"sandbox reads files on {self.host.name} over SFTP: its sshd_config needs "
                    "a `Subsystem sftp` line (Debian's has one)",
                )
            client.get_channel().settimeout(timeout)  # type: ignore[union-attr]
            return client

    def _refused(self, code: int, text: str, host: str, port: int) -> OSError:
        """The host's refusal to connect to the guest, as the socket error a direct connection
        would have raised: wait_for_banner and Guest.connect retry these as they retry their own
        (a guest whose sshd is not up yet), and give up early on "no route"."""
        via = f"the libvirt host {self.host}"
        if code == _PROHIBITED:
            raise GuestError(
                f"{via} refused to forward connections to the guest at {host}:{port}: {text}",
                f"its sshd must allow TCP forwarding to {self.host.user} (AllowTcpForwarding "
                "yes, the default, and no PermitOpen that leaves the guests' network out)",
            )
        detail = f"{text or 'connect failed'} (from {via})"
        lowered = text.lower()
        # OpenSSH sends the errno's text only for a connect() that failed after it started; one
        # that fails at once (no route from the host: ENETUNREACH, or a local firewall's EPERM)
        # comes back as a bare "open failed", and no later attempt can succeed.
        if lowered.strip() in ("open failed", "network is unreachable"):
            return UnreachableVia(
                f"{via} cannot open a connection to {host}:{port} ({text})",
                via=via,
                hint=(
                    f"libvirtd on {self.host.name} keeps its guests' networks in a place its sshd "
                    "cannot reach (another network namespace?): sandbox reaches guests through "
                    "that sshd, so it must run where libvirtd's networks are"
                ),
            )
        if "refused" in lowered:
            return ConnectionRefusedError(errno.ECONNREFUSED, detail)
        if "timed out" in lowered:
            return TimeoutError(errno.ETIMEDOUT, detail)
        if "no route" in lowered:
            return OSError(errno.EHOSTUNREACH, detail)
        return OSError(errno.ECONNABORTED, detail)

    def _connected(self, timeout: float) -> _JumpTransport:
        transport = self._transport
        if transport is not None and transport.is_active():
            return transport
        if self._client is not None:
            self._client.close()
        self._client, self._transport = self._log_in(max(timeout, _LOGIN_TIMEOUT))
        return self._transport

    def _sock(self, timeout: float) -> socket.socket | paramiko.ProxyCommand:
        host = self.host
        if host.proxy_command:
            try:
                return paramiko.ProxyCommand(host.proxy_command)
            except (OSError, paramiko.SSHException) as e:
                raise GuestError(
                    f"the ProxyCommand for {host.name} in ~/.ssh/config failed: {e}",
                    f"check that `{host.ssh_command()} true` works from this machine",
                ) from None
        try:
            return socket.create_connection((host.hostname, host.port), timeout=timeout)
        except OSError as e:
            raise GuestError(
                f"cannot reach the libvirt host {host} over SSH ({host.hostname} port "
                f"{host.port}): {e.strerror or e}",
                f"sandbox reaches the guests of a remote libvirt host through SSH to it: check "
                f"that `{host.ssh_command()} true` works from this machine",
            ) from None

    def _log_in(self, timeout: float) -> tuple[paramiko.SSHClient, _JumpTransport]:
        host = self.host
        quiet_paramiko()
        client = paramiko.SSHClient()
        files = [str(p) for p in host.known_hosts if p.is_file()]
        for path in files:
            try:
                client.get_host_keys().load(path)
            except (OSError, paramiko.SSHException) as e:
                raise GuestError(
                    f"cannot read the known hosts file {path}: {e}",
                    "sandbox trusts the libvirt host's key only from your known_hosts files",
                ) from None
        client.set_missing_host_key_policy(_RejectUnknown())
        keys = _usable_keys(host)
        sock = self._sock(timeout)
        made: list[_JumpTransport] = []

        def factory(sock: Any, **options: Any) -> paramiko.Transport:
            made.append(_JumpTransport(sock, **options))
            return made[-1]

        # Under HostKeyAlias the key is filed under the alias alone, without the port.
        key_name = host.host_key_alias or host.hostname
        try:
            client.connect(
                key_name,
                port=SSH_PORT if host.host_key_alias else host.port,
                username=host.user,
                key_filename=keys,  # type: ignore[arg-type]  # paramiko takes a list too
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                allow_agent=True,
                look_for_keys=not host.identities_only,
                transport_factory=factory,
            )
        except BaseException as e:
            client.close()
            sock.close()
            raise self._login_error(e, files) from None
        assert made
        made[-1].set_keepalive(_KEEPALIVE_SECONDS)
        return client, made[-1]

    def _login_error(self, e: BaseException, files: list[str]) -> BaseException:
        host = self.host
        where = " or ".join(files) if files else "any known_hosts file (there is none)"
        if isinstance(e, _UnknownHostKey):
            return GuestError(
                f"the SSH host key of the libvirt host {host} ({e.key.get_name()} "
                f"{_key_text(e.key)}) is not in {where}: refused",
                f"check that fingerprint and trust the host once with `{host.ssh_command()}` "
                "(it asks, then records the key in ~/.ssh/known_hosts); sandbox never trusts a "
                "host key on first use",
            )
        if isinstance(e, paramiko.BadHostKeyException):
            return HostKeyMismatchError(
                f"the SSH host key of the libvirt host {host} changed: {where} holds "
                f"{_key_text(e.expected_key)}, it presented {_key_text(e.key)}",
                "if the host was reinstalled, remove the old key with `ssh-keygen -R "
                f"{host.key_name()}` and connect once with `{host.ssh_command()}`; if not, "
                "someone may be intercepting the connection",
            )
        if isinstance(e, paramiko.AuthenticationException):
            return GuestError(
                f"the libvirt host {host} refused SSH login as {host.user}: {e}",
                "sandbox logs in with the URI's ?keyfile=, the IdentityFile of ~/.ssh/config, "
                f"the ssh-agent's keys or ~/.ssh/id_*: check that `{host.ssh_command()} true` "
                "works without a password (a passphrase-protected key must be in the agent)",
            )
        if isinstance(e, OSError | EOFError | paramiko.SSHException):
            return GuestError(
                f"SSH to the libvirt host {host} failed: {type(e).__name__}: {e}",
                f"check that `{host.ssh_command()} true` works from this machine",
            )
        return e


def _usable_keys(host: JumpHost) -> list[str]:
    """The identity files to offer, in order. The URI's keyfile must exist; the config's are
    skipped when missing, as `ssh` skips them."""
    if host.keyfile is not None and not host.keyfile.is_file():
        raise UsageError(
            f"the keyfile {host.keyfile} of the hypervisor URI does not exist",
            "fix ?keyfile= in --connect",
        )
    return [str(path) for path in host.identity_files if path.is_file()]


def opener_for(host: JumpHost | None) -> contextlib.AbstractContextManager[SocketOpener]:
    if host is None:
        return contextlib.nullcontext(tcp_connect)
    return _jump_opener(host)


@contextlib.contextmanager
def _jump_opener(host: JumpHost) -> Iterator[SocketOpener]:
    with Jump(host) as jump:
        yield jump.open


def jump_host(uri: str) -> JumpHost | None:
    """How to log in to the host of the hypervisor at `uri` (None: it runs on this machine)."""
    target = jump_target(uri)
    if target is None:
        return None
    return resolve(target, load_ssh_config(), local_user=getpass.getuser())


def guest_route(uri: str) -> contextlib.AbstractContextManager[SocketOpener]:
    """How this process reaches the guests of the hypervisor at `uri`: plain TCP for a local
    one, else channels of one SSH connection to its host (closed when the block ends)."""
    return opener_for(jump_host(uri))

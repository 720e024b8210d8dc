"""The libvirt host named by a remote hypervisor URI, as SSH reaches it (pure; no paramiko, so
that `sandbox ssh` does not pay for importing it)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from orchestrator.errors import UsageError

SSH_PORT = 22
# libvirt's transports that are SSH themselves: their user, port and keyfile are SSH's.
_SSH_TRANSPORTS = frozenset({"ssh", "libssh2", "libssh"})


@dataclass(frozen=True)
class JumpTarget:
    """The libvirt host as the URI names it. Values the URI gives win over ~/.ssh/config, as
    they do for libvirt, which passes them to ssh on its command line."""

    host: str
    user: str | None = None
    port: int | None = None
    keyfile: Path | None = None


def jump_target(uri: str) -> JumpTarget | None:
    """Where to jump for the hypervisor at `uri`: None for a local one (no host part).

    The SSH transports give user, port and `?keyfile=`; any other remote transport (tcp, tls)
    names only the host: its user and port are libvirt's, not SSH's, so SSH to that host name
    takes everything else from ~/.ssh/config."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return None
    host = parts.hostname
    # A name starting with "-" would be an option to the `ssh` of `sandbox ssh`.
    if not host or host.startswith("-") or (parts.username or "").startswith("-"):
        raise UsageError(
            f"the hypervisor URI {uri!r} names no host (or one starting with '-')",
            "write it as qemu+ssh://user@host/system",
        )
    _driver, _, transport = parts.scheme.partition("+")
    if transport not in _SSH_TRANSPORTS:
        return JumpTarget(host)
    try:
        port = parts.port
    except ValueError as e:
        raise UsageError(
            f"the hypervisor URI {uri!r} has a bad port: {e}",
            "write it as qemu+ssh://user@host:port/system",
        ) from None
    keyfiles = parse_qs(parts.query).get("keyfile")
    keyfile = Path(keyfiles[-1]).expanduser() if keyfiles else None
    return JumpTarget(host, user=parts.username or None, port=port, keyfile=keyfile)


def over_ssh(uri: str) -> bool:
    """Whether libvirt reaches the host at `uri` over SSH itself (qemu+ssh, +libssh, +libssh2):
    then the user can log in to that host, and sandbox reads its files that way (hostfiles.py).
    False for a local URI and for tcp/tls, whose user is libvirt's, not a login."""
    parts = urlsplit(uri)
    return bool(parts.netloc) and parts.scheme.partition("+")[2] in _SSH_TRANSPORTS


def proxy_command(uri: str) -> str | None:
    """For OpenSSH (`sandbox ssh`): a ProxyCommand that reaches a guest of the hypervisor at
    `uri` through its host, with the user's own SSH config for that hop; None when local."""
    target = jump_target(uri)
    if target is None:
        return None
    argv = ["ssh", "-o", "StrictHostKeyChecking=yes", "-W", "[%h]:%p"]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.keyfile is not None:
        argv += ["-i", str(target.keyfile)]
    argv += [f"{target.user}@{target.host}" if target.user else target.host]
    # ssh expands %-tokens in ProxyCommand before its shell runs it: only ours may be tokens.
    return " ".join(
        word if word == "[%h]:%p" else shlex.quote(word).replace("%", "%%") for word in argv
    )

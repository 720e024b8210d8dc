"""Per-sandbox state on disk: one directory per sandbox, a lock, JSON written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from orchestrator import jsontext, paths
from orchestrator.errors import SandboxError, UsageError
from orchestrator.files import atomic_write, file_lock
from orchestrator.run.xdebug import XdebugMode
from orchestrator.vm.domain import Accel

# The global lock covers uploading a base image (once per image version, seconds) and creating a
# VM; several `up`s queue behind each other.
GLOBAL_LOCK_TIMEOUT = 600.0
# fullmatch, not match with `$`: `$` also matches before a trailing newline ("web\n").
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")


def validate_name(name: str) -> str:
    # Names end up in libvirt domain, volume and file names: keep them short and plain.
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid sandbox name {name!r}",
            "use 1-31 characters: lowercase letters, digits and '-', starting with a letter",
        )
    return name


class Phase(Enum):
    CREATING = "creating"
    READY = "ready"
    DESTROYING = "destroying"


@dataclass(frozen=True)
class SandboxState:
    name: str
    phase: Phase
    created: str
    uri: str
    domain: str
    pool: str
    network: str
    volumes: tuple[str, ...]
    image: str
    image_hash: str
    accel: Accel
    mac: str
    user: str = "root"
    ip: str | None = None
    # The sandbox's own network's subnets, as created (None: a sandbox from before networks were
    # per sandbox, on the shared network of that time).
    subnet: str | None = None
    subnet6: str | None = None
    ssh_port: int = 22
    host_key: str = ""
    # The effective EgressPolicy (policy.EgressPolicy.to_dict()), as enforced in both layers:
    # the one record of it (`allow` is derived).
    policy: dict[str, Any] = field(default_factory=dict)
    # The guest's filter tables as `up` loaded them ("4"/"6" -> iptables-save text): what every
    # later check compares the guest with, not a new rendering of `policy` by today's code.
    guest_rules: dict[str, str] = field(default_factory=dict)
    boot_seconds: float | None = None
    # The warm VM this sandbox took (lifecycle/warm.py), or None: booted cold for it.
    warm_id: str | None = None
    # tcpdump on the host side of the guest's interface (`up --pcap`), stopped by destroy.
    pcap_pid: int | None = None
    # tcpdump keeping the host-side flow record (hostflows.py).
    flows_pid: int | None = None
    # On a remote libvirt host (capture/remotecapture.py): the directory there holding the flow
    # record's and --pcap's rings, and their tcpdumps' pids there (not this machine's).
    remote_dir: str | None = None
    remote_flows_pid: int | None = None
    remote_pcap_pid: int | None = None
    # Sinkhole mode there (egress/remotesinkhole.py): the sinkhole's pid on that host, in the
    # same directory.
    remote_sinkhole_pid: int | None = None
    # The sinkhole (egress/sinkhole.py) of a sandbox in sinkhole mode.
    sinkhole_pid: int | None = None
    # The resolver of wildcard entries (egress/wildcards.py), when the policy has any.
    wildcard_pid: int | None = None
    # The xdebug mode `sandbox run` uses unless told otherwise (xdebug.XdebugMode value).
    xdebug: XdebugMode = XdebugMode.TRACE

    @property
    def allow(self) -> tuple[str, ...]:
        """The allowed destinations, as `status` shows them."""
        from orchestrator.egress.policy import EgressPolicy

        policy = EgressPolicy.from_dict(self.policy)
        return (
            *(a.describe() for a in policy.allow),
            *(f"{w.describe()} (as the resolver answers)" for w in policy.wildcards),
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        data["accel"] = self.accel.value
        data["xdebug"] = self.xdebug.value
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SandboxState:
        data = jsontext.known_fields(cls, jsontext.parse_object(text))
        data["phase"] = Phase(data["phase"])
        data["accel"] = Accel(data["accel"])
        data["xdebug"] = XdebugMode(data.get("xdebug", XdebugMode.TRACE.value))
        data["volumes"] = tuple(data.get("volumes", ()))
        return cls(**data)


class StateStore:
    """The state directories of all sandboxes, under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def file(self, name: str, filename: str) -> Path:
        return self.dir(name) / filename

    def lock(
        self, name: str, *, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The sandbox's own lock: held at once or a ConflictError, unless `timeout` says how
        long to wait for it."""
        return file_lock(self.file(name, paths.LOCK_FILE), f"sandbox {name!r}", timeout=timeout)

    def global_lock(self) -> contextlib.AbstractContextManager[None]:
        # Shared resources (the storage pool and its base images, the shared filters, the choice
        # of a free subnet) are created and removed under this one.
        return file_lock(
            self.root / paths.GLOBAL_LOCK,
            "the shared storage pool and network ranges",
            timeout=GLOBAL_LOCK_TIMEOUT,
            hint="another `sandbox up` may be uploading a base image; try again when it is done",
        )

    def load(self, name: str) -> SandboxState | None:
        path = self.file(name, paths.STATE_FILE)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return SandboxState.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxError(
                f"the state file {path} is damaged ({exc})",
                f"run `sandbox destroy --name {name}` to clean up what is left",
            ) from exc

    def save(self, state: SandboxState) -> None:
        atomic_write(self.file(state.name, paths.STATE_FILE), state.to_json())

    def write_secret(self, name: str, filename: str, text: str) -> Path:
        path = self.file(name, filename)
        # Keys live here: nobody else may even list the directory.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        atomic_write(path, text, mode=0o600)
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / paths.STATE_FILE).exists()
        )

    def remove_secrets(self, name: str) -> None:
        for filename in (*paths.SECRET_FILES, paths.STATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                self.file(name, filename).unlink()

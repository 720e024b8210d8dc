"""What every verb needs (Context: settings, where state lives, progress) and the ways to
reach a sandbox that exists: its state, its network, an SSH session to its guest."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orchestrator import names, paths
from orchestrator.config import Settings
from orchestrator.egress import guestfw
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import (
    GuestError,
    NotFoundError,
)
from orchestrator.state import (
    Phase,
    SandboxState,
    StateStore,
    validate_name,
)
from orchestrator.vm.domain import (
    NetworkSpec,
    PoolSpec,
)
from orchestrator.vm.images import (
    default_image_name,
)
from orchestrator.waits import Deadline

if TYPE_CHECKING:
    # paramiko and pycdlib cost a tenth of a second to import: only the verbs that talk to a
    # guest or build a seed load them (destroy, list and status do not).
    from orchestrator.vm.guest import Endpoint, Guest


class Reporter(Protocol):
    def step(self, what: str) -> AbstractContextManager[None]: ...

    def info(self, message: str) -> None: ...


class QuietReporter:
    def step(self, what: str) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def info(self, message: str) -> None:
        return None


# The shared network every sandbox used before each had its own: what a sandbox of that time
# (state without subnets) was on, so that it can still be collected and destroyed.
LEGACY_SUBNET, LEGACY_SUBNET6 = "192.168.213.0/24", "2001:db8:213::/64"


def network_of(state: SandboxState) -> NetworkSpec:
    """The network the sandbox was created on, as `up` recorded it in its state."""
    subnet6 = state.subnet6 if state.subnet is not None else LEGACY_SUBNET6
    return NetworkSpec(
        name=state.network,
        bridge=names.bridge(state.name),
        subnet=ipaddress.IPv4Network(state.subnet or LEGACY_SUBNET),
        subnet6=ipaddress.IPv6Network(subnet6) if subnet6 else None,
        guest_mac=state.mac,
    )


@dataclass
class Context:
    """What every verb needs: settings, where state lives, how to report progress."""

    settings: Settings
    dirs: paths.Dirs
    reporter: Reporter = field(default_factory=QuietReporter)

    @property
    def store(self) -> StateStore:
        return StateStore(self.dirs.state)

    def pool_spec(self) -> PoolSpec:
        return PoolSpec(name=self.settings.pool.name, path=self.settings.pool.path)

    def image_name(self, override: str | None) -> str:
        if override:
            return override
        if self.settings.image.name:
            return self.settings.image.name
        return default_image_name(self.settings.image.packages)


def is_local(uri: str) -> bool:
    """A URI whose hypervisor runs on this machine (no host part)."""
    from urllib.parse import urlparse

    return not urlparse(uri).netloc


def guards_host(uri: str) -> bool:
    """Whether this process can guard the hypervisor host's own services (hostguard.py): a local
    QEMU hypervisor, whose bridge is in this network namespace (the test:/// driver has none)."""
    from urllib.parse import urlparse

    return is_local(uri) and urlparse(uri).scheme.split("+")[0] == "qemu"


def guards_remote_host(uri: str) -> bool:
    """Whether this process guards a remote hypervisor host's own services (hostguard.py over
    SSH): a QEMU hypervisor reached as qemu+ssh://, whose login can run nft there."""
    from urllib.parse import urlparse

    from orchestrator.vm.remoteuri import over_ssh

    return not is_local(uri) and urlparse(uri).scheme.split("+")[0] == "qemu" and over_ssh(uri)


def ready_state(ctx: Context, name: str) -> SandboxState:
    validate_name(name)
    state = ctx.store.load(name)
    if state is None:
        raise NotFoundError(
            f"sandbox {name!r} does not exist", f"create it with `sandbox up --name {name}`"
        )
    if state.phase is not Phase.READY or not state.ip:
        raise GuestError(
            f"sandbox {name!r} is not ready (phase: {state.phase.value})",
            f"run `sandbox destroy --name {name}` and `sandbox up --name {name}` again",
        )
    return state


def runnable_state(ctx: Context, name: str) -> SandboxState:
    """The state of a sandbox that can take a run: up, and its policy loaded."""
    validate_name(name)
    state = ctx.store.load(name)
    if state is not None and state.phase is Phase.CREATING:
        raise GuestError(
            f"sandbox {name!r} is still being created: its egress policy is not applied yet",
            f"wait for `sandbox up --name {name}` to finish (or destroy it if that was "
            "interrupted), then run again",
        )
    return ready_state(ctx, name)


def endpoint(ctx: Context, state: SandboxState) -> Endpoint:
    from orchestrator.vm.guest import Endpoint

    assert state.ip is not None
    return Endpoint(
        host=state.ip,
        port=state.ssh_port,
        user=state.user,
        client_key=ctx.store.file(state.name, paths.CLIENT_KEY),
        host_key=state.host_key,
    )


@contextlib.contextmanager
def open_guest(ctx: Context, name: str, timeout: float = 30.0) -> Iterator[Guest]:
    state = ready_state(ctx, name)
    deadline = Deadline(
        timeout,
        f"SSH to sandbox {name!r} at {state.ip}",
        f"check `sandbox status --name {name}`; the VM may have stopped",
    )
    from orchestrator.vm.guest import Guest
    from orchestrator.vm.jump import guest_route

    with (
        guest_route(state.uri) as opener,
        Guest.connect(endpoint(ctx, state), deadline, opener=opener) as guest,
    ):
        yield guest


def expected_rules(state: SandboxState) -> dict[int, str]:
    """The guest's filter tables as `up` loaded them. A sandbox made before state kept them gets
    its policy rendered again (by today's code: a renderer that changed since then would make its
    unchanged rules look tampered with)."""
    if state.guest_rules:
        return {int(version): text for version, text in state.guest_rules.items()}
    return guestfw.render(EgressPolicy.from_dict(state.policy), network_of(state))


def logs_dir(ctx: Context, name: str) -> Path:
    return ctx.store.dir(name) / paths.LOGS_DIR

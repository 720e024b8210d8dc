"""Every name the orchestrator derives for a resource outside its own state directory: libvirt
domains, networks, volumes and filters, host interfaces and bridges, nftables tables.

Each derives from the sandbox name alone (or the image's name and hash), so that `destroy` finds
everything even when the `up` that made it was killed before it wrote any state, and `list` can
tell our resources from others'. File names under our own directories are in paths.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Domains, networks, per-sandbox volumes and filters: `virsh list`, `virsh net-list`,
# `virsh vol-list` and `virsh nwfilter-list` line up.
PREFIX = "sandbox-"
BASE_VOLUME_PREFIX = "base-"
GUARD_TABLE_PREFIX = "sandbox_guard_"


def domain(sandbox: str) -> str:
    return PREFIX + sandbox


# A warm VM's domain (lifecycle/warm.py): the dot keeps it apart from every sandbox's domain
# (sandbox names have none), and it keeps this name when a sandbox takes it.
WARM_PREFIX = PREFIX + "warm."


def warm_domain(warm_id: str) -> str:
    return WARM_PREFIX + warm_id


def network(sandbox: str) -> str:
    """The sandbox's own network (libvirt keeps networks and domains in separate namespaces)."""
    return PREFIX + sandbox


def nwfilter(sandbox: str) -> str:
    return PREFIX + sandbox


def _short_hash(sandbox: str) -> str:
    return hashlib.sha256(sandbox.encode()).hexdigest()[:10]


def bridge(sandbox: str) -> str:
    """The sandbox network's bridge: at most 15 characters (IFNAMSIZ), outside libvirt's `virbr`
    names."""
    return "sbr" + _short_hash(sandbox)


def target_dev(sandbox: str) -> str:
    """The host-side name of the guest's interface: fixed before boot, at most 15 characters, and
    never in libvirt's own `vnet` namespace."""
    return "sbx" + _short_hash(sandbox)


def guard_table(bridge_name: str) -> str:
    """The host's nftables input guard of a bridge. nft identifiers allow letters, digits and
    underscores; bridge names are at most 15 characters."""
    return GUARD_TABLE_PREFIX + "".join(c if c.isalnum() else "_" for c in bridge_name)


@dataclass(frozen=True)
class SandboxVolumes:
    """A sandbox's volumes in the storage pool."""

    disk: str
    seed: str
    console: str
    # The guest capture's records as they come (domain.CAPTURE_CHANNEL), read by `destroy`.
    capture: str

    @classmethod
    def for_sandbox(cls, sandbox: str) -> SandboxVolumes:
        return cls.for_domain(domain(sandbox))

    @classmethod
    def for_domain(cls, base: str) -> SandboxVolumes:
        return cls(
            disk=f"{base}.qcow2",
            seed=f"{base}-seed.iso",
            console=f"{base}-console.log",
            capture=f"{base}-capture.log",
        )

    def all(self) -> tuple[str, ...]:
        return (self.disk, self.seed, self.console, self.capture)


@dataclass(frozen=True)
class BaseVolumes:
    """An image version's volumes in the pool, shared by every sandbox made from it; the marker
    is written last (an upload without it was interrupted)."""

    disk: str
    kernel: str
    initrd: str
    marker: str

    @classmethod
    def for_image(cls, image_name: str, image_hash: str) -> BaseVolumes:
        stem = f"{base_volume_prefix(image_name)}{image_hash[:12]}"
        return cls(f"{stem}.qcow2", f"{stem}.vmlinuz", f"{stem}.initrd", f"{stem}.complete")


def base_volume_prefix(image_name: str) -> str:
    """What every version of an image's base volumes starts with."""
    return f"{BASE_VOLUME_PREFIX}{image_name}-"

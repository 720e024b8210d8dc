"""Removing what a sandbox owns on the hypervisor: shared by `up`'s rollback and `destroy`."""

from __future__ import annotations

import contextlib

import libvirt

from orchestrator import names, paths
from orchestrator.egress import dnslog, hostfilter, hostguard
from orchestrator.errors import HypervisorError, SandboxError
from orchestrator.lifecycle.context import Context, guards_host, guards_remote_host
from orchestrator.state import (
    StateStore,
)
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import DNSMASQ_DIR, dns_log_path
from orchestrator.vm.images import Image, verify_image


def prepare_storage(
    ctx: Context, conn: libvirt.virConnect, img: Image
) -> tuple[libvirt.virStoragePool, names.BaseVolumes]:
    """The storage pool, and the image's base volumes in it (uploaded once per image version,
    checked against the image's manifest first). Call under the global lock."""
    pool = hv.ensure_pool(conn, ctx.pool_spec())
    base = hv.ensure_base_volumes(
        conn,
        pool,
        image_name=img.name,
        image_hash=img.manifest.recipe_hash,
        disk=img.disk,
        kernel=img.kernel,
        initrd=img.initrd,
        verify=lambda: verify_image(img),
    )
    return pool, base


def save_console(store: StateStore, name: str, text: str) -> None:
    if text:
        logs = store.dir(name) / paths.LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        (logs / paths.CONSOLE_LOG).write_text(text)


def remove_volumes(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    vols: names.SandboxVolumes,
    store: StateStore,
    name: str,
) -> list[str]:
    """Keep the console's text with the logs, then delete the sandbox's volumes; the names of
    those that were there."""
    save_console(store, name, hv.console_text(conn, pool, vols.console))
    return delete_volumes(pool, vols)


def delete_volumes(pool: libvirt.virStoragePool, vols: names.SandboxVolumes) -> list[str]:
    """Delete a VM's volumes; the names of those that were there."""
    # virtlogd rotates the console log and the capture's (2 MiB a file, 3 kept): the old ones
    # too.
    rotated = [*hv.console_rotations(pool, vols.console), *hv.console_rotations(pool, vols.capture)]
    return [vol for vol in (*vols.all(), *rotated) if hv.delete_volume(pool, vol)]


def remove_network(ctx: Context, conn: libvirt.virConnect, network: str) -> bool:
    """Remove the sandbox's network (once its domain is gone), the host-side guard of its bridge
    and its resolver's query log (read by the final collection before), and the filters all
    sandboxes share once no sandbox is left. Takes the global lock."""
    with ctx.store.global_lock():
        bridge = hv.network_bridge(conn, network)
        removed = hv.remove_network_if_unused(conn, network)
        uri = str(conn.getURI())
        if removed and guards_host(uri) and bridge is not None:
            hostguard.remove(bridge)
        if removed:
            _remove_on_host(uri, network, bridge if guards_remote_host(uri) else None)
        if not hv.sandbox_domains(conn):
            with contextlib.suppress(HypervisorError):  # the test:/// driver has no nwfilter
                hostfilter.remove_shared_filters(conn)
        return removed


def _remove_on_host(
    uri: str, network: str, guarded: str | None = None, directory: str = DNSMASQ_DIR
) -> None:
    """The resolver's query log and its rotated copy, on the host the network ran on, and the
    input guard of bridge `guarded` where it was set over SSH: one login for a remote host.
    Best effort: the network is gone either way; a host whose files cannot be reached (qemu+tcp,
    permissions) keeps them, as a host without sandbox would."""
    from orchestrator.vm import hostfiles

    if not (guards_host(uri) or guards_remote_host(uri)):
        # The test:/// driver runs no dnsmasq (nothing of this machine's is its); a qemu+tcp or
        # qemu+tls host gives no login to reach its files.
        return
    log = dns_log_path(network, directory)
    with contextlib.suppress(SandboxError), hostfiles.on_host(uri) as files:
        for path in (log, str(dnslog.rotated_copy(log))):
            with contextlib.suppress(SandboxError):
                files.remove(path)
        if guarded is not None:
            hostguard.remove(guarded, host=files)

"""Several libvirt hosts (the config's `hosts`): what each one holds and has free (`probe`),
where a new sandbox goes (`choose`, pure, and `place`), and where an existing one is (`locate`).

Once placed, a sandbox's host is its state's `uri`, and every later verb follows that, not the
settings. A host that cannot be reached is skipped and reported, never fatal to the others."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import libvirt

from orchestrator.errors import ConflictError, HypervisorError, SandboxError, UsageError
from orchestrator.lifecycle.context import Context, guards_remote_host, is_local
from orchestrator.vm import hypervisor as hv

# Hosts probed at once: each probe is a libvirt connection (over SSH for a remote host, where
# most of its time is the network's), so a few in parallel make `up` wait for the slowest one
# rather than for all of them in a row.
PROBE_THREADS = 8


@dataclass(frozen=True)
class HostProbe:
    """One libvirt host as `probe` found it."""

    uri: str
    # Free memory in bytes, as libvirt reports it (hv.free_memory); None: it could not tell.
    free: int | None = None
    # Why it could not be reached; None: it answered.
    error: str | None = None
    # Our sandboxes' domains on it: sandbox name -> domain name (hv.sandbox_domains).
    sandboxes: dict[str, str] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.uri}: {self.error}"
        free = "free memory unknown" if self.free is None else f"{self.free >> 20} MiB free"
        return f"{self.uri} ({free})"


def unreachable_error(probes: Sequence[HostProbe]) -> HypervisorError:
    """The error when no host answered: each host with its own error."""
    return HypervisorError(
        "no libvirt host could be reached: "
        + "; ".join(p.describe() for p in probes if not p.reachable),
        "start libvirtd on one of them, or fix hosts: in the config file; "
        "`sandbox --connect URI ...` uses that one host alone",
    )


def choose(probes: Sequence[HostProbe], prefer: Collection[str] = ()) -> str:
    """The URI of the reachable host with the most free memory. Among the hosts in `prefer`
    (those holding a warm VM that fits), if any is reachable: a warm VM's memory is taken
    already, so taking it costs its host nothing more. A host that cannot tell its free memory
    ranks after every host that can; a tie goes to the host listed first. Pure."""
    reachable = [p for p in probes if p.reachable]
    if not reachable:
        raise unreachable_error(probes)
    candidates = [p for p in reachable if p.uri in prefer] or reachable
    best = max(
        enumerate(candidates),
        key=lambda item: (item[1].free is not None, item[1].free or 0, -item[0]),
    )
    return best[1].uri


def probe_one(uri: str) -> HostProbe:
    try:
        with hv.connection(uri) as conn:
            return HostProbe(uri, free=hv.free_memory(conn), sandboxes=hv.sandbox_domains(conn))
    except SandboxError as exc:
        # describe() names the host already.
        return HostProbe(
            uri, error=exc.message.removeprefix(f"cannot connect to libvirt at {uri}: ")
        )
    except libvirt.libvirtError as exc:  # it answered the connection, then failed
        return HostProbe(uri, error=f"libvirt: {exc}")


def probe(uris: Sequence[str]) -> list[HostProbe]:
    """Each host's free memory and sandboxes, in the order given; a host that cannot be reached
    is a probe with its error."""
    if len(uris) <= 1:
        return [probe_one(uri) for uri in uris]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(uris))) as pool:
        return list(pool.map(probe_one, uris))


def require_capture(uri: str) -> None:
    """--pcap runs tcpdump on the libvirt host: this machine, or a remote host over SSH (its
    login runs it there). Refused early for a remote host reached otherwise (qemu+tcp/tls)."""
    if is_local(uri) or guards_remote_host(uri):
        return
    raise UsageError(
        f"--pcap needs a login to the libvirt host to run tcpdump there, and {uri} gives none",
        "connect with qemu+ssh://root@HOST/system, or leave out --pcap",
    )


def runs_host_services(uri: str) -> bool:
    """Whether sinkhole mode and wildcard entries can run on the libvirt host at `uri`: this
    machine, or a remote QEMU host reached over SSH (their helpers run there beside the network,
    egress/remotesinkhole.py, egress/remoterelay.py). Pure."""
    return is_local(uri) or guards_remote_host(uri)


def place(
    ctx: Context,
    name: str,
    *,
    fits: Callable[[str], bool] | None = None,
    prefer: Collection[str] = (),
) -> str:
    """The host a new sandbox NAME goes on. `fits`: among the hosts it accepts (wildcard
    entries and the sinkhole: runs_host_services),
    if there are any (else the step that needs one says why). One host (no `hosts` configured,
    or --connect): that one, without asking it anything (`up` connects to it next and reports
    its error). Several: the reachable one with the most free memory (`choose`); each
    unreachable host is a warning through the reporter."""
    uris = ctx.settings.all_hosts
    if fits is not None:
        uris = tuple(uri for uri in uris if fits(uri)) or uris
    if len(uris) == 1:
        return uris[0]
    with ctx.reporter.step(f"choosing a libvirt host (most free memory of {len(uris)})"):
        probes = probe(uris)
    for p in probes:
        if not p.reachable:
            ctx.reporter.info(f"warning: skipped libvirt host {p.describe()}")
    holders = [p.uri for p in probes if name in p.sandboxes]
    if holders:
        raise ConflictError(
            f"a libvirt domain of sandbox {name!r} already exists without sandbox state on "
            f"{', '.join(holders)}",
            f"run `sandbox destroy --name {name}` to remove it",
        )
    uri = choose(probes, prefer)
    chosen = next(p for p in probes if p.uri == uri)
    ctx.reporter.info(f"sandbox {name} goes on {chosen.describe()}")
    return uri


@dataclass(frozen=True)
class Whereabouts:
    """Where the domains of a sandbox without state are."""

    found: dict[str, str]  # host URI -> domain name
    down: tuple[HostProbe, ...]  # hosts that could not be asked

    def down_problems(self) -> tuple[str, ...]:
        return tuple(f"libvirt host {p.describe()} (not searched)" for p in self.down)


def locate(ctx: Context, name: str) -> Whereabouts:
    """Every configured host holding a domain of sandbox NAME (a sandbox whose state is gone,
    or an `up` killed before it wrote one)."""
    probes = probe(ctx.settings.all_hosts)
    return Whereabouts(
        found={p.uri: p.sandboxes[name] for p in probes if name in p.sandboxes},
        down=tuple(p for p in probes if not p.reachable),
    )

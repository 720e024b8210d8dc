"""Settings: defaults < config file (YAML) < environment < command-line flags, frozen."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UsageError
from orchestrator.vm.domain import SUBNET6_PREFIX, SUBNET_PREFIX, Accel

DEFAULT_URI = "qemu:///system"
ENV_CONNECT = "SANDBOX_CONNECT"
ENV_CONFIG = "SANDBOX_CONFIG"


@dataclass(frozen=True)
class NetworkSettings:
    """Where sandbox networks take their addresses from. Every sandbox has a network of its own
    (bridge, DHCP server and resolver): one guest cannot reach another's link, and a resolver
    answers only the names allowed to its own sandbox."""

    subnets: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("192.168.208.0/20")
    )
    subnets6: ipaddress.IPv6Network | None = field(
        default_factory=lambda: ipaddress.IPv6Network("2001:db8:213::/48")
    )
    # Where a learn-mode sandbox's resolver sends the names it cannot answer from the host's
    # hosts file. None: the host's own resolvers (/etc/resolv.conf); (): none (hosts file only).
    learn_resolvers: tuple[str, ...] | None = None
    # Where the sandbox's resolver sends the names of wildcard entries (policy.Wildcard), and a
    # learn-mode sandbox's when learn_resolvers is not set. None: the host's own resolvers.
    resolvers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PoolSettings:
    name: str = "sandbox"
    path: str = "/var/lib/libvirt/sandbox"


@dataclass(frozen=True)
class ImageSettings:
    name: str | None = None
    packages: tuple[str, ...] = ()
    sources: Path | None = None


# One place for the ranges the config file and the command line share.
MEMORY_MIB_RANGE = (128, 1 << 20)
VCPUS_RANGE = (1, 64)
BOOT_TIMEOUT_RANGE = (1.0, 86400.0)
WARM_RANGE = (0, 64)
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What the host takes from a guest at most (everything from the guest is attacker input)."""

    # One output file of a run (an xdebug trace, profile or coverage dump), as fetched.
    output_file_mib: int = 128
    # All output files of one run together.
    run_outputs_mib: int = 512
    # A compressed trace, once inflated.
    decompressed_mib: int = 256

    @property
    def output_file(self) -> int:
        return self.output_file_mib * MIB

    @property
    def run_outputs(self) -> int:
        return self.run_outputs_mib * MIB

    @property
    def decompressed(self) -> int:
        return self.decompressed_mib * MIB


def check_range(value: float, bounds: tuple[float, float], what: str, hint: str = "") -> None:
    """A UsageError unless bounds[0] <= value <= bounds[1]."""
    low, high = bounds
    if not low <= value <= high:
        raise UsageError(
            f"{what} must be between {low:g} and {high:g}, not {value:g}",
            hint or f"give a value from {low:g} to {high:g}",
        )


@dataclass(frozen=True)
class Settings:
    # The libvirt host of the verbs that work on one host: `warm` (fill, status, drain), and the
    # one `up` uses when no `hosts` are configured.
    connect: str = DEFAULT_URI
    # The libvirt hosts `up` chooses among (the one with the most free memory), and that `list`,
    # `status` and `destroy` search; () means only `connect`. An explicit --connect or
    # SANDBOX_CONNECT means exactly that one host (`on_host`).
    hosts: tuple[str, ...] = ()
    accel: Accel = Accel.AUTO
    memory_mib: int = 512
    vcpus: int = 2
    # Under TCG a cold boot reaches SSH in about 30 s here, 2-3 times that on a loaded machine
    # (docs/platform.md#boot-times-under-tcg); with KVM it is a few seconds. The deadline is
    # generous, not a target.
    boot_timeout: float = 400.0
    # Seconds between collections of the connection records while `run` or `exec` runs (0: only
    # at its end). The guest's capture buffer holds about 70,000 attempts between two.
    collect_every: float = 10.0
    # How many warm VMs (booted ahead, each taken by one `up`) to keep: after `up` takes one,
    # it boots a replacement in the background. 0: only `sandbox warm fill` makes them.
    warm: int = 0
    network: NetworkSettings = field(default_factory=NetworkSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    allow: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def all_hosts(self) -> tuple[str, ...]:
        """Every libvirt host sandboxes may be on: the configured hosts, else `connect`."""
        return self.hosts or (self.connect,)

    def on_host(self, uri: str) -> Settings:
        """These settings with exactly one host: what --connect URI means, and what one sandbox
        is built with once `up` has placed it."""
        return dataclasses.replace(self, connect=uri, hosts=())


def _expect(value: Any, kind: type | tuple[type, ...], key: str, source: str) -> Any:
    # YAML's true/false are ints to Python: never a number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UsageError(f"{source}: {key} must be a {names}, not {value!r}", "fix the config file")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(
            f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(where + k for k in unknown)}",
            f"known settings here: {', '.join(sorted(allowed))}",
        )


def parse_accel(value: str) -> Accel:
    try:
        return Accel(value.lower())
    except ValueError:
        raise UsageError(f"unknown acceleration {value!r}", "use one of: auto, kvm, tcg") from None


def _parse_network(value: Any, default: NetworkSettings, source: str) -> NetworkSettings:
    net = _expect(value, dict, "network", source)
    retired = sorted({"name", "bridge", "subnet", "subnet6"} & set(net))
    if retired:
        raise UsageError(
            f"{source}: network.{retired[0]} is no longer a setting: every sandbox now has a "
            "network of its own, named and bridged after the sandbox",
            "set network.subnets (an IPv4 range; each sandbox takes a /28 of it) and "
            "network.subnets6 (an IPv6 range of /64s, or none), or remove network:",
        )
    _check_keys(net, {"subnets", "subnets6", "learn_resolvers", "resolvers"}, "network.", source)
    found: dict[str, tuple[str, ...] | None] = {
        "learn_resolvers": default.learn_resolvers,
        "resolvers": default.resolvers,
    }
    for key in found:
        if key not in net:
            continue
        listed = _expect(net[key], list, f"network.{key}", source)
        try:
            found[key] = tuple(str(ipaddress.ip_address(str(a))) for a in listed)
        except ValueError as exc:
            raise UsageError(
                f"{source}: network.{key}: {exc}",
                "list resolver addresses, such as [203.0.113.53], or [] for none",
            ) from None
    subnets = default.subnets
    if "subnets" in net:
        try:
            subnets = ipaddress.IPv4Network(str(net["subnets"]))
        except ValueError as exc:
            raise UsageError(
                f"{source}: network.subnets: {exc}", "use a CIDR such as 192.168.208.0/20"
            ) from None
        if subnets.prefixlen > SUBNET_PREFIX:
            raise UsageError(
                f"{source}: network.subnets is smaller than one sandbox's /{SUBNET_PREFIX}",
                f"use a /{SUBNET_PREFIX} or larger: a /20 holds 256 sandboxes",
            )
    subnets6 = default.subnets6
    if "subnets6" in net:
        if net["subnets6"] in (None, False, "none"):
            subnets6 = None
        else:
            try:
                subnets6 = ipaddress.IPv6Network(str(net["subnets6"]))
            except ValueError as exc:
                raise UsageError(
                    f"{source}: network.subnets6: {exc}",
                    "use an IPv6 range such as 2001:db8:213::/48, or none for IPv4 only",
                ) from None
            if subnets6.prefixlen > SUBNET6_PREFIX:
                raise UsageError(
                    f"{source}: network.subnets6 is smaller than one sandbox's /64",
                    "use a /64 or larger (a /48 holds 65,536 sandboxes), or none",
                )
    return NetworkSettings(
        subnets=subnets,
        subnets6=subnets6,
        learn_resolvers=found["learn_resolvers"],
        resolvers=found["resolvers"],
    )


def _parse_uri(value: Any, key: str, source: str) -> str:
    uri = str(_expect(value, str, key, source)).strip()
    # A URI names a driver (qemu:, qemu+ssh:, test:); a bare host name is a common slip.
    if not uri or ":" not in uri or any(c.isspace() for c in uri):
        raise UsageError(
            f"{source}: {key} {value!r} is not a libvirt URI",
            "give a URI such as qemu:///system or qemu+ssh://root@host.example/system",
        )
    return uri


def _parse_hosts(data: Mapping[str, Any], source: str) -> tuple[str | None, tuple[str, ...]]:
    """`connect` and `hosts`: hosts absent means [connect]; connect absent means hosts[0];
    both given, connect must be one of the hosts (it is the one `warm` works on)."""
    connect = _parse_uri(data["connect"], "connect", source) if "connect" in data else None
    if "hosts" not in data:
        return connect, ()
    listed = _expect(data["hosts"], list, "hosts", source)
    if not listed:
        raise UsageError(
            f"{source}: hosts is empty",
            "list at least one libvirt URI, or remove hosts: to use connect alone",
        )
    hosts = tuple(_parse_uri(h, f"hosts[{i}]", source) for i, h in enumerate(listed))
    repeated = sorted({h for h in hosts if hosts.count(h) > 1})
    if repeated:
        raise UsageError(
            f"{source}: hosts lists {', '.join(repeated)} more than once", "list each host once"
        )
    if connect is not None and connect not in hosts:
        raise UsageError(
            f"{source}: connect {connect} is not one of hosts",
            "add it to hosts, or remove connect: (then the first host is the one `warm` uses)",
        )
    return connect or hosts[0], hosts


def parse_settings(data: Mapping[str, Any], source: str) -> Settings:
    """Settings from a parsed config mapping; every key is checked, unknown ones are errors."""
    _check_keys(
        data,
        {
            "connect",
            "hosts",
            "accel",
            "memory",
            "vcpus",
            "boot_timeout",
            "collect_every",
            "warm",
            "network",
            "pool",
            "image",
            "allow",
            "limits",
        },
        "",
        source,
    )
    s = Settings()
    changes: dict[str, Any] = {}
    connect, hosts = _parse_hosts(data, source)
    if connect is not None:
        changes["connect"] = connect
    changes["hosts"] = hosts
    if "accel" in data:
        changes["accel"] = parse_accel(_expect(data["accel"], str, "accel", source))
    if "memory" in data:
        changes["memory_mib"] = _expect(data["memory"], int, "memory", source)
        check_range(changes["memory_mib"], MEMORY_MIB_RANGE, f"{source}: memory (MiB)")
    if "vcpus" in data:
        changes["vcpus"] = _expect(data["vcpus"], int, "vcpus", source)
        check_range(changes["vcpus"], VCPUS_RANGE, f"{source}: vcpus")
    if "boot_timeout" in data:
        changes["boot_timeout"] = float(
            _expect(data["boot_timeout"], (int, float), "boot_timeout", source)
        )
        check_range(changes["boot_timeout"], BOOT_TIMEOUT_RANGE, f"{source}: boot_timeout (s)")
    if "limits" in data:
        limits = _expect(data["limits"], dict, "limits", source)
        names = {f.name for f in dataclasses.fields(Limits)}
        _check_keys(limits, names, "limits.", source)
        for key, value in limits.items():
            _expect(value, int, f"limits.{key}", source)
            check_range(value, (1, 1 << 20), f"{source}: limits.{key}")
        changes["limits"] = Limits(**limits)
    if "collect_every" in data:
        every = float(_expect(data["collect_every"], (int, float), "collect_every", source))
        if every < 0:
            raise UsageError(
                f"{source}: collect_every must be 0 (only at the end) or more seconds", "fix it"
            )
        changes["collect_every"] = every
    if "warm" in data:
        changes["warm"] = _expect(data["warm"], int, "warm", source)
        check_range(changes["warm"], WARM_RANGE, f"{source}: warm (VMs kept booted ahead)")
    if "network" in data:
        changes["network"] = _parse_network(data["network"], s.network, source)
    if "pool" in data:
        pool = _expect(data["pool"], dict, "pool", source)
        _check_keys(pool, {"name", "path"}, "pool.", source)
        changes["pool"] = PoolSettings(
            name=str(pool.get("name", s.pool.name)), path=str(pool.get("path", s.pool.path))
        )
    if "image" in data:
        image = _expect(data["image"], dict, "image", source)
        _check_keys(image, {"name", "packages", "sources"}, "image.", source)
        packages = _expect(image.get("packages", []), list, "image.packages", source)
        changes["image"] = ImageSettings(
            name=str(image["name"]) if "name" in image else None,
            packages=tuple(str(p) for p in packages),
            sources=Path(str(image["sources"])) if "sources" in image else None,
        )
    if "allow" in data:
        allow = _expect(data["allow"], list, "allow", source)
        changes["allow"] = tuple(str(a) for a in allow)
    return dataclasses.replace(s, **changes)


def load_settings(
    config_path: Path | None,
    default_path: Path,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read the config file (an explicit path must exist; the default one may not) and apply
    the environment on top."""
    env = os.environ if env is None else env
    explicit = config_path or (Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None)
    path = explicit or default_path
    data: Any = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist", "check the path") from None
        text = ""
    except OSError as exc:
        raise UsageError(
            f"cannot read config file {path}: {exc.strerror}", "check its permissions"
        ) from None
    if text.strip():
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path} is not valid YAML: {exc}", "fix the syntax") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} must be a YAML mapping", "see the README for an example")
    settings = parse_settings(data or {}, str(path))
    if env.get(ENV_CONNECT):
        # Given explicitly, one URI means that one host, whatever hosts the file lists.
        settings = settings.on_host(env[ENV_CONNECT])
    return settings

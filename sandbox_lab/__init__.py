"""The network-namespace lab: libvirtd, its bridges, dnsmasq and the guests live in a namespace
with no link to the real network, and a second namespace stands in for "the internet".

Try it by hand (as root; `python -m sandbox_lab` is the same as `sandbox-lab`):

    sandbox-lab up                   # namespaces, fake-internet servers, libvirtd in the lab
    sandbox-lab status               # namespaces, daemon pids, servers, /dev/kvm, br_netfilter
    sandbox-lab exec -- sandbox up   # run anything that talks to guests (SSH) inside the lab
    sandbox-lab exec -- bash -c 'cat < /dev/tcp/203.0.113.7/80'   # the "internet" answers
    cat /run/sandbox-lab/inet-accept.jsonl   # one JSON line per connection the "internet" saw
    sandbox-lab down                 # stop the daemons, kill leftovers, delete both namespaces

Layout (documentation addresses only; neither namespace has any link to the real network):

    sandbox-lab   sblab0 192.0.2.1/24 2001:db8:ffff::1/64, default routes via the inet side,
                  forwarding on; libvirtd (under a subreaper) and virtlogd, libvirt's bridges,
                  dnsmasq and the guests
    sandbox-inet  sbinet0 192.0.2.254/24 2001:db8:ffff::254/64; on lo 203.0.113.7 (the allowed
                  server), 198.51.100.9 (the blocked one) and 2001:db8:1::9, each serving TCP 80
                  and 443 and UDP 53 and 5353

Clients in the root namespace still reach libvirtd over its unix socket (qemu:///system).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import grp
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_network,
)
from pathlib import Path
from types import FrameType
from typing import IO, Any

from orchestrator import paths
from orchestrator.errors import ConflictError, SandboxError, UsageError
from orchestrator.files import atomic_write, file_lock
from orchestrator.waits import Deadline, wait_for
from sandbox_lab import dns

IPAddress = IPv4Address | IPv6Address

# RFC 5737 / RFC 3849: nothing the lab configures may ever be a real address.
_DOC_NETS = tuple(
    ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_PR_SET_CHILD_SUBREAPER = 36
_LIBVIRT_URI = "qemu:///system"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# The lab's runtime files, gone at reboot like the namespaces.
LAB_DIR = Path("/run/sandbox-lab")
LAB_LOCK = "lock"
LAB_DAEMONS = "daemons.json"
LAB_SERVERS_PID = "servers.pid"
LAB_ACCEPT_LOG = "inet-accept.jsonl"
LAB_SERVERS_LOG = "servers.log"
LAB_SUPERVISOR_LOG = "supervisor.log"
LAB_LIBVIRTD_LOG = "libvirtd.log"
LAB_VIRTLOGD_LOG = "virtlogd.log"

_LAB_V4 = IPv4Interface("192.0.2.1/24")
_INET_V4 = IPv4Interface("192.0.2.254/24")
_LAB_V6 = IPv6Interface("2001:db8:ffff::1/64")
_INET_V6 = IPv6Interface("2001:db8:ffff::254/64")
_ALLOWED = IPv4Address("203.0.113.7")
_BLOCKED = IPv4Address("198.51.100.9")
_SERVER_V6 = IPv6Address("2001:db8:1::9")


class LabError(SandboxError):
    """The lab could not be built, started or torn down."""


@dataclass(frozen=True)
class Lab:
    """Names and addresses of one lab; `DEFAULT_LAB` is the one the tools and tests use."""

    netns: str = "sandbox-lab"
    inet_netns: str = "sandbox-inet"
    veth: str = "sblab0"
    inet_veth: str = "sbinet0"
    lab_v4: IPv4Interface = _LAB_V4
    inet_v4: IPv4Interface = _INET_V4
    lab_v6: IPv6Interface = _LAB_V6
    inet_v6: IPv6Interface = _INET_V6
    allowed_server: IPv4Address = _ALLOWED
    blocked_server: IPv4Address = _BLOCKED
    server_v6: IPv6Address = _SERVER_V6
    tcp_ports: tuple[int, ...] = (80, 443)
    udp_ports: tuple[int, ...] = (53, 5353)
    dir: Path = LAB_DIR

    def __post_init__(self) -> None:
        for addr in self.addresses:
            if not any(addr in net for net in _DOC_NETS):
                raise UsageError(
                    f"lab address {addr} is outside the documentation ranges",
                    hint="use 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 or 2001:db8::/32",
                )

    @property
    def servers(self) -> tuple[IPAddress, ...]:
        return (self.allowed_server, self.blocked_server, self.server_v6)

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        links = (self.lab_v4, self.inet_v4, self.lab_v6, self.inet_v6)
        return (*(i.ip for i in links), *self.servers)

    def file(self, name: str) -> Path:
        return self.dir / name

    @property
    def hosts_file(self) -> Path:
        return Path("/etc/netns") / self.netns / "hosts"


DEFAULT_LAB = Lab()


@dataclass(frozen=True)
class LabStatus:
    """What exists right now; problems are collected, not raised (`up` means none)."""

    namespaces: tuple[str, ...]
    link: bool
    supervisor_pid: int | None
    libvirtd_pid: int | None
    libvirtd_in_lab: bool
    virtlogd_pid: int | None
    servers_pid: int | None
    kvm: str
    br_netfilter: str
    problems: tuple[str, ...]

    @property
    def up(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        def pid(value: int | None) -> str:
            return "not running" if value is None else f"pid {value}"

        where = "in the lab" if self.libvirtd_in_lab else "NOT in the lab"
        libvirtd = pid(self.libvirtd_pid) + ("" if self.libvirtd_pid is None else f", {where}")
        return [
            f"lab: {'up' if self.up else 'not up'}",
            f"namespaces: {', '.join(self.namespaces) or 'none'}",
            f"veth link: {'present' if self.link else 'absent'}",
            f"supervisor: {pid(self.supervisor_pid)}",
            f"libvirtd: {libvirtd}",
            f"virtlogd: {pid(self.virtlogd_pid)}",
            f"inet servers: {pid(self.servers_pid)}",
            f"/dev/kvm: {self.kvm}",
            f"br_netfilter: {self.br_netfilter}",
            *(f"problem: {p}" for p in self.problems),
        ]


def in_lab(lab: Lab, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside the lab namespace (where libvirtd and the guests are)."""
    return ["ip", "netns", "exec", lab.netns, *argv]


def inside(lab: Lab = DEFAULT_LAB) -> bool:
    """Whether this process already runs in the lab's network namespace."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(paths.NETNS_DIR / lab.netns).st_ino
    except FileNotFoundError:
        return False


def run_in_lab(argv: Sequence[str], lab: Lab = DEFAULT_LAB) -> int:
    """Run a command inside the lab, bringing the lab up for it and down again after, unless
    someone else's lab was already up (benchmarks use this to re-execute themselves there)."""
    started = not lab_status(lab).up
    lab_up(lab)
    try:
        return subprocess.run(in_lab(lab, argv)).returncode
    finally:
        if started:
            lab_down(lab)


def in_inet(lab: Lab, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside the fake-internet namespace."""
    return ["ip", "netns", "exec", lab.inet_netns, *argv]


def accept_log(lab: Lab = DEFAULT_LAB) -> list[dict[str, Any]]:
    """Every connection / datagram the fake internet received since its servers started."""
    try:
        text = lab.file(LAB_ACCEPT_LOG).read_text()
    except FileNotFoundError:
        return []
    # The servers append whole lines; a last line without its newline is still being written.
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line]


# ---------------------------------------------------------------------------------------------
# Processes and namespaces, read from /proc


def _netns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _lab_netns_id(name: str) -> tuple[int, int] | None:
    return _netns_id(paths.NETNS_DIR / name)


def _pid_netns(pid: int) -> tuple[int, int] | None:
    return _netns_id(f"/proc/{pid}/ns/net")


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _running(pid: int | None) -> bool:
    """True if `pid` exists and is not a zombie waiting to be reaped."""
    if pid is None or pid <= 0:
        return False
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat_line[stat_line.rfind(")") + 2 :][:1]
    return state not in ("Z", "X", "")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _pids_named(*names: str) -> list[int]:
    return [pid for pid in _all_pids() if _comm(pid) in names and _running(pid)]


def _pids_in_netns(ns: tuple[int, int]) -> list[int]:
    return [pid for pid in _all_pids() if _pid_netns(pid) == ns and _running(pid)]


def _read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_daemons(lab: Lab) -> dict[str, int]:
    try:
        data = json.loads(lab.file(LAB_DAEMONS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _reap_if_child(pid: int) -> None:
    # Daemons started by this very process (a test session) would otherwise stay zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _terminate(pids: Sequence[int], what: str, seconds: float) -> list[str]:
    """SIGTERM `pids`, wait up to `seconds`, then SIGKILL the rest; returns what was done."""
    alive = [p for p in pids if _running(p)]
    if not alive:
        return []
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def all_gone() -> bool | None:
        for pid in alive:
            _reap_if_child(pid)
        return True if not any(_running(p) for p in alive) else None

    notes = [f"stopped {what} (pid {', '.join(map(str, alive))})"]
    try:
        wait_for(all_gone, Deadline(seconds, f"{what} to exit after SIGTERM"), interval=0.05)
    except SandboxError:
        stubborn = [p for p in alive if _running(p)]
        for pid in stubborn:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(all_gone, Deadline(10, f"{what} to exit after SIGKILL"), interval=0.05)
        notes.append(f"killed {what} (pid {', '.join(map(str, stubborn))}) after {seconds:g} s")
    return notes


# ---------------------------------------------------------------------------------------------
# Commands


def _run(
    argv: Sequence[str], *, what: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{what}: {e}", hint="check that iproute2 is installed") from e
    if check and proc.returncode != 0:
        raise LabError(
            f"{what} failed ({' '.join(argv)}): {proc.stderr.strip() or proc.returncode}",
            hint="run `sandbox-lab down`, then `sandbox-lab up` again",
        )
    return proc


def _ip(ns: str, *args: str, what: str) -> None:
    _run(["ip", "-n", ns, *args], what=what)


def _link_exists(ns: str, name: str) -> bool:
    return _run(["ip", "-n", ns, "link", "show", "dev", name], what="", check=False).returncode == 0


def _sysctl(ns: str, key: str, value: str) -> None:
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], what=f"setting {key}")


def _read_sysctl(ns: str, key: str) -> str | None:
    proc = _run(["ip", "netns", "exec", ns, "sysctl", "-n", key], what="", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _locked(lab: Lab) -> contextlib.AbstractContextManager[None]:
    lab.dir.mkdir(parents=True, exist_ok=True)
    return file_lock(
        lab.file(LAB_LOCK),
        f"the lab lock {lab.file(LAB_LOCK)}",
        timeout=180,
        hint="another `sandbox-lab up/down` is running; wait for it to finish",
    )


# ---------------------------------------------------------------------------------------------
# Host fixes


def describe_kvm(mode: int, owner: str, group: str) -> str:
    """'/dev/kvm' permissions as status shows them (pure)."""
    return f"{owner}:{group} {stat.S_IMODE(mode):04o}"


def _kvm_state(path: Path = Path("/dev/kvm")) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent (TCG only)"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    owner = "root" if st.st_uid == 0 else str(st.st_uid)
    return describe_kvm(st.st_mode, owner, group)


def _fix_kvm(path: Path = Path("/dev/kvm")) -> str:
    """Let the qemu user open /dev/kvm, else libvirt re-probes QEMU on every start (72 s)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent (TCG only)"
    if stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0:
        try:
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            return _kvm_state(path) + " (no kvm group: libvirt re-probes QEMU on every start)"
        os.chown(path, 0, kvm_gid)
        os.chmod(path, 0o660)
        return _kvm_state(path) + " (fixed from root:root 0600)"
    return _kvm_state(path)


def _br_netfilter_state(lab: Lab) -> str:
    if not Path("/proc/sys/net/bridge").is_dir():
        how = "modprobe failed" if shutil.which("modprobe") else "no modprobe on this host"
        return f"NOT loaded ({how}): nwfilter's iptables rules will not see bridged traffic"
    if not (paths.NETNS_DIR / lab.netns).exists():
        return "loaded"
    values = [
        f"{t}={_read_sysctl(lab.netns, f'net.bridge.bridge-nf-call-{t}')}"
        for t in ("iptables", "ip6tables")
    ]
    return "loaded; in the lab " + " ".join(values)


def _load_br_netfilter() -> None:
    if Path("/proc/sys/net/bridge").is_dir():
        return
    modprobe = shutil.which("modprobe")
    if modprobe:
        # A failure is reported by `status`: the lab still works, only nwfilter's iptables layer
        # does not see bridged packets.
        _run([modprobe, "br_netfilter"], what="modprobe br_netfilter", check=False)


# ---------------------------------------------------------------------------------------------
# Network


def _ensure_netns(name: str) -> None:
    if not (paths.NETNS_DIR / name).exists():
        _run(["ip", "netns", "add", name], what=f"creating network namespace {name}")
    _ip(name, "link", "set", "lo", "up", what=f"bringing lo up in {name}")


def _ensure_network(lab: Lab) -> None:
    _ensure_netns(lab.netns)
    _ensure_netns(lab.inet_netns)
    if not (_link_exists(lab.netns, lab.veth) and _link_exists(lab.inet_netns, lab.inet_veth)):
        for ns, name in ((lab.netns, lab.veth), (lab.inet_netns, lab.inet_veth)):
            if _link_exists(ns, name):
                _ip(ns, "link", "del", name, what=f"removing a stale {name}")
        # Created directly in the two namespaces: the pair never exists in the root namespace.
        _run(
            [
                *("ip", "link", "add", lab.veth, "netns", lab.netns, "type", "veth"),
                *("peer", "name", lab.inet_veth, "netns", lab.inet_netns),
            ],
            what="creating the veth pair between the lab and the fake internet",
        )
    sides = (
        (lab.netns, lab.veth, lab.lab_v4, lab.lab_v6, lab.inet_v4.ip, lab.inet_v6.ip),
        (lab.inet_netns, lab.inet_veth, lab.inet_v4, lab.inet_v6, lab.lab_v4.ip, lab.lab_v6.ip),
    )
    for ns, dev, v4, v6, gw4, gw6 in sides:
        what = f"configuring {dev} in {ns}"
        _ip(ns, "addr", "replace", str(v4), "dev", dev, what=what)
        # nodad: otherwise the address is "tentative" for ~2 s and the first v6 connect fails.
        _ip(ns, "addr", "replace", str(v6), "dev", dev, "nodad", what=what)
        _ip(ns, "link", "set", dev, "up", what=what)
        _ip(ns, "route", "replace", "default", "via", str(gw4), "dev", dev, what=what)
        _ip(ns, "-6", "route", "replace", "default", "via", str(gw6), "dev", dev, what=what)
    for server in (*lab.servers, dns.DNS_SERVER):
        prefix = 32 if server.version == 4 else 128
        _ip(lab.inet_netns, "addr", "replace", f"{server}/{prefix}", "dev", "lo", what="servers")
    _sysctl(lab.netns, "net.ipv4.ip_forward", "1")
    _sysctl(lab.netns, "net.ipv6.conf.all.forwarding", "1")
    # The fake internet routes nothing: a packet for an address it does not hold dies there.
    _sysctl(lab.inet_netns, "net.ipv4.ip_forward", "0")
    _sysctl(lab.inet_netns, "net.ipv6.conf.all.forwarding", "0")
    if Path("/proc/sys/net/bridge").is_dir():
        # nwfilter's iptables-level rules only see bridged packets with these on.
        for table in ("iptables", "ip6tables", "arptables"):
            _sysctl(lab.netns, f"net.bridge.bridge-nf-call-{table}", "1")


# ---------------------------------------------------------------------------------------------
# Detached helpers (the inet servers, the libvirtd supervisor): this module run with a hidden verb


def _spawn(lab: Lab, argv: list[str], log: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    with open(lab.file(log), "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=lab.dir,
            env=env,
            start_new_session=True,
        )


def _self_argv(verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "sandbox_lab", verb, *args]


def _ensure_servers(lab: Lab) -> None:
    inet_ns = _lab_netns_id(lab.inet_netns)
    pid = _read_pid_file(lab.file(LAB_SERVERS_PID))
    if pid is not None and _running(pid) and _pid_netns(pid) == inet_ns:
        return
    lab.file(LAB_SERVERS_PID).unlink(missing_ok=True)
    # One accept log per servers' lifetime: "did anything reach the internet" starts empty.
    lab.file(LAB_ACCEPT_LOG).write_text("")
    args = ["--dir", str(lab.dir)]
    args += [a for s in lab.servers for a in ("--addr", str(s))]
    args += [a for p in lab.tcp_ports for a in ("--tcp", str(p))]
    args += [a for p in lab.udp_ports for a in ("--udp", str(p))]
    proc = _spawn(lab, in_inet(lab, _self_argv("_serve", *args)), LAB_SERVERS_LOG)

    def ready() -> bool | None:
        if proc.poll() is not None:
            raise LabError(
                f"the fake-internet servers exited with status {proc.returncode}:\n"
                + _log_tail(lab.file(LAB_SERVERS_LOG)),
                hint=f"see {lab.file(LAB_SERVERS_LOG)}",
            )
        return True if _read_pid_file(lab.file(LAB_SERVERS_PID)) == proc.pid else None

    wait_for(ready, Deadline(20, "the fake-internet servers to listen"), interval=0.05)


def _ensure_dns(lab: Lab) -> None:
    """The fake internet's DNS server (sandbox_lab/dns.py), unless it runs already."""
    pid = _read_pid_file(lab.file(dns.LAB_DNS_PID))
    if pid is not None and _running(pid) and _pid_netns(pid) == _lab_netns_id(lab.inet_netns):
        return
    argv = in_inet(lab, _self_argv("_dns", "--dir", str(lab.dir)))
    dns.ensure(lab.dir, lambda: _spawn(lab, argv, dns.LAB_DNS_LOG))


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _libvirtds() -> list[int]:
    """The libvirtds running, but the lab's remote host's (sandbox_lab/remote.py): that one is
    meant to be outside the lab namespace."""
    from sandbox_lab.remote import REMOTE_NETNS

    remote = _lab_netns_id(REMOTE_NETNS)
    return [p for p in _pids_named("libvirtd") if remote is None or _pid_netns(p) != remote]


def _ensure_libvirtd(lab: Lab) -> None:
    lab_ns = _lab_netns_id(lab.netns)
    for pid in _libvirtds():
        if _pid_netns(pid) != lab_ns:
            raise ConflictError(
                f"libvirtd (pid {pid}) is already running outside the lab namespace {lab.netns}",
                hint=f"stop it first (kill -TERM {pid}), then run `sandbox-lab up` again; "
                "the lab does not kill a libvirtd it did not start",
            )
    proc: subprocess.Popen[bytes] | None = None
    if not _libvirtds():
        args = ["--dir", str(lab.dir)]
        # Only one virtlogd can hold /run/virtlogd.pid; one running anywhere serves the lab too.
        if not _pids_named("virtlogd"):
            args.append("--virtlogd")
        proc = _spawn(lab, in_lab(lab, _self_argv("_supervise", *args)), LAB_SUPERVISOR_LOG)
    log = lab.file(LAB_LIBVIRTD_LOG)

    def accepting() -> bool | None:
        if proc is not None and proc.poll() is not None:
            raise LabError(
                f"the libvirtd supervisor exited with status {proc.returncode}:\n"
                + _log_tail(lab.file(LAB_SUPERVISOR_LOG))
                + "\n"
                + _log_tail(log),
                hint=f"see {log}",
            )
        return True if _socket_accepts(paths.LIBVIRT_SOCKET) else None

    wait_for(
        accepting,
        Deadline(
            120,
            f"libvirtd in {lab.netns} to listen on {paths.LIBVIRT_SOCKET}",
            hint=f"see {log}; its first start probes QEMU for ~12 s",
        ),
    )
    # Imported here: the detached helpers (_serve, _supervise) run this module without libvirt.
    import libvirt

    try:
        libvirt.open(_LIBVIRT_URI).close()
    except libvirt.libvirtError as e:
        raise LabError(
            f"libvirtd in the lab listens but {_LIBVIRT_URI} does not open: {e}",
            hint=f"see {log}",
        ) from e


# ---------------------------------------------------------------------------------------------
# Public API


def lab_up(lab: Lab = DEFAULT_LAB) -> LabStatus:
    """Build the lab, or complete a half-built one; reuses what already runs. Needs root."""
    _require_root()
    with _locked(lab):
        _fix_kvm()
        _load_br_netfilter()
        _ensure_network(lab)
        _ensure_hosts(lab)
        _ensure_servers(lab)
        _ensure_dns(lab)
        _ensure_libvirtd(lab)
    status = lab_status(lab)
    if not status.up:
        raise LabError(
            "the lab came up incomplete: " + "; ".join(status.problems),
            hint="run `sandbox-lab down` and `sandbox-lab up` again",
        )
    return status


def lab_status(lab: Lab = DEFAULT_LAB) -> LabStatus:
    namespaces = tuple(n for n in (lab.netns, lab.inet_netns) if (paths.NETNS_DIR / n).exists())
    lab_ns = _lab_netns_id(lab.netns)
    inet_ns = _lab_netns_id(lab.inet_netns)
    link = (
        len(namespaces) == 2
        and _link_exists(lab.netns, lab.veth)
        and _link_exists(lab.inet_netns, lab.inet_veth)
    )
    supervisor = _read_daemons(lab).get("supervisor")
    supervisor_pid = supervisor if _running(supervisor) else None
    libvirtds = _libvirtds()
    outside = [p for p in libvirtds if _pid_netns(p) != lab_ns]
    inside = [p for p in libvirtds if p not in outside]
    libvirtd_pid = (inside + outside)[0] if libvirtds else None
    libvirtd_in_lab = bool(inside)
    virtlogds = _pids_named("virtlogd")
    servers = _read_pid_file(lab.file(LAB_SERVERS_PID))
    servers_pid = servers if _running(servers) and _pid_netns(servers or 0) == inet_ns else None
    problems = [
        f"namespace {n} missing" for n in (lab.netns, lab.inet_netns) if n not in namespaces
    ]
    if namespaces and not link:
        problems.append(f"veth {lab.veth}/{lab.inet_veth} missing")
    if libvirtd_pid is None:
        problems.append("libvirtd not running")
    problems += [f"libvirtd (pid {p}) runs outside {lab.netns}" for p in outside]
    if servers_pid is None:
        problems.append("fake-internet servers not running")
    return LabStatus(
        namespaces=namespaces,
        link=link,
        supervisor_pid=supervisor_pid,
        libvirtd_pid=libvirtd_pid,
        libvirtd_in_lab=libvirtd_in_lab,
        virtlogd_pid=virtlogds[0] if virtlogds else None,
        servers_pid=servers_pid,
        kvm=_kvm_state(),
        br_netfilter=_br_netfilter_state(lab),
        problems=tuple(problems),
    )


def lab_down(lab: Lab = DEFAULT_LAB) -> list[str]:
    """Stop everything the lab runs and delete both namespaces; idempotent. Returns what it did.

    Guests are not destroyed through libvirt here (the orchestrator's destroy does that): any qemu
    still running in the lab namespace is killed.
    """
    _require_root()
    namespaces = [n for n in (lab.netns, lab.inet_netns) if (paths.NETNS_DIR / n).exists()]
    if not namespaces and not lab.dir.exists():
        return []
    notes: list[str] = []
    with _locked(lab):
        from sandbox_lab.remote import remote_down

        notes += remote_down(lab.dir)  # it hangs off the lab namespace: first
        lab_ns = _lab_netns_id(lab.netns)
        inet_ns = _lab_netns_id(lab.inet_netns)
        in_lab_ns = [] if lab_ns is None else _pids_in_netns(lab_ns)
        supervisor = _read_daemons(lab).get("supervisor")
        first = [p for p in in_lab_ns if p == supervisor or _comm(p) == "libvirtd"]
        notes += _terminate(first, "libvirtd and its supervisor", 20)
        leftovers = [
            p
            for p in in_lab_ns
            if (_comm(p) or "").startswith("qemu") or _comm(p) in ("dnsmasq", "virtlogd")
        ]
        notes += _terminate(leftovers, "qemu/dnsmasq/virtlogd left in the lab", 10)
        servers = _read_pid_file(lab.file(LAB_SERVERS_PID))
        if servers is not None and inet_ns is not None and _pid_netns(servers) == inet_ns:
            notes += _terminate([servers], "the fake-internet servers", 10)
        resolver = _read_pid_file(lab.file(dns.LAB_DNS_PID))
        if resolver is not None and inet_ns is not None and _pid_netns(resolver) == inet_ns:
            notes += _terminate([resolver], "the fake internet's DNS server", 10)
        for ns_id, name in ((lab_ns, lab.netns), (inet_ns, lab.inet_netns)):
            others = [] if ns_id is None else _pids_in_netns(ns_id)
            notes += [
                f"left running in {name} (keeps it alive after delete): pid {p} ({_comm(p)})"
                for p in others
            ]
        for name in namespaces:
            _run(["ip", "netns", "del", name], what=f"deleting namespace {name}")
            notes.append(f"deleted namespace {name}")
        for name in (LAB_DAEMONS, LAB_SERVERS_PID, dns.LAB_DNS_PID):
            lab.file(name).unlink(missing_ok=True)
        if lab.hosts_file.exists():
            lab.hosts_file.unlink()
            with contextlib.suppress(OSError):
                lab.hosts_file.parent.rmdir()
            notes.append(f"removed {lab.hosts_file}")
    return notes


# Host names of the fake internet, for `--allow NAME` in the lab.
LAB_NAMES = {"www.inet.test": ("allowed_server", "server_v6"), "api.inet.test": ("blocked_server",)}


def _ensure_hosts(lab: Lab) -> None:
    """Give processes run in the lab (`ip netns exec` bind-mounts /etc/netns/NS/hosts over
    /etc/hosts for them) names for the fake internet's servers, so that `--allow NAME`, which
    resolves on the host, can be tried: the machine's own /etc/hosts, then the lab's names."""
    own = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
    lines = [f"{getattr(lab, attr)} {name}" for name, attrs in LAB_NAMES.items() for attr in attrs]
    text = own.rstrip("\n") + "\n# sandbox-lab: the fake internet\n" + "\n".join(lines) + "\n"
    lab.hosts_file.parent.mkdir(parents=True, exist_ok=True)
    if not lab.hosts_file.exists() or lab.hosts_file.read_text() != text:
        lab.hosts_file.write_text(text)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, libvirtd)", hint="run it as root")


# ---------------------------------------------------------------------------------------------
# The fake-internet servers (`_serve`, runs inside the inet namespace)


def _serve(lab_dir: Path, addrs: list[IPAddress], tcp: list[int], udp: list[int]) -> int:
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    # The wakeup fd makes select() return at once on SIGTERM instead of at its next timeout.
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ, None)
    for addr in addrs:
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        for proto, kind, ports in (
            ("tcp", socket.SOCK_STREAM, tcp),
            ("udp", socket.SOCK_DGRAM, udp),
        ):
            for port in ports:
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((str(addr), port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(64)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, (proto, str(addr), port))
    with open(lab_dir / LAB_ACCEPT_LOG, "a") as log:
        atomic_write(lab_dir / LAB_SERVERS_PID, f"{os.getpid()}\n", mode=0o644)
        print(f"serving on {', '.join(map(str, addrs))} tcp {tcp} udp {udp}", flush=True)
        while not stop:
            for key, _ in sel.select(timeout=5.0):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        wake_r.recv(64)
                    continue
                proto, addr_text, port = key.data
                _answer(key.fileobj, proto, addr_text, port, log)  # type: ignore[arg-type]
    print("stopped", flush=True)
    return 0


def _answer(sock: socket.socket, proto: str, server: str, port: int, log: IO[str]) -> None:
    banner = f"sandbox-lab inet {server} {proto}/{port}\n".encode()
    if proto == "tcp":
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        _record(log, server, port, proto, peer, None)
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(banner)
        return
    try:
        data, peer = sock.recvfrom(65535)
    except OSError:
        return
    _record(log, server, port, proto, peer, len(data))
    with contextlib.suppress(OSError):
        sock.sendto(banner, peer)


def _record(log: IO[str], server: str, port: int, proto: str, peer: Any, size: int | None) -> None:
    entry: dict[str, Any] = {
        "time": time.time(),
        "server": server,
        "port": port,
        "proto": proto,
        "peer": str(ip_address(peer[0])),
        "peer_port": peer[1],
    }
    if size is not None:
        entry["bytes"] = size
    log.write(json.dumps(entry) + "\n")
    log.flush()


# ---------------------------------------------------------------------------------------------
# The libvirtd supervisor (`_supervise`, runs inside the lab namespace)


def _supervise(lab_dir: Path, start_virtlogd: bool) -> int:
    """Run libvirtd (and virtlogd) as children and reap every orphan at once.

    As a child subreaper this process inherits qemu once libvirtd daemonizes it, and reaps it the
    moment it dies: virDomainDestroy then takes 0.2 s instead of 2 s with a lazy PID 1.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}", flush=True)
        return 1
    children: dict[int, str] = {}
    stopping = False

    def stop_libvirtd() -> None:
        for pid, name in children.items():
            if name == "libvirtd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        stop_libvirtd()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def start(name: str, log: str) -> int:
        with open(lab_dir / log, "ab") as out:
            child = subprocess.Popen(
                [name], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        children[child.pid] = name
        return child.pid

    pids = {"supervisor": os.getpid()}
    if start_virtlogd:
        pids["virtlogd"] = start("virtlogd", LAB_VIRTLOGD_LOG)
    pids["libvirtd"] = start("libvirtd", LAB_LIBVIRTD_LOG)
    atomic_write(lab_dir / LAB_DAEMONS, json.dumps(pids) + "\n", mode=0o644)
    print(f"started {pids}", flush=True)
    if stopping:
        stop_libvirtd()
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        name = children.pop(pid, None)
        if name is None:
            continue  # an orphan (qemu, a helper) reaped at once: the point of the subreaper
        print(f"{name} (pid {pid}) exited, wait status {status}", flush=True)
        if name == "libvirtd":
            # virtlogd outlives libvirtd only to flush logs; without libvirtd the lab is down.
            for other in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    print("supervisor done", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# CLI (argparse: cli.py is the only Typer module)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox-lab",
        description="Run libvirtd in a network namespace with a fake internet next to it.",
    )
    verbs = parser.add_subparsers(
        dest="verb", required=True, metavar="{up,down,status,exec,remote-up,remote-down}"
    )
    verbs.add_parser("up", help="create the namespaces, start the servers and libvirtd")
    verbs.add_parser("down", help="stop everything and delete the namespaces")
    verbs.add_parser(
        "remote-up", help="(after up) a second libvirt host, reached over SSH only: its URI"
    )
    verbs.add_parser("remote-down", help="stop the remote host (down does too)")
    verbs.add_parser("status", help="show what is up")
    run = verbs.add_parser("exec", help="run CMD inside the lab namespace: exec -- CMD...")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    serve = verbs.add_parser("_serve")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--addr", type=ip_address, action="append", default=[])
    serve.add_argument("--tcp", type=int, action="append", default=[])
    serve.add_argument("--udp", type=int, action="append", default=[])
    serve_dns = verbs.add_parser("_dns")
    serve_dns.add_argument("--dir", type=Path, required=True)
    supervise = verbs.add_parser("_supervise")
    supervise.add_argument("--dir", type=Path, required=True)
    supervise.add_argument("--virtlogd", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lab = DEFAULT_LAB
    try:
        if args.verb == "up":
            print("\n".join(lab_up(lab).lines()))
        elif args.verb == "down":
            print("\n".join(lab_down(lab) or ["nothing to do"]))
        elif args.verb == "remote-up":
            _require_root()
            with _locked(lab):
                if not (paths.NETNS_DIR / lab.netns).exists():
                    raise LabError("the lab is not up", hint="run `sandbox-lab up` first")
                from sandbox_lab.remote import remote_up

                host = remote_up(lab.netns, lab.dir)
            print(f"remote libvirt host up: {host.uri}")
            print(f"client (in the lab): HOME={host.home} sandbox --connect '{host.uri}' ...")
        elif args.verb == "remote-down":
            _require_root()
            from sandbox_lab.remote import remote_down

            with _locked(lab):
                print("\n".join(remote_down(lab.dir) or ["nothing to do"]))
        elif args.verb == "status":
            status = lab_status(lab)
            print("\n".join(status.lines()))
            return 0 if status.up else 1
        elif args.verb == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise UsageError("nothing to run", hint="sandbox-lab exec -- CMD [ARGS...]")
            _require_root()
            argv_in_lab = in_lab(lab, cmd)
            os.execvp(argv_in_lab[0], argv_in_lab)
        elif args.verb == "_serve":
            return _serve(args.dir, args.addr, args.tcp, args.udp)
        elif args.verb == "_dns":
            return dns.serve(args.dir, args.dir / LAB_ACCEPT_LOG)
        elif args.verb == "_supervise":
            return _supervise(args.dir, args.virtlogd)
    except SandboxError as e:
        print(f"sandbox-lab: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    return 0

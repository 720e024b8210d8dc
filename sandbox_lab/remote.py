"""The lab's "remote host" (issue 17): a second libvirt host that the client reaches only over SSH.

    sandbox-lab remote-up     # after `sandbox-lab up`: prints the URI and the HOME to use
    sandbox-lab remote-down   # `sandbox-lab down` takes it down too

libvirtd, virtlogd and an OpenSSH sshd run in a network namespace of their own (`sandbox-remote`)
and in a mount namespace of their own, where /run/libvirt, /var/lib/libvirt, /var/log/libvirt,
/var/cache/libvirt and /etc/libvirt are private directories under /run/sandbox-lab/remote: the
lab's own libvirtd and this one share no socket, no definition (pools, networks, filters,
domains) and no file. Its guests' networks live in `sandbox-remote` only; the lab namespace,
where the client runs, reaches `sandbox-remote` through one veth, on the sshd's address, and has
no route to the guests: the client must go through the host, as it would to a real remote
libvirt host. The host's uplink is that same veth: its guests' allowed traffic is NATed out,
through the lab namespace, to the lab's fake internet.

The client's side: a HOME whose ~/.ssh/config and known_hosts name the host (paramiko reads
them there: the jump, SFTP, nft), and a wrapper for libvirt's own OpenSSH client, which reads
the passwd entry's home and not $HOME, named by the URI (`?command=`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

from orchestrator.waits import Deadline, wait_for

REMOTE_NETNS = "sandbox-remote"
VETH_LAB, VETH_REMOTE = "sbrem0", "sbrem1"
# RFC 5737, and clear of the lab's own 192.0.2.0/24 link and of its fake-internet servers.
LINK_LAB = IPv4Interface("198.51.100.253/30")
LINK_REMOTE = IPv4Interface("198.51.100.254/30")
_PRIVATE = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt",
            "/etc/libvirt")  # fmt: skip
_DAEMONS = "daemons.json"
SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


class RemoteError(Exception):
    """The lab's remote host could not be brought up or down."""


@dataclass(frozen=True)
class RemoteHost:
    netns: str
    address: str  # the host's sshd, as the client reaches it
    uri: str  # the libvirt URI to give `sandbox --connect`
    home: Path  # HOME for the client: ~/.ssh/config and known_hosts for the host
    dir: Path  # the host's private directories and files
    libvirtd_pid: int

    def enter(self, argv: list[str]) -> list[str]:
        """argv run inside the host: its network and mount namespaces (libvirtd's)."""
        return ["nsenter", "-t", str(self.libvirtd_pid), "-m", "-n", *argv]

    def private(self, path: str) -> Path:
        """Where one of the host's private directories (a path of _PRIVATE) is, seen from here."""
        return self.dir / path.strip("/").replace("/", "_")


def _sh(argv: list[str], what: str, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RemoteError(f"{what}: {' '.join(argv)}: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read(directory: Path) -> RemoteHost | None:
    try:
        data = json.loads((directory / _DAEMONS).read_text())
        host = RemoteHost(
            netns=data["netns"],
            address=data["address"],
            uri=data["uri"],
            home=Path(data["home"]),
            dir=directory,
            libvirtd_pid=int(data["libvirtd"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return host if _alive(host.libvirtd_pid) else None


def _copy_libvirt_config(target: Path) -> None:
    """/etc/libvirt without any definition of the lab's libvirtd (pools, networks, domains,
    the sandbox's own filters): the daemons' settings and libvirt's stock nwfilters."""
    shutil.copytree("/etc/libvirt", target, symlinks=True)
    for gone in ("storage", "qemu/networks", "qemu/autostart", "secrets"):
        shutil.rmtree(target / gone, ignore_errors=True)
    (target / "qemu" / "networks").mkdir(parents=True, exist_ok=True)
    for path in (target / "qemu").glob("*.xml"):
        path.unlink()
    for path in (target / "nwfilter").glob("sandbox*.xml"):
        path.unlink()


def remote_up(lab_netns: str, lab_dir: Path) -> RemoteHost:
    """Bring the remote host up beside the lab namespace `lab_netns` (which must exist), or
    return the one already up."""
    directory = lab_dir / "remote"
    running = _read(directory)
    if running is not None:
        return running
    remote_down(lab_dir)
    directory.mkdir(parents=True)
    _sh(["ip", "netns", "add", REMOTE_NETNS], "creating the remote host's namespace")
    ip_lab, ip_remote = ["ip", "-n", lab_netns], ["ip", "-n", REMOTE_NETNS]
    # The lab's end of an earlier link: a deleted namespace can outlive its name for a while
    # (seen for minutes after a remote host with guests was taken down), and its end of the
    # veth with it. Deleting this end removes the pair.
    subprocess.run([*ip_lab, "link", "del", VETH_LAB], capture_output=True, timeout=60)
    _sh([*ip_lab, "link", "add", VETH_LAB, "type", "veth", "peer", "name", VETH_REMOTE,
         "netns", REMOTE_NETNS], "linking the remote host to the lab")  # fmt: skip
    _sh([*ip_lab, "addr", "add", str(LINK_LAB), "dev", VETH_LAB], "addressing the link")
    _sh([*ip_remote, "addr", "add", str(LINK_REMOTE), "dev", VETH_REMOTE], "addressing the link")
    for argv in ([*ip_lab, "link", "set", VETH_LAB, "up"],
                 [*ip_remote, "link", "set", VETH_REMOTE, "up"],
                 [*ip_remote, "link", "set", "lo", "up"],
                 [*ip_remote, "route", "add", "default", "via", str(LINK_LAB.ip)]):  # fmt: skip
        _sh(argv, "bringing the link up")
    enter_ns = ["ip", "netns", "exec", REMOTE_NETNS]
    if Path("/proc/sys/net/bridge").is_dir():
        # nwfilter's iptables-level rules only see bridged packets with these on (per namespace).
        for table in ("iptables", "ip6tables", "arptables"):
            _sh([*enter_ns, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{table}=1"], "sysctl")

    private = {path: directory / path.strip("/").replace("/", "_") for path in _PRIVATE}
    for path, mine in private.items():
        if path == "/etc/libvirt":
            _copy_libvirt_config(mine)
        elif path == "/var/cache/libvirt" and Path(path).is_dir():
            # The lab libvirtd's probe of QEMU: a fresh one costs ~12 s at the first start.
            shutil.copytree(path, mine, symlinks=True)
        else:
            mine.mkdir(parents=True)

    ssh_dir = directory / "ssh"
    ssh_dir.mkdir()
    for key in ("host_key", "client_key"):
        _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sandbox-lab-remote-{key}",
             "-f", str(ssh_dir / key)], "making a key")  # fmt: skip
    shutil.copyfile(ssh_dir / "client_key.pub", ssh_dir / "authorized_keys")
    address = str(LINK_REMOTE.ip)
    (ssh_dir / "sshd_config").write_text(
        "\n".join(
            [
                f"ListenAddress {address}",
                "Port 22",
                f"HostKey {ssh_dir / 'host_key'}",
                f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "StrictModes no",
                "UsePAM no",
                f"PidFile {directory / 'sshd.pid'}",
                f"Subsystem sftp {SFTP_SERVER}",
                "",
            ]
        )
    )
    home = directory / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host {address}\n  User root\n  IdentityFile {ssh_dir / 'client_key'}\n"
        "  IdentitiesOnly yes\n  GlobalKnownHostsFile /dev/null\n"
    )
    host_key = (ssh_dir / "host_key.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"{address} {host_key[0]} {host_key[1]}\n")
    wrapper = directory / "ssh-for-libvirt"
    wrapper.write_text(
        "#!/bin/sh\n# libvirt's OpenSSH client reads the passwd home, not $HOME: name the lab's.\n"
        f"exec ssh -F {home / '.ssh' / 'config'} "
        f'-o UserKnownHostsFile={home / ".ssh" / "known_hosts"} "$@"\n'
    )
    wrapper.chmod(0o755)

    binds = "\n".join(f"mount --bind {mine} {path}" for path, mine in private.items())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    script = f"""set -e
{binds}
virtlogd -d -p {directory / "virtlogd.pid"}
libvirtd -d -p {directory / "libvirtd.pid"}
{SSHD} -f {ssh_dir / "sshd_config"} -E {directory / "sshd.log"}
"""
    _sh([*enter_ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        "starting the remote host's daemons")  # fmt: skip
    socket_path = private["/run/libvirt"] / "libvirt-sock"
    wait_for(
        lambda: True if socket_path.exists() and (directory / "libvirtd.pid").exists() else None,
        Deadline(60, "the remote host's libvirtd to listen", f"see {directory}"),
        interval=0.1,
    )
    pid = int((directory / "libvirtd.pid").read_text().split()[0])
    uri = f"qemu+ssh://root@{address}/system?command={wrapper}"
    host = RemoteHost(REMOTE_NETNS, address, uri, home, directory, pid)
    record = {"netns": REMOTE_NETNS, "address": address, "uri": uri, "home": str(home)}
    (directory / _DAEMONS).write_text(json.dumps({**record, "libvirtd": pid}) + "\n")
    return host


def _pids_in(netns: str) -> list[int]:
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry))
    return found


def _comm(pid: int) -> str | None:
    """The process's name; None once it is gone (it may end between the listing and this)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def remote_down(lab_dir: Path) -> list[str]:
    """Stop everything in the remote host's namespace (libvirtd first, then whatever QEMU,
    dnsmasq, sshd and virtlogd it left) and delete it and its files; idempotent."""
    notes = []
    directory = lab_dir / "remote"
    for signal_number, what in ((15, "libvirtd"), (15, "the rest"), (9, "what stayed")):
        pids = _pids_in(REMOTE_NETNS)
        if what == "libvirtd":
            pids = [p for p in pids if _comm(p) == "libvirtd"]
        for pid in pids:
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                continue
            notes.append(f"signalled {pid} ({what})")
        end = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
    if Path(f"/run/netns/{REMOTE_NETNS}").exists():
        # The link first: the namespace may outlive its name (remote_up), and the link with it.
        subprocess.run(
            ["ip", "-n", REMOTE_NETNS, "link", "del", VETH_REMOTE], capture_output=True, timeout=60
        )
        _sh(["ip", "netns", "del", REMOTE_NETNS], "deleting the remote host's namespace")
        notes.append(f"deleted namespace {REMOTE_NETNS}")
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        notes.append(f"removed {directory}")
    return notes


def run_with_remote(argv: Sequence[str]) -> int:
    """Run `argv` inside the lab with the lab's remote host up for it and down after, its URI and
    HOME appended (`--uri URI --home HOME`): how benchmarks re-execute themselves. From the root
    namespace (remote_up needs the lab namespace to exist)."""
    from sandbox_lab import DEFAULT_LAB, run_in_lab

    host = remote_up(DEFAULT_LAB.netns, DEFAULT_LAB.dir)
    try:
        return run_in_lab([*argv, "--uri", host.uri, "--home", str(host.home)])
    finally:
        remote_down(DEFAULT_LAB.dir)


def client_env(env: Mapping[str, str], uri: str, home: str) -> dict[str, str]:
    """`env` for a `sandbox` client of the remote host: its ssh config and known_hosts (HOME) and
    its URI. XDG_DATA_HOME defaults to a path under HOME: pinned first, so the images stay where
    they are."""
    images = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return {**env, "XDG_DATA_HOME": images, "HOME": home, "SANDBOX_CONNECT": uri}

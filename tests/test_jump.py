"""Reaching a guest through the libvirt host as an SSH jump (orchestrator/vm/jump.py).

The real tests build three network namespaces: the client (where the test's sockets live), the
"libvirt host" with a real OpenSSH sshd, and the "guest" with another sshd, reachable only from
the libvirt host's namespace: the client has no route to it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from orchestrator.errors import GuestError, HostKeyMismatchError, TimeoutExpired, UsageError
from orchestrator.vm.guest import Endpoint, Guest, wait_for_banner, wait_for_sshd
from orchestrator.vm.jump import guest_route, resolve
from orchestrator.vm.remoteuri import JumpTarget, jump_target, proxy_command
from orchestrator.waits import Deadline
from tests.netns import inside

from .sshd_fixture import SSHD, Sshd, keygen, make_sshd

# --- pure: URIs and SSH config -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("qemu:///system", None),
        ("qemu:///session", None),
        ("test:///default", None),
        ("qemu+unix:///system", None),
        ("qemu+ssh://root@kvm1/system", JumpTarget("kvm1", user="root")),
        ("qemu+ssh://kvm1/system", JumpTarget("kvm1")),
        (
            "qemu+ssh://ops@kvm1.example.org:2222/system?keyfile=/k/id&no_verify=1",
            JumpTarget("kvm1.example.org", user="ops", port=2222, keyfile=Path("/k/id")),
        ),
        ("qemu+libssh2://u@h/system", JumpTarget("h", user="u")),
        ("qemu+libssh://u@h:23/system", JumpTarget("h", user="u", port=23)),
        ("qemu+ssh://u@[2001:db8::1]:2200/system", JumpTarget("2001:db8::1", "u", 2200)),
        # Not SSH: user and port are libvirt's, so only the host name is kept.
        ("qemu+tcp://sasluser@kvm2:16509/system", JumpTarget("kvm2")),
        ("qemu+tls://kvm3/system", JumpTarget("kvm3")),
        ("qemu://kvm3/system", JumpTarget("kvm3")),
    ],
)
def test_jump_target_of_a_uri(uri: str, expected: JumpTarget | None) -> None:
    assert jump_target(uri) == expected


@pytest.mark.parametrize(
    "uri", ["qemu+ssh://u@h:port/system", "qemu+ssh://-oProxyCommand=x/system", "qemu+ssh://@/x"]
)
def test_bad_remote_uris_are_refused(uri: str) -> None:
    with pytest.raises(UsageError):
        jump_target(uri)


def test_ssh_config_completes_what_the_uri_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    config = paramiko.SSHConfig.from_text(
        "Host kvm1\n  HostName 192.0.2.50\n  User ops\n  Port 2200\n  IdentityFile ~/.ssh/kvm\n"
        "  UserKnownHostsFile ~/.ssh/kh1 /etc/kh2\n  IdentitiesOnly yes\n"
        "Host *\n  User nobody\n  IdentityFile ~/.ssh/id_other\n"
    )
    host = resolve(jump_target("qemu+ssh://kvm1/system"), config, local_user="me")  # type: ignore[arg-type]
    assert (host.name, host.hostname, host.port, host.user) == ("kvm1", "192.0.2.50", 2200, "ops")
    assert host.identity_files == (
        Path("/home/tester/.ssh/kvm"),
        Path("/home/tester/.ssh/id_other"),
    )
    assert host.identities_only and host.keyfile is None
    assert host.known_hosts[:2] == (Path("/home/tester/.ssh/kh1"), Path("/etc/kh2"))
    assert Path("/etc/ssh/ssh_known_hosts") in host.known_hosts
    assert host.key_name() == "[192.0.2.50]:2200"
    assert str(host) == "ops@kvm1:2200" and host.ssh_command() == "ssh -p 2200 ops@kvm1"
    assert host.proxy_command is None

    # The URI's own values win, as on libvirt's ssh command line; its keyfile is tried first.
    host = resolve(
        jump_target("qemu+ssh://root@kvm1:22/system?keyfile=/k/id"),  # type: ignore[arg-type]
        config,
        local_user="me",
    )
    assert (host.port, host.user, host.keyfile) == (22, "root", Path("/k/id"))
    assert host.identity_files[0] == Path("/k/id") and host.key_name() == "192.0.2.50"


def test_without_ssh_config_the_defaults_of_ssh() -> None:
    host = resolve(JumpTarget("kvm9"), paramiko.SSHConfig(), local_user="me")
    assert (host.hostname, host.port, host.user, host.identity_files) == ("kvm9", 22, "me", ())
    assert not host.identities_only
    assert host.known_hosts[0] == Path(os.path.expanduser("~/.ssh/known_hosts"))


def test_known_hosts_none_and_aliases_and_proxyjump() -> None:
    config = paramiko.SSHConfig.from_text(
        "Host kvm1\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile none\n"
        "  HostKeyAlias kvm-alias\n  ProxyJump bastion1,ops@bastion2:2022\n"
    )
    host = resolve(JumpTarget("kvm1"), config, local_user="me")
    assert host.known_hosts == () and host.key_name() == "kvm-alias"
    assert host.proxy_command == "ssh -J bastion1 -p 2022 -W '[kvm1]:22' -- ops@bastion2"
    one_hop = paramiko.SSHConfig.from_text("Host kvm1\n  ProxyJump [2001:db8::5]:2022\n")
    host = resolve(JumpTarget("kvm1", port=2200), one_hop, local_user="me")
    assert host.proxy_command == "ssh -p 2022 -W '[kvm1]:2200' -- 2001:db8::5"


def test_proxy_command_for_openssh() -> None:
    assert proxy_command("qemu:///system") is None
    assert (
        proxy_command("qemu+ssh://ops@kvm1:2222/system?keyfile=/k/my%25key")
        == "ssh -o StrictHostKeyChecking=yes -W [%h]:%p -p 2222 -i /k/my%%key ops@kvm1"
    )
    assert proxy_command("qemu+tls://kvm3/system") == (
        "ssh -o StrictHostKeyChecking=yes -W [%h]:%p kvm3"
    )


# --- real: three namespaces, two sshds ---------------------------------------------------------

JUMP_IP, CLIENT_IP = "192.0.2.2", "192.0.2.1"
GUEST_IP, JUMP_INNER_IP = "198.51.100.2", "198.51.100.1"
JUMP_PORT = 2222
# The name the URI and ~/.ssh/config use for the libvirt host.
HOST_ALIAS = "libvirt-host"
URI = f"qemu+ssh://{HOST_ALIAS}/system"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@dataclass
class JumpLab:
    client: str  # the test's namespace
    jump: Sshd  # the "libvirt host"
    guest: Sshd
    home: Path  # $HOME while the test runs: its .ssh/config names the libvirt host

    def trust_jump(self, public_line: str | None = None) -> None:
        """Record the jump's host key (or another one) in the user's known_hosts."""
        fields = (public_line or self.jump.host_key).split()
        line = f"[{JUMP_IP}]:{JUMP_PORT} {fields[0]} {fields[1]}\n"
        (self.home / ".ssh" / "known_hosts").write_text(line)

    def established(self, address: str, port: int) -> list[str]:
        """The TCP connections established to address:port in the libvirt host's namespace."""
        assert self.jump.netns is not None
        out = subprocess.run(
            ["ip", "netns", "exec", self.jump.netns, "ss", "-Htn", "state", "established",
             "src", f"{address}:{port}"],
            check=True, capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
        return out.splitlines()

    def guest_endpoint(self, **changes: object) -> Endpoint:
        return self.guest.endpoint(**{"user": "root", **changes})


def _root_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("ip", "ssh-keygen", "ssh") if shutil.which(t) is None]
    if not SSHD.exists():
        missing.append(str(SSHD))
    return f"missing: {', '.join(missing)}" if missing else None


@pytest.fixture
def jumplab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JumpLab]:
    reason = _root_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"sbxjump{os.getpid() % 100000}"
    client, jump, guest = f"{tag}-c", f"{tag}-j", f"{tag}-g"
    made: list[str] = []
    servers: list[Sshd] = []
    try:
        for ns in (client, jump, guest):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        # Made inside the namespaces, so the names never meet the host's interfaces.
        sh("ip", "-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "j0",
           "netns", jump)  # fmt: skip
        sh("ip", "-n", jump, "link", "add", "j1", "type", "veth", "peer", "name", "g0",
           "netns", guest)  # fmt: skip
        for ns, dev, address in (
            (client, "c0", f"{CLIENT_IP}/24"),
            (jump, "j0", f"{JUMP_IP}/24"),
            (jump, "j1", f"{JUMP_INNER_IP}/24"),
            (guest, "g0", f"{GUEST_IP}/24"),
        ):
            sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns in made:
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        servers.append(make_sshd(tmp_path / "jump", port=JUMP_PORT, address=JUMP_IP, netns=jump))
        servers.append(make_sshd(tmp_path / "guest", port=22, address=GUEST_IP, netns=guest))
        for server in servers:
            server.start()
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(
            f"Host {HOST_ALIAS}\n  HostName {JUMP_IP}\n  Port {JUMP_PORT}\n  User root\n"
            f"  IdentityFile {servers[0].client_key}\n  GlobalKnownHostsFile /dev/null\n"
        )
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        lab = JumpLab(client, servers[0], servers[1], home)
        lab.trust_jump()
        yield lab
    finally:
        for server in servers:
            server.stop()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=20)


def deadline(seconds: float = 15) -> Deadline:
    return Deadline(seconds, "SSH to the guest through the jump", "look at the sshd logs")


@pytest.mark.root
def test_banner_and_login_through_one_jump_connection(jumplab: JumpLab) -> None:
    with inside(jumplab.client), guest_route(URI) as opener:
        banner = wait_for_banner(GUEST_IP, 22, deadline(), opener=opener)
        with Guest.connect(jumplab.guest_endpoint(), deadline(), opener=opener) as g:
            seen_as = g.check("echo $SSH_CONNECTION").split()
            during = jumplab.established(JUMP_IP, JUMP_PORT)
    assert banner.startswith("SSH-2.0-OpenSSH")
    assert len(during) == 1 and f"{CLIENT_IP}:" in during[0]
    # The guest saw both connections come from the libvirt host, not from the client...
    assert seen_as[0] == JUMP_INNER_IP
    assert len(jumplab.guest.connections()) == 2
    assert all(f"from {JUMP_INNER_IP} " in line for line in jumplab.guest.connections())
    # ...and the libvirt host had one SSH connection from the client, for both.
    assert len(jumplab.jump.connections()) == 1
    assert f"from {CLIENT_IP} " in jumplab.jump.connections()[0]
    # Closed with the route: nothing of the client's stays established on the libvirt host.
    assert wait_until(lambda: jumplab.established(JUMP_IP, JUMP_PORT) == [])


def wait_until(done: Callable[[], bool], seconds: float = 5) -> bool:
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.root
def test_without_the_jump_there_is_no_route(jumplab: JumpLab) -> None:
    start = time.monotonic()
    with inside(jumplab.client), pytest.raises(GuestError, match="no route") as caught:
        wait_for_banner(GUEST_IP, 22, deadline(30), no_route_seconds=0.5)
    assert time.monotonic() - start < 10
    assert "libvirt host" not in caught.value.message
    assert jumplab.guest.connections() == []


@pytest.mark.root
def test_an_unknown_jump_host_key_is_refused_with_how_to_trust_it(jumplab: JumpLab) -> None:
    (jumplab.home / ".ssh" / "known_hosts").unlink()
    with inside(jumplab.client), guest_route(URI) as opener, pytest.raises(GuestError) as caught:
        wait_for_banner(GUEST_IP, 22, deadline(), opener=opener)
    assert "not in" in caught.value.message and "refused" in caught.value.message
    assert caught.value.hint is not None
    assert f"`ssh -p {JUMP_PORT} root@{HOST_ALIAS}`" in caught.value.hint
    # Refused before logging in, and nothing was forwarded to the guest.
    assert "Accepted publickey" not in jumplab.jump.log.read_text()
    assert jumplab.guest.connections() == []


@pytest.mark.root
def test_a_changed_jump_host_key_is_refused(jumplab: JumpLab, tmp_path: Path) -> None:
    jumplab.trust_jump(keygen(tmp_path / "other", "other"))
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        pytest.raises(HostKeyMismatchError, match="changed") as caught,
    ):
        Guest.connect(jumplab.guest_endpoint(), deadline(), opener=opener)
    assert caught.value.hint is not None and f"ssh-keygen -R [{JUMP_IP}]:{JUMP_PORT}" in (
        caught.value.hint
    )
    assert jumplab.guest.connections() == []


@pytest.mark.root
def test_a_changed_guest_host_key_is_still_refused_through_the_jump(
    jumplab: JumpLab, tmp_path: Path
) -> None:
    other = keygen(tmp_path / "other", "other")
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        pytest.raises(HostKeyMismatchError, match="pinned"),
    ):
        Guest.connect(jumplab.guest_endpoint(host_key=other), deadline(), opener=opener)
    assert "Accepted publickey" not in jumplab.guest.log.read_text()


@pytest.mark.root
def test_a_guest_sshd_not_up_yet_is_retried_until_the_deadline(jumplab: JumpLab) -> None:
    """Nothing listens on the guest's port 23: the host's refusals are retried like local
    ones, over the same jump connection, and the timeout names the host."""
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        pytest.raises(TimeoutExpired) as caught,
    ):
        wait_for_banner(GUEST_IP, 23, deadline(2), opener=opener)
    assert "refused (from the libvirt host root@libvirt-host:2222)" in caught.value.message
    assert len(jumplab.jump.connections()) == 1


@pytest.mark.root
def test_no_route_from_the_jump_host_fails_within_seconds(jumplab: JumpLab) -> None:
    start = time.monotonic()
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        pytest.raises(GuestError, match=r"the libvirt host .* has no route") as caught,
    ):
        wait_for_banner("203.0.113.5", 22, deadline(30), opener=opener, no_route_seconds=0.5)
    assert time.monotonic() - start < 10
    assert caught.value.hint is not None and "namespace" in caught.value.hint


@pytest.mark.root
def test_a_refused_login_to_the_jump_host_says_how_to_check(jumplab: JumpLab) -> None:
    config = jumplab.home / ".ssh" / "config"
    config.write_text(config.read_text().replace("User root", "User nobody"))
    with inside(jumplab.client), guest_route(URI) as opener, pytest.raises(GuestError) as caught:
        wait_for_banner(GUEST_IP, 22, deadline(), opener=opener)
    assert "refused SSH login as nobody" in caught.value.message
    assert caught.value.hint is not None and "ssh -p 2222 nobody@libvirt-host true" in (
        caught.value.hint
    )


@pytest.mark.root
def test_openssh_reaches_the_guest_through_the_proxy_command(jumplab: JumpLab) -> None:
    """What `sandbox ssh` adds for a remote host, run by OpenSSH itself. ssh reads its config
    from the home in the password database, so a private mount namespace puts ours there."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    proxy = proxy_command(URI)
    assert proxy is not None
    known = jumplab.home / "guest_known_hosts"
    known.write_text(f"{GUEST_IP} {' '.join(jumplab.guest.host_key.split()[:2])}\n")
    argv = [
        "ssh", "-F", "/dev/null", "-i", str(jumplab.guest.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", f"ProxyCommand={proxy}",
        f"root@{GUEST_IP}", "echo $SSH_CONNECTION",
    ]  # fmt: skip
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    script = f"mount --bind {shlex.quote(str(jumplab.home))} {shlex.quote(str(real_home))} && "
    script += shlex.join(["ip", "netns", "exec", jumplab.client, *argv])
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == JUMP_INNER_IP


def test_a_local_uri_gets_plain_tcp() -> None:
    from orchestrator.vm.guest import tcp_connect

    with guest_route("qemu:///system") as opener:
        assert opener is tcp_connect


@pytest.mark.root
def test_a_proxy_command_in_the_ssh_config_carries_the_jump(jumplab: JumpLab) -> None:
    """A libvirt host that the user reaches through a ProxyCommand: here OpenSSH's `ssh -W`
    into the libvirt host's own sshd, so it sees that hop and the jump's login."""
    key, known = jumplab.jump.client_key, jumplab.home / ".ssh" / "known_hosts"
    hop = (
        f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known} "
        f"-o GlobalKnownHostsFile=/dev/null -p {JUMP_PORT} -W %h:%p root@{JUMP_IP}"
    )
    config = jumplab.home / ".ssh" / "config"
    config.write_text(config.read_text() + f"  ProxyCommand {hop}\n")
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        Guest.connect(jumplab.guest_endpoint(), deadline(), opener=opener) as g,
    ):
        seen_as = g.check("echo $SSH_CONNECTION").split()
    assert seen_as[0] == JUMP_INNER_IP
    # The ProxyCommand's connection, then the jump's own login through it (from the jump).
    sources = [line.split()[2] for line in jumplab.jump.connections()]
    assert sources == [CLIENT_IP, JUMP_IP]


@pytest.mark.root
def test_open_guest_of_a_sandbox_on_a_remote_host_goes_through_the_jump(
    jumplab: JumpLab, tmp_path: Path
) -> None:
    """The wiring: a sandbox whose state names a remote URI is reached by `open_guest` (exec,
    run, status, logs --sockets) through its host, with the sandbox's pinned key."""
    from orchestrator import lifecycle, paths
    from orchestrator.config import Settings
    from orchestrator.state import Phase, SandboxState
    from orchestrator.vm.domain import Accel

    dirs = paths.Dirs(data=tmp_path / "data", state=tmp_path / "state", config=tmp_path / "cfg")
    ctx = lifecycle.Context(settings=Settings(), dirs=dirs)
    state = SandboxState(
        name="remote1", phase=Phase.READY, created="x", uri=URI, domain="sandbox-remote1",
        pool="sandbox", network="sandbox-remote1", volumes=(), image="i", image_hash="h",
        accel=Accel.TCG, mac="52:54:00:00:00:01", ip=GUEST_IP, host_key=jumplab.guest.host_key,
    )  # fmt: skip
    ctx.store.save(state)
    ctx.store.write_secret("remote1", paths.CLIENT_KEY, jumplab.guest.client_key.read_text())
    with inside(jumplab.client), lifecycle.open_guest(ctx, "remote1") as g:
        seen_as = g.check("echo $SSH_CONNECTION").split()
    assert seen_as[0] == JUMP_INNER_IP
    assert len(jumplab.jump.connections()) == 1


def _drop_ssh_at_the_guest(jumplab: JumpLab) -> None:
    """The guest's own firewall drops what comes to its port 22: no reply, no refusal."""
    assert jumplab.guest.netns is not None
    sh("ip", "netns", "exec", jumplab.guest.netns, "iptables", "-I", "INPUT", "-p", "tcp",
       "--dport", "22", "-j", "DROP")  # fmt: skip


@pytest.mark.root
def test_a_guest_whose_packets_are_dropped_fails_within_seconds(jumplab: JumpLab) -> None:
    """Not the boot timeout: connects that time out with no refusal for `silent_seconds`."""
    _drop_ssh_at_the_guest(jumplab)
    assert jumplab.jump.netns is not None
    start = time.monotonic()
    with (
        inside(jumplab.jump.netns),
        pytest.raises(GuestError, match="nothing answers on TCP port 22") as caught,
    ):
        wait_for_banner(GUEST_IP, 22, deadline(60), silent_seconds=3)
    assert 3 <= time.monotonic() - start < 15
    assert caught.value.hint is not None and "firewall" in caught.value.hint


@pytest.mark.root
def test_dropped_packets_through_the_jump_fail_within_seconds(jumplab: JumpLab) -> None:
    _drop_ssh_at_the_guest(jumplab)
    start = time.monotonic()
    with (
        inside(jumplab.client),
        guest_route(URI) as opener,
        pytest.raises(GuestError, match="nothing answers on TCP port 22"),
    ):
        wait_for_banner(GUEST_IP, 22, deadline(60), opener=opener, silent_seconds=3)
    assert 3 <= time.monotonic() - start < 15


@pytest.mark.root
def test_a_refusal_is_an_answer_not_silence(jumplab: JumpLab) -> None:
    """Port 23 refuses (RST): the wait goes on until its deadline, as while sshd starts."""
    assert jumplab.jump.netns is not None
    with inside(jumplab.jump.netns), pytest.raises(TimeoutExpired):
        wait_for_banner(GUEST_IP, 23, deadline(4), silent_seconds=1)


@pytest.mark.root
def test_the_login_goes_on_the_channel_the_banner_came_on(jumplab: JumpLab) -> None:
    """up's path: wait_for_sshd's channel through the libvirt host is the login's too."""
    with inside(jumplab.client), guest_route(URI) as opener:
        primed = wait_for_sshd(GUEST_IP, 22, deadline(), opener=opener)
        with Guest.connect(jumplab.guest_endpoint(), deadline(), opener=opener, first=primed) as g:
            assert g.check(["echo", "in"]).strip() == "in"
    assert len(jumplab.guest.connections()) == 1
    assert len(jumplab.jump.connections()) == 1

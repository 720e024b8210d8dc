"""The host-side input guard of the sandbox network (hostguard.py): the rendered ruleset (golden),
and the real nft in a network namespace of the test's own: loaded, replaced, removed, and what it
lets through from a "guest" veth on a bridge to a listener on the host's bridge address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator import names
from orchestrator.egress import hostguard

from .conftest import Golden

BRIDGE = "virbr-sandbox"


def test_golden(golden: Golden) -> None:
    golden.check("hostguard.nft", hostguard.render_ruleset(BRIDGE))


def test_table_name_is_an_nft_identifier() -> None:
    name = names.guard_table("virbr-sbx.1")
    assert name == "sandbox_guard_virbr_sbx_1"
    assert all(c.isalnum() or c == "_" for c in name)


def test_only_replies_and_the_network_services_pass() -> None:
    rules = hostguard.render_ruleset(BRIDGE).splitlines()
    body = [r.strip() for r in rules if r.startswith("\t\t")]
    assert body[1] == 'iifname != "virbr-sandbox" accept'
    assert body[2].startswith("ct state established,related accept")
    # The final rule rejects whatever else arrives on the bridge.
    assert body[-1].startswith("counter reject")
    accepted = " ".join(r for r in body if " accept" in r)
    assert "tcp dport 22" not in accepted and "sport" not in accepted


def sh(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    )


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A "host" namespace with a bridge at 10.213.0.1 and a "guest" namespace at 10.213.0.2 on a
    veth port of it: only this test's own addresses, no route anywhere else."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    host, guest = f"hg-host-{os.getpid()}", f"hg-guest-{os.getpid()}"
    for ns in (host, guest):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(host, "ip", "link", "add", BRIDGE, "type", "bridge")
        sh(host, "ip", "link", "add", "hg-port", "type", "veth", "peer", "name", "hg-guest")
        sh(host, "ip", "link", "set", "hg-guest", "netns", guest)
        sh(host, "ip", "link", "set", "hg-port", "master", BRIDGE, "up")
        sh(host, "ip", "addr", "add", "10.213.0.1/24", "dev", BRIDGE)
        sh(host, "ip", "link", "set", BRIDGE, "up")
        sh(host, "ip", "link", "set", "lo", "up")
        sh(guest, "ip", "addr", "add", "10.213.0.2/24", "dev", "hg-guest")
        sh(guest, "ip", "link", "set", "hg-guest", "up")
        sh(guest, "ip", "link", "set", "lo", "up")
        yield host, guest
    finally:
        for ns in (host, guest):
            subprocess.run(["ip", "netns", "del", ns], check=False)


LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.213.0.1", 8088)); s.listen(); s.settimeout(8)
print("listening", flush=True)
try:
    c, peer = s.accept(); c.sendall(b"host-service"); print("accepted", peer[1], flush=True)
except OSError:
    print("nothing", flush=True)
"""

CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout(3)
if len(sys.argv) > 1:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.213.0.2", int(sys.argv[1])))
try:
    s.connect(("10.213.0.1", 8088)); print(s.recv(64).decode())
except OSError as exc:
    print("failed", exc)
"""


def attempt(host: str, guest: str, *sport: str) -> tuple[str, str]:
    """Connect from the "guest" to the "host" bridge address; (guest's view, listener's view)."""
    listener = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-c", LISTEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        seen = sh(guest, sys.executable, "-c", CONNECT, *sport).stdout.strip()
        listener.terminate()
        heard = listener.stdout.read().strip()
    finally:
        listener.kill()
        listener.wait()
    return seen, heard


@pytest.mark.root
def test_guard_in_a_real_namespace(netns: tuple[str, str]) -> None:
    host, guest = netns
    # Without the guard a guest reaches the host's listener, from any source port.
    assert attempt(host, guest, "22") == ("host-service", "accepted 22")

    assert _in(host, "apply") == "None"
    assert _in(host, "present") == "True"
    # Applied twice: replaced in one transaction, still one table with one chain.
    _in(host, "apply")
    listing = sh(host, "nft", "list", "table", "inet", names.guard_table(BRIDGE)).stdout
    assert listing.count("chain input") == 1 and listing.count("reject") == 1

    # The forged management reply (source port 22) and a plain connect are both refused.
    for sport in ("22", ""):
        seen, heard = attempt(host, guest, *([sport] if sport else []))
        assert seen.startswith("failed"), seen
        assert heard == "", heard
    # The host's own connections to the guest still get their replies.
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            guest,
            sys.executable,
            "-c",
            "import socket; s=socket.socket(); s.bind(('10.213.0.2', 2222)); s.listen();"
            "print('up', flush=True); c,_=s.accept(); c.sendall(b'guest-sshd')",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        reply = sh(
            host,
            sys.executable,
            "-c",
            "import socket; s=socket.create_connection(('10.213.0.2', 2222), 3);"
            "print(s.recv(64).decode())",
        ).stdout.strip()
        assert reply == "guest-sshd"
    finally:
        server.kill()
        server.wait()

    assert _in(host, "remove") == "True"
    assert _in(host, "present") == "False"
    assert _in(host, "remove") == "False"
    assert attempt(host, guest, "22") == ("host-service", "accepted 22")


def _in(netns: str, what: str) -> str:
    """hostguard.<what>(BRIDGE) run inside `netns` (nft acts on the namespace it runs in)."""
    code = f"from orchestrator.egress import hostguard; print(hostguard.{what}({BRIDGE!r}))"
    return sh(netns, sys.executable, "-c", code).stdout.strip()

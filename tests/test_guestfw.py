"""The push of the guest's rules over a real SSH session to a real sshd, whose "guest" is a network
namespace of its own with a real kernel firewall: loaded, or (a cold boot's seed loaded them)
only read back; and the login on the connection the banner wait made."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.egress import guestfw
from orchestrator.errors import GuestError
from orchestrator.vm.guest import Guest, wait_for_sshd
from orchestrator.waits import Deadline
from tests.netns import inside

from .sshd_fixture import Sshd, SshdFactory, sshd_factory
from .test_firewall import REPRESENTATIVE, policy, rules

__all__ = ["sshd_factory"]  # a fixture, imported for pytest

pytestmark = pytest.mark.root

# A blocked destination behind a veth of the namespace: what goes there passes the
# OUTPUT chain's `-j SBX-BLOCK`, whose counter tells whether the rules were loaded again.
DUMMY_NET, BLOCKED = "192.0.2.1/24", "192.0.2.9"


def sh(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=True, timeout=30
    ).stdout


@dataclass
class Box:
    netns: str
    sshd: Sshd

    def opener(self, host: str, port: int, timeout: float) -> socket.socket:
        with inside(self.netns):
            return socket.create_connection((host, port), timeout=timeout)

    def connect(self) -> Guest:
        return Guest.connect(self.sshd.endpoint(), Deadline(20, "sshd"), opener=self.opener)

    def restore(self, text: str, version: int) -> None:
        tool = "iptables-restore" if version == 4 else "ip6tables-restore"
        sh("ip", "netns", "exec", self.netns, tool, stdin=text)

    def blocked_count(self) -> int:
        """Packets the `-A OUTPUT -j SBX-BLOCK` rule has seen (iptables-save -c)."""
        saved = sh("ip", "netns", "exec", self.netns, "iptables-save", "-c", "-t", "filter")
        found = re.search(r"^\[(\d+):\d+\] -A OUTPUT -j SBX-BLOCK$", saved, re.M)
        assert found, saved
        return int(found.group(1))

    def send_blocked(self) -> None:
        with inside(self.netns):
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with probe, contextlib.suppress(OSError):  # REJECT may answer the sendto itself
            probe.sendto(b"x", (BLOCKED, 9))


@pytest.fixture
def box(sshd_factory: SshdFactory) -> Iterator[Box]:
    netns = f"sbx-gfw-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        sh("ip", "-n", netns, "addr", "add", DUMMY_NET, "dev", "d0")
        sh("ip", "-n", netns, "link", "set", "d0", "up")
        sh("ip", "-n", netns, "link", "set", "d1", "up")
        server = sshd_factory(netns=netns, port=22)
        server.start()
        yield Box(netns, server)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=30)


WANTED = {version: rules(REPRESENTATIVE, version) for version in (4, 6)}


def _digest_line(texts: dict[int, str]) -> str:
    return "loaded " + " ".join(hashlib.sha256(texts[v].encode()).hexdigest() for v in (4, 6))


def test_the_marker_line_is_sha256sum_of_the_seed_files() -> None:
    assert guestfw.marker_line(WANTED) == _digest_line(WANTED)


def test_rules_in_place_are_read_back_not_loaded_again(box: Box, tmp_path: Path) -> None:
    for version in (4, 6):
        box.restore(WANTED[version], version)
    box.send_blocked()
    assert box.blocked_count() == 1
    marker = tmp_path / "seed-policy"
    marker.write_text(guestfw.marker_line(WANTED) + "\n")
    with box.connect() as guest:
        status, output = guestfw.apply(
            guest, WANTED, then="echo then-ran", preloaded=True, marker=str(marker)
        )
    assert (status, output) == (0, "then-ran")
    assert box.blocked_count() == 1  # iptables-restore would have zeroed it


@pytest.mark.parametrize(
    "marker_text",
    [None, "none", "failed", _digest_line({4: "other\n", 6: WANTED[6]})],
    ids=["no-marker", "none", "failed", "other-rules"],
)
def test_without_a_matching_marker_the_rules_are_loaded(
    box: Box, tmp_path: Path, marker_text: str | None
) -> None:
    for version in (4, 6):
        box.restore(WANTED[version], version)
    box.send_blocked()
    marker = tmp_path / "seed-policy"
    if marker_text is not None:
        marker.write_text(marker_text + "\n")
    with box.connect() as guest:
        guestfw.apply(guest, WANTED, preloaded=True, marker=str(marker))
    assert box.blocked_count() == 0


def test_a_marker_that_lies_is_caught_by_the_read_back(box: Box, tmp_path: Path) -> None:
    """The marker says the policy is loaded; the kernel holds another: the read-back fails."""
    other = {version: rules(policy("198.51.100.1"), version) for version in (4, 6)}
    for version in (4, 6):
        box.restore(other[version], version)
    marker = tmp_path / "seed-policy"
    marker.write_text(guestfw.marker_line(WANTED) + "\n")
    with box.connect() as guest, pytest.raises(GuestError, match="differs from the policy"):
        guestfw.apply(guest, WANTED, preloaded=True, marker=str(marker))


def test_the_login_uses_the_connection_the_banner_came_on(box: Box) -> None:
    endpoint = box.sshd.endpoint()
    primed = wait_for_sshd(endpoint.host, endpoint.port, Deadline(20, "sshd"), opener=box.opener)
    guest = Guest.connect(endpoint, Deadline(20, "login"), opener=box.opener, first=primed)
    with guest:
        assert guest.check(["echo", "in"]).strip() == "in"
    assert len(box.sshd.connections()) == 1, box.sshd.connections()


def test_files_the_seed_wrote_are_not_written_again(box: Box, tmp_path: Path) -> None:
    """A cold boot's cloud-init wrote the xdebug files before sshd started: kept as they are.
    One missing: all are written."""
    written, kept = tmp_path / "a" / "written.ini", tmp_path / "b" / "kept.ini"
    kept.parent.mkdir()
    kept.write_text("from the seed\n")
    files = {str(written): "new\n", str(kept): "new\n"}
    for version in (4, 6):
        box.restore(WANTED[version], version)
    marker = tmp_path / "seed-policy"
    marker.write_text(guestfw.marker_line(WANTED) + "\n")
    with box.connect() as guest:
        guestfw.apply(guest, WANTED, files=files, preloaded=True, marker=str(marker))
        assert written.read_text() == kept.read_text() == "new\n"
        kept.write_text("from the seed\n")
        guestfw.apply(guest, WANTED, files=files, preloaded=True, marker=str(marker))
        assert kept.read_text() == "from the seed\n"


def test_then_runs_beside_the_read_back_and_its_output_comes_whole(box: Box) -> None:
    then = "printf 'a %%s\\n' 1; echo 'b\\\\c' >&2; exit 3"
    with box.connect() as guest:
        status, output = guestfw.apply(guest, WANTED, then=then)
    assert (status, output) == (3, "a %s\nb\\c")

"""The network-namespace lab: real namespaces, real libvirtd, real sockets (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import libvirt
import pytest

from orchestrator.errors import ConflictError, UsageError
from sandbox_lab import (
    Lab,
    accept_log,
    describe_kvm,
    in_lab,
    lab_down,
    lab_status,
    lab_up,
)
from sandbox_lab.remote import VETH_LAB

from .lab_fixture import LabSession

# Runs inside the lab namespace: one TCP connection or one datagram, then prints what happened.
_CLIENT = """
import json, socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
with socket.socket(family, kind) as s:
    s.settimeout(5)
    s.connect((host, port))
    if proto == "udp":
        s.send(b"lab-test")
    reply = s.recv(200).decode()
    print(json.dumps({"local_port": s.getsockname()[1], "reply": reply}))
"""


def _from_lab(lab: Lab, proto: str, host: IPv4Address | IPv6Address, port: int) -> dict[str, Any]:
    argv = in_lab(lab, [sys.executable, "-c", _CLIENT, proto, str(host), str(port)])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def _logged(
    lab: Lab, proto: str, server: object, port: int, peer_port: int
) -> list[dict[str, Any]]:
    # The log outlives the lab (it is in /run): an entry of an earlier session may share the
    # ephemeral port by chance. Only this minute's entries are this test's.
    return [
        e
        for e in accept_log(lab)
        if (e["proto"], e["server"], e["port"], e["peer_port"])
        == (proto, str(server), port, peer_port)
        and e["time"] > time.time() - 60
    ]


def _links(ns: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-d", "-j", "-n", ns, "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    links: list[dict[str, Any]] = json.loads(out)
    return links


# --- pure ------------------------------------------------------------------------------------


def test_lab_refuses_addresses_outside_the_documentation_ranges() -> None:
    with pytest.raises(UsageError):
        replace(Lab(), allowed_server=IPv4Address("8.8.8.8"))
    with pytest.raises(UsageError):
        replace(Lab(), server_v6=IPv6Address("2606:4700::1111"))


def test_in_lab_prefixes_ip_netns_exec() -> None:
    assert in_lab(Lab(netns="x"), ["sandbox", "up"]) == [
        "ip",
        "netns",
        "exec",
        "x",
        "sandbox",
        "up",
    ]


def test_accept_log_skips_a_line_still_being_written(tmp_path: Path) -> None:
    lab = Lab(dir=tmp_path)
    (tmp_path / "inet-accept.jsonl").write_text('{"port": 80}\n{"port": 4')
    assert accept_log(lab) == [{"port": 80}]
    assert accept_log(Lab(dir=tmp_path / "absent")) == []


def test_describe_kvm() -> None:
    assert describe_kvm(0o20660, "root", "kvm") == "root:kvm 0660"


# --- the real lab ----------------------------------------------------------------------------


@pytest.mark.root
def test_up_is_idempotent(lab: Lab) -> None:
    before = lab_status(lab)
    again = lab_up(lab)
    assert again.up, again.problems
    assert again.libvirtd_in_lab
    assert (again.libvirtd_pid, again.servers_pid) == (before.libvirtd_pid, before.servers_pid)
    assert set(again.namespaces) == {lab.netns, lab.inet_netns}


@pytest.mark.root
def test_libvirt_answers_from_the_root_namespace(lab: Lab) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        assert conn.getHostname()
        caps = ET.fromstring(conn.getCapabilities())
    finally:
        conn.close()
    types = {
        d.get("type")
        for g in caps.findall("guest")
        if g.find("arch") is not None and g.find("arch").get("name") == "x86_64"  # type: ignore[union-attr]
        for d in g.findall("arch/domain")
    }
    assert "qemu" in types


@pytest.mark.root
def test_tcp_from_the_lab_reaches_the_allowed_server_and_is_logged(lab: Lab) -> None:
    result = _from_lab(lab, "tcp", lab.allowed_server, 80)
    assert result["reply"] == f"sandbox-lab inet {lab.allowed_server} tcp/80\n"
    [entry] = _logged(lab, "tcp", lab.allowed_server, 80, result["local_port"])
    assert entry["peer"] == str(lab.lab_v4.ip)
    assert abs(entry["time"] - time.time()) < 60


@pytest.mark.root
def test_udp_to_the_blocked_server_is_logged(lab: Lab) -> None:
    result = _from_lab(lab, "udp", lab.blocked_server, 53)
    [entry] = _logged(lab, "udp", lab.blocked_server, 53, result["local_port"])
    assert (entry["peer"], entry["bytes"]) == (str(lab.lab_v4.ip), len(b"lab-test"))


@pytest.mark.root
def test_ipv6_from_the_lab_reaches_the_v6_server(lab: Lab) -> None:
    result = _from_lab(lab, "tcp", lab.server_v6, 80)
    assert result["reply"] == f"sandbox-lab inet {lab.server_v6} tcp/80\n"
    [entry] = _logged(lab, "tcp", lab.server_v6, 80, result["local_port"])
    assert entry["peer"] == str(lab.lab_v6.ip)


@pytest.mark.root
def test_the_veth_joins_the_two_lab_namespaces_and_nothing_else(lab: Lab) -> None:
    root_names = {link["ifname"] for link in _links_root()}
    assert not root_names & {lab.veth, lab.inet_veth}
    [lab_end] = [link for link in _links(lab.netns) if link["ifname"] == lab.veth]
    [inet_end] = [link for link in _links(lab.inet_netns) if link["ifname"] == lab.inet_veth]
    # Each end's peer index is the other end's index: the pair connects exactly these two.
    assert lab_end["link_index"] == inet_end["ifindex"]
    assert inet_end["link_index"] == lab_end["ifindex"]


def _links_root() -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    links: list[dict[str, Any]] = json.loads(out.stdout)
    return links


@pytest.mark.root
@pytest.mark.parametrize("side", ["lab", "inet"])
def test_a_namespace_holds_only_lo_the_veth_and_libvirts_links(lab: Lab, side: str) -> None:
    ns, veth = (lab.netns, lab.veth) if side == "lab" else (lab.inet_netns, lab.inet_veth)
    for link in _links(ns):
        kind = link.get("linkinfo", {}).get("info_kind")
        name = link["ifname"]
        ours = (name == "lo" and kind is None) or (name == veth and kind == "veth")
        by_libvirt = side == "lab" and kind in ("bridge", "tun")
        # The lab's end of the link to its remote libvirt host (sandbox_lab/remote.py), while
        # that host is up (another test module's, or by hand).
        to_remote = side == "lab" and name == VETH_LAB and kind == "veth"
        assert ours or by_libvirt or to_remote, f"unexpected link in {ns}: {name} ({kind})"


@pytest.mark.root
def test_up_refuses_a_libvirtd_outside_the_lab_and_leaves_it_alone(
    lab: Lab, tmp_path: Path
) -> None:
    # A stand-in: a process whose name is libvirtd, running in the root namespace.
    impostor = tmp_path / "libvirtd"
    shutil.copy("/bin/sleep", impostor)
    proc = subprocess.Popen([str(impostor), "30"])
    try:
        with pytest.raises(ConflictError, match=f"pid {proc.pid}") as raised:
            lab_up(lab)
        assert raised.value.hint and "stop it first" in raised.value.hint
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _nat_network_xml(name: str, bridge: str) -> str:
    net = ET.Element("network")
    ET.SubElement(net, "name").text = name
    ET.SubElement(net, "forward", mode="nat")
    ET.SubElement(net, "bridge", name=bridge, stp="off")
    ET.SubElement(net, "ip", address="203.0.113.129", netmask="255.255.255.128")
    return ET.tostring(net, encoding="unicode")


@pytest.mark.root
def test_a_libvirt_nat_network_lands_in_the_lab_not_the_root_namespace(lab: Lab) -> None:
    bridge = "labtestbr0"
    conn = libvirt.open("qemu:///system")
    try:
        net = conn.networkCreateXML(_nat_network_xml("lab-test-nat", bridge))
        try:
            lab_links = {link["ifname"]: link for link in _links(lab.netns)}
            assert lab_links[bridge]["linkinfo"]["info_kind"] == "bridge"
            assert bridge not in {link["ifname"] for link in _links_root()}
            lab_rules = subprocess.run(
                in_lab(lab, ["iptables-save"]), capture_output=True, text=True, check=True
            ).stdout
            root_rules = subprocess.run(
                ["iptables-save"], capture_output=True, text=True, check=True
            ).stdout
            assert bridge in lab_rules
            assert bridge not in root_rules
        finally:
            net.destroy()
    finally:
        conn.close()


@pytest.mark.root
def test_the_subreaper_reaps_qemu_at_once(lab: Lab) -> None:
    status = lab_status(lab)
    if status.supervisor_pid is None:
        pytest.skip("libvirtd in the lab was not started by the lab's supervisor")
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = "lab-test-reaper"
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(root, "vcpu").text = "1"
    ET.SubElement(ET.SubElement(root, "os"), "type", arch="x86_64").text = "hvm"
    ET.SubElement(root, "devices")
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.createXML(ET.tostring(root, encoding="unicode"), 0)
        try:
            qemu = int(Path("/run/libvirt/qemu/lab-test-reaper.pid").read_text())
            stat_line = Path(f"/proc/{qemu}/stat").read_text()
            ppid = int(stat_line[stat_line.rfind(")") + 2 :].split()[1])
            assert ppid == status.supervisor_pid
            started = time.monotonic()
            dom.destroy()
            took = time.monotonic() - started
        except BaseException:
            dom.destroy()  # transient: destroying it also removes it
            raise
    finally:
        conn.close()
    # Measured: 0.2 s under a subreaper, 1.4-2.1 s when a lazy PID 1 reaps qemu.
    assert took < 1.0


@pytest.mark.root
def test_down_removes_the_namespaces_and_the_daemons(lab_session: LabSession) -> None:
    if not lab_session.started_here:
        pytest.skip("the lab was up before this session: someone may be using it")
    lab = lab_session.lab
    before = lab_status(lab)
    pids = [before.supervisor_pid, before.libvirtd_pid, before.servers_pid]
    notes = lab_down(lab)
    assert f"deleted namespace {lab.netns}" in notes
    after = lab_status(lab)
    assert after.namespaces == ()
    assert (after.libvirtd_pid, after.servers_pid, after.supervisor_pid) == (None, None, None)
    assert all(pid is not None and not os.path.exists(f"/proc/{pid}/ns") for pid in pids)
    assert not lab.hosts_file.exists(), "the lab's host names outlived it"
    assert not [n for n in lab_down(lab) if n.startswith(("stopped", "killed", "deleted"))]
    # Leave the lab as the session fixture expects it (it tears it down at the end).
    assert lab_up(lab).up


@pytest.mark.root
def test_inside_tells_the_lab_namespace_from_the_root_one(lab: Lab) -> None:
    from sandbox_lab import inside

    assert not inside(lab)
    probe = [sys.executable, "-c", "from sandbox_lab import inside; print(inside())"]
    result = subprocess.run(in_lab(lab, probe), capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.root
def test_the_fake_internet_has_names_inside_the_lab_only(lab: Lab) -> None:
    """`--allow NAME` resolves on the host: in the lab, names for the fake internet's servers."""
    inside = subprocess.run(
        in_lab(lab, ["getent", "ahosts", "www.inet.test"]), capture_output=True, text=True
    ).stdout
    assert str(lab.allowed_server) in inside and str(lab.server_v6) in inside
    api = subprocess.run(in_lab(lab, ["getent", "hosts", "api.inet.test"]), capture_output=True)
    assert str(lab.blocked_server).encode() in api.stdout
    # The machine's own namespace knows nothing of them.
    outside = subprocess.run(["getent", "hosts", "www.inet.test"], capture_output=True)
    assert outside.returncode != 0

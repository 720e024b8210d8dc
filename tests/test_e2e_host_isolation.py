"""Guest root against the host itself, with a real VM in the lab (issue 12, items 3 and 4).

- The management channel opens nothing else: root in the guest forges the management session's
  source port (SNAT to 22), which the stateless host-side filter lets out to the gateway, and
  connects to a listener on the host's bridge address. The host's input guard (hostguard.py)
  must refuse it, while the host's own SSH sessions keep working.
- No spoofing: root in the guest takes another address of its network (each sandbox has one of
  its own, but an address of another sandbox's network is as easily claimed). What it sends
  from that address must not reach the host (the DNS log would blame another sandbox), and its
  ARP answers for it must not be believed (it would steal another sandbox's management session).
- Root in the guest blinds its own capture: the host's flow record (hostflows.py) still holds
  every flow it starts, and `sandbox logs` names what the guest's record lacks.
- Destroy removes the network, its guard and its DNS log (e2e_support.leftovers).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from orchestrator import names
from orchestrator.egress import hostfilter
from orchestrator.vm.domain import DNSMASQ_DIR, NetworkSpec
from orchestrator.waits import Deadline, wait_for
from sandbox_lab import Lab, in_lab

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "lguard"
ALLOWED = "203.0.113.7"
SERVER6 = "2001:db8:1::9"
PORT = 8088

LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(30)
print("listening", flush=True)
try:
    c, peer = s.accept(); c.sendall(b"host-service"); print("accepted", peer, flush=True)
except OSError:
    pass
"""

# Connect from the guest and print what came back (or the error), as JSON.
CONNECT_PHP = r"""
$f = @fsockopen($argv[1], (int)$argv[2], $errno, $errstr, 5);
echo json_encode(["reply" => $f ? (string)fread($f, 64) : "", "error" => "$errno $errstr"]);
"""

# A DNS query for $argv[3] sent to the gateway's resolver from source address $argv[2].
DNS_FROM_PHP = r"""
$labels = "";
foreach (explode(".", $argv[3]) as $l) { $labels .= chr(strlen($l)) . $l; }
$q = pack("nnnnnn", 0x4242, 0x0100, 1, 0, 0, 0) . $labels . "\x00" . pack("nn", 1, 1);
$ctx = stream_context_create(["socket" => ["bindto" => $argv[2] . ":0"]]);
$s = @stream_socket_client("udp://" . $argv[1] . ":53", $errno, $errstr, 2,
                           STREAM_CLIENT_CONNECT, $ctx);
if ($s === false) { echo json_encode(["answered" => false, "error" => "$errno $errstr"]); exit; }
fwrite($s, $q);
stream_set_timeout($s, 2);
$r = @fread($s, 512);
echo json_encode(["answered" => is_string($r) && strlen($r) >= 12, "error" => ""]);
"""


def as_root(cli: Cli, script: str) -> str:
    return cli.ok("exec", "--name", NAME, "--", "sh", "-c", script, timeout=120).stdout


def php(cli: Cli, code: str, *args: str) -> dict[str, str]:
    out = cli.ok("exec", "--name", NAME, "--", "php", "-r", code, *args, timeout=120).stdout
    data: dict[str, str] = json.loads(out)
    return data


def network(conn: libvirt.virConnect) -> tuple[ET.Element, str]:
    dom = conn.lookupByName(f"sandbox-{NAME}")
    source = ET.fromstring(dom.XMLDesc(0)).find("devices/interface/source")
    assert source is not None
    net = conn.networkLookupByName(source.get("network", ""))
    return ET.fromstring(net.XMLDesc(0)), str(net.bridgeName())


def test_guest_root_reaches_no_host_service_and_forges_no_address(cli: Cli, lab: Lab) -> None:
    cli.ok("up", "--name", NAME, "--allow", ALLOWED, "--allow", f"[{SERVER6}]:80")
    state = json.loads((cli.sandbox_dir(NAME) / "state.json").read_text())
    guest_ip, mac = state["ip"], state["mac"]
    conn = libvirt.open("qemu:///system")
    try:
        net_xml, bridge = network(conn)
        # The address the guest got is the one kept for its MAC, which the filter pins.
        kept = {(h.get("mac"), h.get("ip")) for h in net_xml.iter("host") if h.get("mac")}
        assert (mac, guest_ip) in kept
        ref = ET.fromstring(conn.lookupByName(f"sandbox-{NAME}").XMLDesc(0)).find(
            "devices/interface/filterref"
        )
        assert ref is not None
        params = [(p.get("name"), p.get("value")) for p in ref.findall("parameter")]
    finally:
        conn.close()
    ip_el, ip6_el = net_xml.find("ip"), net_xml.find("ip[@family='ipv6']")
    assert ip_el is not None and ip6_el is not None
    gateway = ipaddress.IPv4Address(ip_el.get("address", ""))
    subnet = ipaddress.IPv4Network(f"{gateway}/{ip_el.get('netmask')}", strict=False)
    gateway6 = ipaddress.IPv6Address(ip6_el.get("address", ""))
    subnet6 = ipaddress.IPv6Network(f"{gateway6}/{ip6_el.get('prefix')}", strict=False)
    spec = NetworkSpec(f"sandbox-{NAME}", bridge, subnet, subnet6)
    assert (str(spec.gateway), guest_ip) == (str(gateway), str(spec.guest_ip))
    guest_ip6 = str(spec.guest_ip6)
    assert params == [
        ("IP", guest_ip),
        ("IPV6", guest_ip6),
        ("IPV6", str(hostfilter.link_local(mac))),
    ]
    # The guest configures the IPv6 address kept for it (RA, DHCPv6 by DUID-LL through the
    # filter) and reaches the allowed IPv6 server from it.
    wait_for(
        lambda: True if guest_ip6 in as_root(cli, "ip -6 addr show scope global") else None,
        Deadline(120, f"the guest to configure {guest_ip6} by DHCPv6"),
        interval=2,
    )
    assert php(cli, CONNECT_PHP, f"[{SERVER6}]", "80")["reply"].startswith("sandbox-lab inet")
    tables = subprocess.run(
        in_lab(lab, ["nft", "list", "tables"]), capture_output=True, text=True, check=True
    ).stdout
    assert names.guard_table(bridge) in tables

    # Recorded on both sides while the guest's records are intact.
    assert php(cli, CONNECT_PHP, ALLOWED, "80")["reply"].startswith("sandbox-lab inet")

    # Root in the guest: no firewall of its own, and the management reply's source port forged.
    as_root(
        cli,
        "for t in iptables ip6tables; do for tb in filter nat mangle raw; do "
        "$t -t $tb -F; $t -t $tb -X; done; $t -P OUTPUT ACCEPT; done; "
        f"iptables -t nat -A POSTROUTING -p tcp -d {gateway} --dport {PORT} "
        f"-j SNAT --to-source {guest_ip}:22",
    )
    listener = subprocess.Popen(
        in_lab(lab, [sys.executable, "-c", LISTEN, str(gateway), str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        result = php(cli, CONNECT_PHP, str(gateway), str(PORT))
        listener.terminate()
        heard = listener.stdout.read()
    finally:
        listener.kill()
        listener.wait()
    print("forged source port 22:", result, "listener:", heard)
    assert result["reply"] == "", "the guest reached a service on the host's bridge address"
    assert "accepted" not in heard
    # The host's own management session still works after that: exec needs it.
    assert as_root(cli, "echo alive").strip() == "alive"

    # Root in the guest takes a free address of the network as a second one.
    dev = as_root(cli, f"ip -o route get {gateway} | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'")
    dev = dev.strip()
    taken = {str(gateway), guest_ip, *(h.get("ip") for h in net_xml.iter("host"))}
    forged = next(str(a) for a in reversed(list(subnet.hosts())) if str(a) not in taken)
    as_root(cli, f"ip addr add {forged}/{subnet.prefixlen} dev {dev}")
    tag = f"{os.getpid()}-{NAME}"
    own = php(cli, DNS_FROM_PHP, str(gateway), guest_ip, f"own-{tag}.invalid")
    spoofed = php(cli, DNS_FROM_PHP, str(gateway), forged, f"forged-{tag}.invalid")
    print("dns from own address:", own, "from", forged, ":", spoofed)
    assert own["answered"], "the resolver did not answer the guest's own address"
    assert not spoofed["answered"], f"the host answered a query sent from {forged}"
    dns_log = Path(DNSMASQ_DIR) / f"{net_xml.findtext('name')}.queries.log"
    logged = dns_log.read_text(errors="replace") if dns_log.exists() else ""
    assert f"own-{tag}.invalid" in logged
    assert f"forged-{tag}.invalid" not in logged, "a forged query reached the host's resolver"

    # The same with IPv6: a query from the guest's own address is answered, one from a forged
    # address of the network is dropped on the host.
    forged6 = str(subnet6.network_address + 0x10000 + 12)
    as_root(cli, f"ip -6 addr add {forged6}/{subnet6.prefixlen} dev {dev} nodad")
    own6 = php(cli, DNS_FROM_PHP, f"[{gateway6}]", f"[{guest_ip6}]", f"own6-{tag}.invalid")
    spoofed6 = php(cli, DNS_FROM_PHP, f"[{gateway6}]", f"[{forged6}]", f"forged6-{tag}.invalid")
    print("dns over IPv6 from own address:", own6, "from", forged6, ":", spoofed6)
    assert own6["answered"] and not spoofed6["answered"]
    logged = dns_log.read_text(errors="replace")
    assert f"own6-{tag}.invalid" in logged and f"forged6-{tag}.invalid" not in logged

    # The host asks who has the forged address: the guest's answer must not be believed.
    subprocess.run(in_lab(lab, ["ping", "-c", "2", "-W", "1", forged]), capture_output=True)
    neigh = subprocess.run(
        in_lab(lab, ["ip", "neigh", "show", forged, "dev", bridge]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print("neighbour entry for the forged address:", neigh.strip() or "(none)")
    assert mac.lower() not in neigh.lower(), f"the host believed the guest owns {forged}"

    # Root in the guest blinds its own capture too: what it then starts is only in the host's
    # record, and `logs` says which destinations the guest's record lacks.
    # In one exec: every exec collects when it ends, and a collection attaches the capture again.
    blinded = as_root(
        cli,
        "sbx-capture unload && "
        + shlex.join(["php", "-r", CONNECT_PHP, ALLOWED, "80"])
        + "; echo; "
        + shlex.join(["php", "-r", CONNECT_PHP, "198.51.100.9", "443"])
        + "; echo",
    )
    replies = [json.loads(line) for line in blinded.splitlines() if line.startswith("{")]
    assert replies[0]["reply"].startswith("sandbox-lab inet") and replies[1]["reply"] == ""
    shown = cli.ok("logs", "--name", NAME)
    print(shown.stderr)
    assert "tcp 198.51.100.9:443: 1 on the host, 0 in the guest's record" in shown.stderr
    assert "tcp 203.0.113.7:80: 2 on the host, 1 in the guest's record" in shown.stderr

    cli.ok("destroy", "--name", NAME)
    assert leftovers(NAME, cli) == []
    # The host's record stays with the logs, and holds every flow the guest started.
    host = [
        json.loads(line)
        for line in cli.ok("logs", "--name", NAME, "--host", "--json").stdout.splitlines()
    ]
    dests = [(f["proto"], f["src"], f["dst"], f["dport"]) for f in host]
    assert dests.count(("tcp", guest_ip, ALLOWED, 80)) == 2
    assert ("tcp", guest_ip, "198.51.100.9", 443) in dests
    assert ("tcp", guest_ip, str(gateway), PORT) in dests  # the forged-port attempt, refused
    assert ("udp", forged, str(gateway), 53) in dests  # the forged query, dropped on the host
    conn = libvirt.open("qemu:///system")
    try:
        for net in conn.listAllNetworks(0):
            root = ET.fromstring(net.XMLDesc(0))
            assert not [h for h in root.iter("host") if h.get("mac") == mac], "address kept"
    finally:
        conn.close()

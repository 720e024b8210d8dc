"""Wildcard entries end to end on a real VM (issue 16 item 3): `--allow '*.cdn.inet.test:80'`.

The sandbox's resolver forwards names under cdn.inet.test to the lab's DNS server (the fake
internet's authority for inet.test, sandbox_lab/dns.py) and allows each answer's addresses on
port 80 in both layers before the guest reads the answer. Names outside the wildcard, and the
domain itself, are refused; the handed-out addresses stay closed on other ports. The host layer
is checked alone: with the guest's own rules opened by root, an address the resolver has not
handed out yet stays unreachable, and becomes reachable once a name under the wildcard resolves
to it. The resolver's own loads into the guest's rules are not reported as tampering; root's
change is."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator import names
from orchestrator.egress import wildcards
from sandbox_lab import accept_log, in_lab
from sandbox_lab.dns import DNS_SERVER

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "wild"
WILDCARD = "*.cdn.inet.test:80"
A = ("203.0.113.7", "2001:db8:1::9")  # a.cdn.inet.test in the lab's zone
B = "198.51.100.9"  # b.cdn.inet.test, and api.inet.test

CALLS = """<?php
function connect($host, $port) {
    $c = @fsockopen($host, $port, $errno, $errstr, 5);
    if ($c) { fclose($c); return "ok"; }
    return "failed ($errno)";
}
echo "a:80 ", connect('a.cdn.inet.test', 80), "\\n";
echo "a:443 ", connect('203.0.113.7', 443), "\\n";
echo "apex ", gethostbyname('cdn.inet.test'), "\\n";
echo "api ", gethostbyname('api.inet.test'), "\\n";
"""

# As root: open the guest's own rules, then try B before and after a name resolves to it.
HOST_LAYER = """<?php
shell_exec('iptables -P OUTPUT ACCEPT; iptables -F OUTPUT');
function connect($host, $port) {
    $c = @fsockopen($host, $port, $errno, $errstr, 5);
    if ($c) { fclose($c); return "ok"; }
    return "failed ($errno)";
}
echo "b before ", connect('198.51.100.9', 80), "\\n";
echo "b name ", gethostbyname('b.cdn.inet.test'), "\\n";
echo "b after ", connect('198.51.100.9', 80), "\\n";
"""


def _set(cli: Cli, bridge: str, family: str) -> str:
    table = f"sandbox_guard_{bridge}"
    return subprocess.run(
        in_lab(cli.lab, ["nft", "list", "set", "inet", table, family]),
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def test_wildcard_names_are_allowed_as_the_resolver_hands_them_out(
    cli: Cli, tmp_path: Path
) -> None:
    cli.config.write_text(cli.config.read_text() + f"network:\n  resolvers: [{DNS_SERVER}]\n")
    calls, host_layer = tmp_path / "calls.php", tmp_path / "host_layer.php"
    calls.write_text(CALLS)
    host_layer.write_text(HOST_LAYER)
    cli.ok("up", "--name", NAME, "--allow", WILDCARD)
    try:
        state = json.loads((cli.sandbox_dir(NAME) / "state.json").read_text())
        resolver = state["wildcard_pid"]
        assert wildcards.running(resolver)
        bridge = names.bridge(NAME)
        start = len(accept_log(cli.lab))

        ran = cli.ok("run", "--name", NAME, str(calls))
        assert ran.stdout.splitlines() == [
            "a:80 ok",
            "a:443 failed (111)",
            "apex cdn.inet.test",  # refused: gethostbyname returns the name
            "api api.inet.test",
        ], ran.stdout + ran.stderr
        # Both layers hold a.cdn.inet.test's addresses on port 80 (TCP and UDP), nothing else.
        guest = cli.ok("exec", "--name", NAME, "iptables-save", "-t", "filter")
        assert "-A SBX-WILD -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j SBX-ALLOW" in (
            guest.stdout
        ), guest.stdout
        assert B not in guest.stdout
        assert "203.0.113.7 . tcp . 80" in _set(cli, bridge, "wild4")
        assert "203.0.113.7 . udp . 80" in _set(cli, bridge, "wild4")
        assert B not in _set(cli, bridge, "wild4")
        handed = wildcards.read_handed_out(cli.sandbox_dir(NAME) / "logs")
        assert {(h.name, h.address, h.proto, h.port) for h in handed} >= {
            ("a.cdn.inet.test", "203.0.113.7", "tcp", 80),
        }
        records = cli.records_when(
            NAME,
            lambda rs: (
                any(r["verdict"] == "allowed" and r["dport"] == 80 for r in rs)
                and any(r["verdict"] == "blocked" for r in rs)
            ),
            "the allowed and the blocked connect",
        )
        allowed = [r for r in records if r["verdict"] == "allowed" and r["dport"] == 80]
        assert {r["dst"] for r in allowed} <= set(A), allowed
        assert allowed[0].get("dns_name") == "a.cdn.inet.test", allowed
        # PHP's attempts (a late packet of the host's SSH session may be blocked too: sport 22).
        blocked = {
            (r["dst"], r["dport"])
            for r in records
            if r["verdict"] == "blocked" and "php" in (r.get("exe") or "")
        }
        assert blocked == {("203.0.113.7", 443)}, records
        # The resolver's own loads into the guest's rules are no tampering.
        assert [r for r in records if r["verdict"] == "tamper"] == [], records
        shown = cli.ok("policy", "show", "--name", NAME).stdout
        assert "*.cdn.inet.test:80" in shown and "handed out 203.0.113.7 tcp/80" in shown, shown

        # The host layer alone.
        opened = cli.ok("run", "--name", NAME, "--root", str(host_layer))
        assert opened.stdout.splitlines() == [
            "b before failed (113)",  # the host's guard: admin-prohibited
            f"b name {B}",
            "b after ok",
        ], opened.stdout + opened.stderr
        reached = [
            e
            for e in accept_log(cli.lab)[start:]
            if e["server"] in (*A, B) and e["port"] == 80 and e["proto"] == "tcp"
        ]
        assert [e["server"] for e in reached if e["server"] == B] == [B], reached
        assert any(e["server"] in A for e in reached), reached
        records = cli.records_when(
            NAME,
            lambda rs: any(r["verdict"] == "tamper" for r in rs),
            "root's change of the guest's rules",
        )
        tampered = [r for r in records if r["verdict"] == "tamper"]
        assert tampered and all("sandbox-wild" not in (r.get("cmdline") or "") for r in tampered)
    finally:
        cli.ok("destroy", "--name", NAME, timeout=300)
    assert leftovers(NAME, cli) == []
    assert not wildcards.running(resolver)
    assert _set(cli, bridge, "wild4") == ""

"""DNS names and silent sockets end to end: in a real VM, curl (which resolves in a thread of its
own) and PHP's gethostbyname (the main thread) make queries; every query row in `sandbox logs`
names what it asked, and each attempt to an answer's address names it. A UDP socket connected
outside and never used is a row (`unsent`); glibc's address-sorting probes are hidden unless
`--probes`."""

from __future__ import annotations

from typing import Any

import pytest

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "hbdns"

SCRIPT = r"""
$c = curl_init("http://www.inet.test/");
curl_setopt($c, CURLOPT_RETURNTRANSFER, true);
curl_setopt($c, CURLOPT_TIMEOUT, 10);
curl_exec($c);
echo gethostbyname("api.inet.test"), "\n";
$u = stream_socket_client("udp://198.51.100.9:53", $e, $s, 2);
echo $u ? "connected\n" : "failed: $s\n";
"""


def _php(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "php" in (r.get("exe") or "")]


def test_queries_name_what_they_asked_and_silent_sockets_show(cli: Cli) -> None:
    cli.ok("up", "--name", NAME, "--allow", "www.inet.test")
    out = cli.ok("exec", "--name", NAME, "--", "php", "-r", SCRIPT).stdout
    assert out.splitlines() == ["api.inet.test", "connected"], out

    # The unused socket's row waits out the settle window (its datagram might have followed).
    rows = _php(
        cli.records_when(
            NAME,
            lambda rows: (
                any(r["verdict"] == "probe" for r in rows)
                and any(r["verdict"] == "unsent" for r in rows)
            ),
            "the probes and the unused socket",
            "--probes",
        )
    )
    queries = [r for r in rows if r["verdict"] == "dns"]
    assert queries and all(r["dns_name"] and r["dns_type"] for r in queries), queries
    named = {(r["dns_name"], r["dns_type"]) for r in queries}
    # curl's resolver thread asks A and AAAA on one socket; gethostbyname asks A.
    assert named == {("www.inet.test", "A, AAAA"), ("api.inet.test", "A")}, queries

    connects = [r for r in rows if r["verdict"] == "allowed"]
    assert connects and all(r["dns_name"] == "www.inet.test" for r in connects), connects

    probes = [r for r in rows if r["verdict"] == "probe"]
    assert {(r["proto"], r["dst"], r["dport"], r["dns_name"]) for r in probes} == {
        ("udp", "203.0.113.7", 80, "www.inet.test"),
        ("udp", "2001:db8:1::9", 80, "www.inet.test"),
    }, probes
    unsent = [r for r in rows if r["verdict"] == "unsent"]
    assert [(r["proto"], r["dst"], r["dport"]) for r in unsent] == [("udp", "198.51.100.9", 53)]

    # Probes hidden by default; the unused socket is not.
    default = _php(cli.records(NAME))
    assert not [r for r in default if r["verdict"] == "probe"]
    assert [r["id"] for r in default if r["verdict"] == "unsent"] == [unsent[0]["id"]]

    table = cli.ok("logs", "--name", NAME).stdout
    assert "www.inet.test (A, AAAA)" in table and "unsent" in table and "probe" not in table
    cli.ok("destroy", "--name", NAME)

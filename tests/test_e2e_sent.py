"""What connections sent, end to end on a real VM: the server name of an allowed TLS connection
and the method, Host and path of an allowed HTTP request, read on the host side without
interception, in `sandbox logs --json` and `sandbox report`, with the PHP line behind each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .e2e_support import Cli, leftovers
from .test_e2e_run import line_of

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "sk-sent"

ALLOWED = """<?php
$h = @file_get_contents('http://www.inet.test/api/v1/ping?id=7');
$ctx = stream_context_create(['ssl' => ['verify_peer' => false, 'peer_name' => 'sni.inet.test']]);
$t = @stream_socket_client('tls://203.0.113.7:443', $e, $s, 5, STREAM_CLIENT_CONNECT, $ctx);
echo "done\\n";
"""


def test_allowed_http_and_tls_show_host_path_and_server_name(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "allowed.php"
    script.write_text(ALLOWED)
    cli.ok("up", "--name", NAME, "--allow", "203.0.113.7", "--allow", "www.inet.test")
    try:
        ran = cli.ok("run", "--name", NAME, str(script))
        assert ran.stdout == "done\n", ran.stdout + ran.stderr
        records = cli.records_when(
            NAME,
            lambda rs: sum(1 for r in rs if r.get("sni") or r.get("http")) >= 2,
            "the server name and the HTTP request",
        )
        report = json.loads(cli.ok("report", "--name", NAME, "--json", "-").stdout)
    finally:
        cli.ok("destroy", "--name", NAME, timeout=300)
    assert leftovers(NAME, cli) == []

    sent = {
        (r["dport"], r.get("sni"), r.get("http"), r["stack"][0]["line"])
        for r in records
        if r["verdict"] == "allowed" and (r.get("sni") or r.get("http"))
    }
    assert sent == {
        (80, None, "GET www.inet.test /api/v1/ping?id=7", line_of(script, "file_get_contents")),
        (443, "sni.inet.test", None, line_of(script, "tls://")),
    }
    by_port = {d["port"]: d for d in report["destinations"] if d["verdict"] == "allowed"}
    assert by_port[80]["http"] == ["GET www.inet.test /api/v1/ping?id=7"]
    assert by_port[443]["sni"] == ["sni.inet.test"]

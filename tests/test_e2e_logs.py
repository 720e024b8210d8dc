"""The connection log end to end: a PHP script and a non-PHP program in a real VM make known
numbers of allowed and blocked attempts; `sandbox logs` holds each exactly once, attributed."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import Any

import pytest

from orchestrator import paths
from orchestrator.capture import pcap

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

PHP_ATTEMPTS = r"""
for ($i = 0; $i < 3; $i++) { $f = @fsockopen("203.0.113.7", 80, $e, $s, 5); if ($f) fclose($f); }
for ($i = 0; $i < 2; $i++) { @fsockopen("198.51.100.9", 443, $e, $s, 5); }
$u = @stream_socket_client("udp://198.51.100.9:5353", $e, $s, 2);
@fwrite($u, "ping");
$ip = gethostbyname("phone-home.example");
echo "done\n";
"""


def logs(cli: Cli, *args: str) -> list[dict[str, Any]]:
    out = cli.ok("logs", "--name", "lg", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_every_attempt_once_with_its_process(cli: Cli) -> None:
    cli.ok("up", "--name", "lg", "--allow", "203.0.113.7", "--pcap")
    assert cli.ok("exec", "--name", "lg", "--", "php", "-r", PHP_ATTEMPTS).stdout == "done\n"
    bash = cli.run("exec", "--name", "lg", "--", "bash", "-c", "echo x > /dev/tcp/198.51.100.9/80")
    assert bash.returncode != 0  # refused

    # A connect's record may wait a few seconds for its firewall half: wait for the last one
    # made; after it, a collection adds nothing more.
    records = cli.records_when(
        "lg",
        lambda rows: any(
            "bash" in (r.get("exe") or "") and r["dport"] == 80 and r["verdict"] == "blocked"
            for r in rows
        ),
        "bash's blocked attempt",
    )
    mine = [r for r in records if r["verdict"] in ("allowed", "blocked")]

    def count(exe_part: str, verdict: str, dst: str, dport: int, proto: str = "tcp") -> int:
        return sum(
            1
            for r in mine
            if exe_part in (r.get("exe") or "")
            and r["verdict"] == verdict
            and r["dst"] == dst
            and r["dport"] == dport
            and r["proto"] == proto
        )

    assert count("php", "allowed", "203.0.113.7", 80) == 3, mine
    assert count("php", "blocked", "198.51.100.9", 443) == 2, mine
    assert count("php", "blocked", "198.51.100.9", 5353, "udp") == 1, mine
    assert count("bash", "blocked", "198.51.100.9", 80) == 1, mine
    php = next(r for r in mine if "php" in (r.get("exe") or ""))
    assert php["pid"] and php["uid"] == 0 and "php" in (php["cmdline"] or "")
    # Exactly once: collecting again (every `logs` call collects) adds nothing.
    again = logs(cli)
    known = {r["id"] for r in records}
    assert len(again) == len(records), [r for r in again if r["id"] not in known]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))

    # Filters.
    assert {r["verdict"] for r in logs(cli, "--blocked")} <= {"blocked", "boot"}
    assert all("bash" in (r["exe"] or "") for r in logs(cli, "--process", "bash"))
    assert logs(cli, "--since", "1d") and not logs(cli, "--since", "2099-01-01T00:00:00+00:00")

    # The host saw the DNS query, from this guest, refused (the name is not allowed).
    dns = logs(cli, "--dns")
    asked = [q for q in dns if q["name"] == "phone-home.example"]
    assert asked and all(q["result"] == "REFUSED" for q in asked), dns

    table = cli.ok("logs", "--name", "lg").stdout
    assert "198.51.100.9:443" in table and "blocked" in table
    sockets = cli.ok("logs", "--name", "lg", "--sockets").stdout
    assert "sshd" in sockets

    # --follow shows new attempts as they happen.
    follow = subprocess.Popen(
        cli.argv("logs", "--name", "lg", "--json", "--follow", "--process", "bash"),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )
    try:
        assert follow.stdout is not None
        fd = follow.stdout.fileno()
        pending = b""
        deadline = time.monotonic() + 90

        def next_record() -> dict[str, Any]:
            nonlocal pending
            while b"\n" not in pending:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, "sandbox logs --follow printed nothing before the deadline"
                chunk = os.read(fd, 65536)
                assert chunk, "sandbox logs --follow ended"
                pending += chunk
            line, pending = pending.split(b"\n", 1)
            record: dict[str, Any] = json.loads(line)
            return record

        assert next_record()["dport"] == 80  # the attempt already logged
        cli.run("exec", "--name", "lg", "--", "bash", "-c", "echo > /dev/tcp/198.51.100.9/8080")
        live = next_record()
        while live["dport"] != 8080:
            live = next_record()
        assert live["verdict"] == "blocked"
    finally:
        follow.terminate()
        follow.wait(10)

    before_destroy = len(
        cli.records_when("lg", lambda rows: any(r["dport"] == 8080 for r in rows), "port 8080")
    )
    # An attempt after the last collection (`exec` collects when its command ends): only the
    # final collection of `destroy` brings it home, from the host's copy of the guest's records.
    late = "sleep 2; exec bash -c 'echo > /dev/tcp/198.51.100.9/8181'"
    cli.ok("exec", "--name", "lg", "--", "sh", "-c", f"nohup sh -c {late!r} >/dev/null 2>&1 &")
    time.sleep(4)
    started = time.monotonic()
    destroyed = cli.ok("destroy", "--name", "lg")
    print(f"destroy took {time.monotonic() - started:.2f} s: {destroyed.stderr}")
    assert "(from the host's copy)" in " ".join(destroyed.stderr.split())
    logs_dir = cli.sandbox_dir("lg") / paths.LOGS_DIR
    ring = pcap.ring_files(logs_dir / paths.PCAP_FILE)
    assert ring and ring[0].stat().st_size > 24  # more than a pcap header
    # Kept after destroy, readable, then purged (once the removal is done: `--purge` waits).
    after = logs(cli)
    assert len(after) == before_destroy + 1
    assert [(r["verdict"], r["exe"]) for r in after if r["dport"] == 8181] == [
        ("blocked", "/usr/bin/bash")
    ]
    cli.ok("logs", "--name", "lg", "--purge")
    assert not (logs_dir / paths.CONNECTIONS_LOG).exists()

"""`sandbox serve` end to end on a real VM: a PHP web application in the guest, used from the
host's loopback through the management connection; the attempts each request makes are in the
logs with the request (method and path) and the PHP line; ingress opens no egress; Ctrl-C stops
the server and brings everything home."""

from __future__ import annotations

import re
import select
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.waits import Deadline, wait_for

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "sv"
ALLOWED, BLOCKED = "203.0.113.7", "198.51.100.9"

ROUTER = """<?php
// The lab's web application: each path phones a different place home.
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
if ($path === '/phone') {
    $f = @fsockopen('BLOCKED', 80, $errno, $errstr, 3);
    echo $f ? "reached\\n" : "blocked: $errno\\n";
    return true;
}
if ($path === '/fetch') {
    $page = @file_get_contents('http://ALLOWED/');
    echo $page === false ? "no page\\n" : "page of " . strlen($page) . " bytes\\n";
    return true;
}
if ($path === '/quiet') {
    echo "nothing sent\\n";
    return true;
}
return false; // a static file of the docroot
""".replace("BLOCKED", BLOCKED).replace("ALLOWED", ALLOWED)


def line_of(text: str, needle: str) -> int:
    found = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) == 1, found
    return found[0]


def rules(cli: Cli) -> list[str]:
    """Both layers' rules as `policy show` reads them, without the dump's time and counters."""
    shown = cli.ok("policy", "show", "--name", NAME).stdout
    return [
        re.sub(r"\[\d+:\d+\]", "", line)
        for line in shown.splitlines()
        if not line.lstrip().startswith("#")
    ]


def http_get(cli: Cli, url: str) -> str:
    """A GET from the lab's loopback, where `sandbox serve` listens (it runs in the lab)."""
    result = subprocess.run(
        ["ip", "netns", "exec", cli.lab.netns, "curl", "-sS", "--max-time", "30", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_serve_a_web_application(cli: Cli, tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "public").mkdir(parents=True)
    (app / "public" / "hello.txt").write_text("static hello\n")
    (app / "router.php").write_text(ROUTER)
    cli.ok("up", "--name", NAME, "--allow", ALLOWED)
    rules_before = rules(cli)

    serving = subprocess.Popen(
        cli.argv(
            "serve",
            "--name",
            NAME,
            "--workdir",
            str(app),
            "--docroot",
            "public",
            "--router",
            "router.php",
            "--port",
            "0",
        ),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    errors = serving.stderr
    assert errors is not None
    said = b""
    try:
        deadline = Deadline(180, "sandbox serve to say where it serves")

        def announced() -> str | None:
            nonlocal said
            ready, _, _ = select.select([errors], [], [], 1)
            if ready:
                said += errors.read1(65536)  # type: ignore[attr-defined]
            found = re.search(rb"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C", said)
            assert serving.poll() is None, said.decode(errors="replace")
            return found.group(1).decode() if found else None

        url = wait_for(announced, deadline, interval=0.5, max_interval=1)
        assert http_get(cli, url + "hello.txt") == "static hello\n"
        assert http_get(cli, url + "phone?from=test").startswith("blocked")
        # Allowed through: the lab's server there answers with a banner, not HTTP.
        assert http_get(cli, url + "fetch") == "no page\n"
        assert http_get(cli, url + "quiet") == "nothing sent\n"
        # Ingress opened nothing: the guest's and the host's rules are as `up` left them.
        assert rules(cli) == rules_before
    finally:
        # `ip netns exec` execs the CLI: the signal reaches it as Ctrl-C would.
        serving.send_signal(signal.SIGINT)
        _out, stderr = serving.communicate(timeout=180)
    text = (said + stderr).decode(errors="replace")
    assert serving.returncode == 0, text
    summary = re.search(r"served (\d+) request\(s\) in run (\S+),", text)
    assert summary, text
    assert int(summary.group(1)) == 4, text
    run_id = summary.group(2)
    # The server's own log lines came through (it logs the requests no router answered).
    assert "[200]: GET /hello.txt" in text, text

    rows = cli.records_when(
        NAME,
        lambda rows: any(r.get("request") == "GET /fetch" for r in rows),
        "the /fetch request's attempt",
        "--run",
        run_id,
    )
    by_request = {r.get("request"): r for r in rows if r.get("dport") == 80}
    phone, fetch = by_request.get("GET /phone?from=test"), by_request.get("GET /fetch")
    assert phone and fetch, rows
    assert (phone["dst"], phone["verdict"]) == (BLOCKED, "blocked")
    assert (fetch["dst"], fetch["verdict"]) == (ALLOWED, "allowed")
    assert phone["stack"][0]["function"] == "fsockopen"
    assert phone["stack"][0]["line"] == line_of(ROUTER, "fsockopen")
    assert fetch["stack"][0]["function"] == "file_get_contents"
    assert fetch["stack"][0]["line"] == line_of(ROUTER, "file_get_contents")
    assert all(r["stack"][0]["file"].endswith("/router.php") for r in (phone, fetch))
    # The quiet request and the static file sent nothing.
    assert not [r for r in rows if r.get("request") in ("GET /quiet", "GET /hello.txt")]
    table = cli.ok("logs", "--name", NAME, "--run", run_id).stdout
    assert "http request" in table and "GET /fetch" in table

    # The server is gone from the guest, and the sandbox still runs other things.
    ps = cli.ok("exec", "--name", NAME, "--", "sh", "-c", "pgrep -f '^php -d' || true").stdout
    assert ps.strip() == ""
    cli.ok("destroy", "--name", NAME)


def test_serve_refuses_a_docroot_outside_the_workdir(cli: Cli, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    result = cli.run("serve", "--name", NAME, "--workdir", str(app), "--docroot", "../..")
    assert result.returncode != 0, result.stderr
    assert "is not a directory inside" in result.stderr
    assert not cli.sandbox_dir(NAME).exists()  # nothing was created or started

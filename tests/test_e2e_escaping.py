"""Guest text is data on the host's terminal, with one real VM in the lab (issue 12, item 5).

A guest process whose executable path holds terminal escapes (ESC, a C1 CSI, BEL), a bidi
override and rich markup connects to a blocked documentation address and keeps a listening
socket; every view of it (`logs`, `logs --json`, `logs --sockets`) succeeds and prints no raw
control character."""

from __future__ import annotations

import json

import pytest

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "haesc"
BLOCKED = "198.51.100.9"
# The table shows the executable's base name (from the last "/"), the JSON the whole path. The
# capture keeps 31 bytes of each name in a path (images/capture/event.h): this one has 28.
HOSTILE = "/tmp/x[/]\x1b[2J\x1b]0;t\x07\x9b31m[bold]\u202ephp"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")

CONNECT_PHP = r"""
$f = @fsockopen($argv[1], (int)$argv[2], $errno, $errstr, 5);
echo $f ? "connected\n" : "failed $errno\n";
"""
LISTEN_PHP = r"""
$s = stream_socket_server("tcp://127.0.0.1:8089");
sleep(600);
"""


def assert_no_raw_control(text: str, what: str) -> None:
    found = [repr(c) for c in RAW if c in text]
    assert not found, f"{what} printed raw {', '.join(found)}:\n{text!r}"


def test_guest_text_is_escaped_in_every_log_view(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the whole escaped path in one table cell
    cli.ok("up", "--name", NAME)
    copy = 'mkdir -p "$(dirname "$1")" && cp /usr/bin/php "$1"'
    cli.ok("exec", "--name", NAME, "--", "sh", "-c", copy, "sh", HOSTILE)
    cli.ok("exec", "--name", NAME, "--", HOSTILE, "-r", CONNECT_PHP, BLOCKED, "80")
    listen = 'setsid "$1" -r "$2" </dev/null >/dev/null 2>&1 &'
    cli.ok("exec", "--name", NAME, "--", "sh", "-c", listen, "sh", HOSTILE, LISTEN_PHP)

    table = cli.ok("logs", "--name", NAME)
    assert_no_raw_control(table.stdout + table.stderr, "logs")
    # Shown as escapes, and the markup literally.
    shown = "]\\x1b[2J\\x1b]0;t\\x07\\x9b31m[bold]\\u202ephp"
    assert shown in table.stdout, table.stdout

    as_json = cli.ok("logs", "--name", NAME, "--json")
    assert_no_raw_control(as_json.stdout, "logs --json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines() if line.strip()]
    assert any(r.get("exe") == HOSTILE and r.get("dst") == BLOCKED for r in rows), rows

    sockets = cli.ok("logs", "--name", NAME, "--sockets")
    assert_no_raw_control(sockets.stdout + sockets.stderr, "logs --sockets")
    assert ":8089" in sockets.stdout, sockets.stdout

    cli.ok("destroy", "--name", NAME, timeout=300)
    assert leftovers(NAME, cli) == []

"""The egress policy end to end: a real VM in the lab, a fake internet beside it with an allowed
server (203.0.113.7) and a blocked one (198.51.100.9) that would accept anything. Checked with
real sockets from PHP in the guest and with the fake internet's own accept log."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import libvirt
import pytest

from sandbox_lab import Lab, accept_log

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

TCP_PROBE = r"""
$t = microtime(true);
$f = @fsockopen($argv[1], (int)$argv[2], $errno, $errstr, (float)$argv[3]);
$line = $f ? trim((string)fgets($f)) : null;
echo json_encode(["ok" => $f !== false, "errno" => $errno, "line" => $line,
                  "secs" => microtime(true) - $t]);
"""

# A DNS query for example.invalid/A over UDP to the given server; reports whether any answer
# came back and the error a refused socket raised.
UDP_DNS_PROBE = r"""
$q = pack("nnnnnn", 0x1234, 0x0100, 1, 0, 0, 0) . "\x07example\x07invalid\x00" . pack("nn", 1, 1);
$s = @stream_socket_client("udp://" . $argv[1] . ":53", $errno, $errstr, 2);
@fwrite($s, $q);
stream_set_timeout($s, 2);
$r = @fread($s, 512);
$e = error_get_last();
echo json_encode(["answered" => is_string($r) && strlen($r) >= 12,
                  "error" => $e ? $e["message"] : null]);
"""


def php(cli: Cli, name: str, code: str, *args: str) -> dict[str, Any]:
    result = cli.ok("exec", "--name", name, "--", "php", "-r", code, *args)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def tcp(cli: Cli, name: str, host: str, port: int, timeout: float = 5) -> dict[str, Any]:
    return php(cli, name, TCP_PROBE, host, str(port), str(timeout))


def accepted_from_lab(lab: Lab, server: str, since: int) -> list[dict[str, Any]]:
    return [e for e in accept_log(lab)[since:] if e["server"] == server]


def test_policy_in_guest_and_on_host(cli: Cli, lab: Lab) -> None:
    cli.ok("up", "--name", "pol", "--allow", "203.0.113.7", "--allow", "[2001:db8:1::9]:443")
    start = len(accept_log(lab))

    # Allowed destinations work, IPv4 and IPv6, and the allowed server sees the connection.
    ok = tcp(cli, "pol", "203.0.113.7", 80)
    assert ok["ok"], ok
    ok6 = tcp(cli, "pol", "[2001:db8:1::9]", 443)
    assert ok6["ok"], ok6
    assert accepted_from_lab(lab, "203.0.113.7", start)

    # Blocked: refused at once (ECONNREFUSED), and nothing reaches the blocked server.
    for host, port in (("198.51.100.9", 80), ("[2001:db8:1::9]", 80), ("169.254.169.254", 80)):
        res = tcp(cli, "pol", host, port)
        assert not res["ok"] and res["errno"] == 111, (host, port, res)
        assert res["secs"] < 1.0, res
    # DNS: only the sandbox network's resolver answers; an outside server gets nothing.
    state = json.loads((cli.sandbox_dir("pol") / "state.json").read_text())
    resolver = str(ipaddress.IPv4Network(state["subnet"]).network_address + 1)
    assert php(cli, "pol", UDP_DNS_PROBE, resolver)["answered"]
    direct = php(cli, "pol", UDP_DNS_PROBE, "198.51.100.9")
    assert not direct["answered"], direct
    # REJECT of a UDP packet fails the send itself (EPERM) or the next read (ECONNREFUSED).
    error = (direct["error"] or "").lower()
    assert "refused" in error or "not permitted" in error, direct
    assert accepted_from_lab(lab, "198.51.100.9", start) == []

    # Both layers are visible.
    show = cli.ok("policy", "show", "--name", "pol").stdout
    assert "allow 203.0.113.7" in show and "SBX-BLOCK" in show and "<filter" in show

    # Root in the guest drops its own rules: the host still blocks, and still allows.
    cli.ok(
        "exec",
        "--name",
        "pol",
        "--",
        "sh",
        "-c",
        "iptables -P OUTPUT ACCEPT; iptables -F; iptables -X; "
        "ip6tables -P OUTPUT ACCEPT; ip6tables -F; ip6tables -X",
    )
    for save in ("iptables-save", "ip6tables-save"):
        assert "SBX" not in cli.ok("exec", "--name", "pol", "--", save).stdout
    flushed = tcp(cli, "pol", "198.51.100.9", 80, timeout=3)
    assert not flushed["ok"], flushed
    assert not php(cli, "pol", UDP_DNS_PROBE, "198.51.100.9")["answered"]
    assert not tcp(cli, "pol", "[2001:db8:1::9]", 80, timeout=3)["ok"]
    assert tcp(cli, "pol", "203.0.113.7", 80)["ok"]
    time.sleep(1)  # let a straggling packet land in the log before reading it
    assert accepted_from_lab(lab, "198.51.100.9", start) == []
    v6_blocked = [
        e for e in accept_log(lab)[start:] if e["server"] == "2001:db8:1::9" and e["port"] == 80
    ]
    assert v6_blocked == []

    cli.ok("destroy", "--name", "pol")
    assert leftovers("pol", cli) == []
    conn = libvirt.open("qemu:///system")
    try:
        assert [f.name() for f in conn.listAllNWFilters(0) if f.name().startswith("sandbox-")] == []
    finally:
        conn.close()


def test_bad_policy_input_fails_before_anything_is_created(cli: Cli) -> None:
    for args, message in (
        (["--allow", "203.0.113.7:99999"], "out of range"),
        (["--allow", "198.51.100.1/24"], "host bits set"),
        (["--allow", "no-such-host.invalid"], "cannot resolve"),
        (["--blocked", "ignore"], "reject or drop"),
        (["--policy", "/nonexistent.yaml"], "does not exist"),
    ):
        result = cli.run("up", "--name", "bad", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "hint:" in result.stderr
    assert leftovers("bad", cli) == []
    assert not (cli.sandbox_dir("bad") / "state.json").exists()

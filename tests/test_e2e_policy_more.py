"""The rest of the policy surface end to end, with real guests in the lab (issue 12):

- `--policy FILE` with `dns: false` and `blocked: drop`: the gateway's resolver gives the guest
  nothing, and a blocked connect times out instead of being refused.
- `--allow NAME` (the lab's /etc/netns hosts file names the fake internet): the guest resolves
  the name through the sandbox resolver and reaches that server on that port only; the host's
  DNS log names the query.
- Two guests at once, each on a network of its own: neither reaches the other, neither's resolver
  answers the names allowed to the other; destroying one leaves the other's names; nothing is
  left after both.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from orchestrator.waits import Deadline, wait_for
from sandbox_lab import Lab, accept_log

from .e2e_support import Cli, leftovers
from .test_e2e_policy import TCP_PROBE, UDP_DNS_PROBE

pytestmark = [pytest.mark.vm, pytest.mark.root]

WWW, API = "www.inet.test", "api.inet.test"
LISTEN_PORT = 8099

SERVE_PHP = (
    f'$s = stream_socket_server("tcp://0.0.0.0:{LISTEN_PORT}");'
    ' while ($c = @stream_socket_accept($s, 300)) { fwrite($c, "hd2 answers\\n"); fclose($c); }'
)
RESOLVE_PHP = r"""echo json_encode(gethostbynamel($argv[1]) ?: []);"""


def php(cli: Cli, name: str, code: str, *args: str) -> Any:
    return json.loads(cli.ok("exec", "--name", name, "--", "php", "-r", code, *args).stdout)


def tcp(cli: Cli, name: str, host: str, port: int, timeout: float = 5) -> dict[str, Any]:
    result: dict[str, Any] = php(cli, name, TCP_PROBE, host, str(port), str(timeout))
    return result


def state(cli: Cli, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cli.sandbox_dir(name) / "state.json").read_text())
    return data


def gateway(cli: Cli, name: str) -> str:
    """The sandbox network's gateway address, as the guest's default route names it."""
    route = cli.ok("exec", "--name", name, "--", "ip", "-4", "route", "show", "default").stdout
    return route.split()[2]


def dns_names(name: str) -> set[str]:
    """Host names the sandbox's network's resolver answers for (its <dns><host> entries)."""
    conn = libvirt.open("qemu:///system")
    try:
        xml = ET.fromstring(conn.networkLookupByName(f"sandbox-{name}").XMLDesc(0))
    finally:
        conn.close()
    return {h.text or "" for h in xml.iterfind("dns/host/hostname")}


def test_policy_file_without_dns_and_dropping(cli: Cli, lab: Lab, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("allow:\n  - 203.0.113.7:80\ndns: false\nblocked: drop\n")
    cli.ok("up", "--name", "hd1", "--policy", str(policy))
    start = len(accept_log(lab))

    assert tcp(cli, "hd1", "203.0.113.7", 80)["ok"]
    # Dropped, not refused: the connect runs into its own timeout, with no ECONNREFUSED.
    for host, port in (("203.0.113.7", 443), ("198.51.100.9", 80)):
        res = tcp(cli, "hd1", host, port, timeout=3)
        assert not res["ok"] and res["errno"] != 111, (host, port, res)
        assert res["secs"] >= 2.5, res
    # No DNS: the gateway's resolver does not answer, and dropped UDP raises no error either.
    quiet = php(cli, "hd1", UDP_DNS_PROBE, gateway(cli, "hd1"))
    assert not quiet["answered"], quiet
    assert "refused" not in (quiet["error"] or "").lower(), quiet
    time.sleep(1)  # let a straggling packet land in the log before reading it
    seen = {(e["server"], e["port"]) for e in accept_log(lab)[start:]}
    assert ("203.0.113.7", 443) not in seen and ("198.51.100.9", 80) not in seen, seen

    show = cli.ok("policy", "show", "--name", "hd1").stdout
    assert "allow 203.0.113.7" in show
    cli.ok("destroy", "--name", "hd1")
    assert leftovers("hd1", cli) == []


def test_allow_by_name_and_two_guests(cli: Cli, lab: Lab) -> None:
    cli.ok("up", "--name", "hd1", "--allow", f"{WWW}:80")
    cli.ok("up", "--name", "hd2", "--allow", f"{API}:80")
    assert dns_names("hd1") == {WWW} and dns_names("hd2") == {API}
    start = len(accept_log(lab))

    # hd1 resolves its name through the sandbox resolver and reaches that server, port 80 only.
    assert "203.0.113.7" in cli.ok("exec", "--name", "hd1", "--", "getent", "ahosts", WWW).stdout
    assert php(cli, "hd1", RESOLVE_PHP, WWW) == ["203.0.113.7"]
    for host in (WWW, "203.0.113.7", "[2001:db8:1::9]"):  # the name allows both its addresses
        ok = tcp(cli, "hd1", host, 80)
        assert ok["ok"], (host, ok)
    for host, port in ((WWW, 443), ("198.51.100.9", 80)):
        res = tcp(cli, "hd1", host, port)
        assert not res["ok"] and res["errno"] == 111, (host, port, res)
    # hd2's name is not hd1's to know: hd1's resolver refuses it (and its address is refused).
    assert php(cli, "hd1", RESOLVE_PHP, API) == []
    assert cli.run("exec", "--name", "hd1", "--", "getent", "ahosts", API).returncode != 0
    res = tcp(cli, "hd1", API, 80)
    assert not res["ok"], res
    assert not tcp(cli, "hd1", "198.51.100.9", 80)["ok"]
    time.sleep(1)
    seen = {(e["server"], e["port"]) for e in accept_log(lab)[start:]}
    assert {("203.0.113.7", 80), ("2001:db8:1::9", 80)} <= seen, seen
    assert ("203.0.113.7", 443) not in seen and ("198.51.100.9", 80) not in seen, seen
    out = cli.ok("logs", "--name", "hd1", "--dns", "--json").stdout
    queries = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any(q["name"] == WWW for q in queries), queries
    refused = [q for q in queries if q["name"] == API]
    assert refused and all("198.51.100.9" not in q["result"] for q in refused), refused

    # Guest to guest: hd1 reaches none of hd2's listeners (sshd, one of ours) and cannot ping it.
    hd2_ip = state(cli, "hd2")["ip"]
    cli.ok(
        "exec", "--name", "hd2", "--", "sh", "-c", f"nohup php -r '{SERVE_PHP}' >/dev/null 2>&1 &"
    )
    for port in (22, LISTEN_PORT):  # both listen: hd2 itself gets an answer
        probe = lambda p=port: tcp(cli, "hd2", "127.0.0.1", p)["line"] or None  # noqa: E731
        assert wait_for(probe, Deadline(30, f"hd2 listening on port {port}"))
    for port in (22, LISTEN_PORT):
        res = tcp(cli, "hd1", hd2_ip, port, timeout=3)
        assert not res["ok"], (port, res)
    ping = cli.run("exec", "--name", "hd1", "--", "ping", "-c", "2", "-W", "2", hd2_ip)
    assert ping.returncode != 0, ping.stdout

    # Destroying hd1 takes its network away; hd2's name still resolves in hd2.
    cli.ok("destroy", "--name", "hd1")
    assert leftovers("hd1", cli) == []
    assert dns_names("hd2") == {API}
    assert php(cli, "hd2", RESOLVE_PHP, API) == ["198.51.100.9"]
    assert tcp(cli, "hd2", API, 80)["ok"]
    cli.ok("destroy", "--name", "hd2")
    assert leftovers("hd1", cli) == [] and leftovers("hd2", cli) == []

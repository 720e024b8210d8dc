"""Warm start and one-shot runs end to end on real VMs: a sandbox made from a warm VM is as
fresh as a cold one (its own hostname, MAC, machine-id, host key, resolver, a right clock) and
its policy holds in both layers; `run --rm` leaves nothing behind, even when interrupted."""

from __future__ import annotations

import ipaddress
import json
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from orchestrator import names, paths
from orchestrator.vm import hypervisor as hv
from orchestrator.waits import Deadline, wait_for

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

ALLOWED, BLOCKED = "203.0.113.7", "198.51.100.9"
SCRIPT = f"""<?php
$f = @fsockopen('{BLOCKED}', 80, $errno, $errstr, 3);
$g = @fsockopen('{ALLOWED}', 80, $errno, $errstr, 3);
echo ($f ? "reached" : "blocked") . "\\n";
exit(7);
"""
FACTS = (
    "hostname; cat /etc/machine-id; cat /sys/class/net/en*/address; date +%s; "
    "sed -n 's/^nameserver //p' /etc/resolv.conf; cat /run/sandbox/seed-policy"
)


def state_of(cli: Cli, name: str) -> dict[str, object]:
    data = json.loads((cli.sandbox_dir(name) / paths.STATE_FILE).read_text())
    assert isinstance(data, dict)
    return data


def warm_leftovers() -> list[str]:
    """Every warm VM's domain and volume there is (only these tests make warm VMs)."""
    conn = libvirt.open("qemu:///system")
    try:
        found = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(names.WARM_PREFIX)]
        for pool in conn.listAllStoragePools(0):
            pool.refresh(0)
            found += [v for v in pool.listVolumes() if v.startswith(names.WARM_PREFIX)]
        return found
    finally:
        conn.close()


def domain_exists(domain: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        return hv.lookup_domain(conn, domain) is not None
    finally:
        conn.close()


def test_a_warm_sandbox_is_fresh_and_enforces_its_policy(cli: Cli, tmp_path: Path) -> None:
    cli.ok("warm", "fill", "--count", "2")
    assert cli.ok("warm", "status").stdout.count(" ready") == 2
    facts = {}
    for name in ("hw1", "hw2"):
        up = cli.ok("up", "--name", name, "--allow", ALLOWED)
        assert "warm VM, ready in" in up.stderr, up.stderr
        host, machine_id, mac, clock, resolver, seeded = cli.ok(
            "exec", "--name", name, "--", "sh", "-c", FACTS
        ).stdout.split()
        # A warm VM's seed carries no policy (it had none yet): `up` loaded it over SSH.
        assert seeded == "none"
        facts[name] = (machine_id, mac)
        state = state_of(cli, name)
        assert str(state["domain"]).startswith(names.WARM_PREFIX) and state["warm_id"]
        assert host == f"sandbox-{name}"
        assert mac == state["mac"]
        assert abs(int(clock) - time.time()) < 10
        assert resolver == str(next(ipaddress.IPv4Network(str(state["subnet"])).hosts()))
    assert facts["hw1"][0] != facts["hw2"][0] and facts["hw1"][1] != facts["hw2"][1]
    assert state_of(cli, "hw1")["host_key"] != state_of(cli, "hw2")["host_key"]
    assert cli.ok("warm", "status").stdout.count(" ready") == 0  # each taken once

    script = tmp_path / "phone.php"
    script.write_text(SCRIPT)
    ran = cli.run("run", "--name", "hw1", str(script))
    assert ran.returncode == 7 and ran.stdout == "blocked\n", ran.stderr
    rows = cli.records_when(
        "hw1", lambda rows: len([r for r in rows if r.get("dport") == 80]) == 2, "both connects"
    )
    verdicts = {r["dst"]: (r["verdict"], r["stack"][0]["line"]) for r in rows if r["dport"] == 80}
    assert verdicts == {BLOCKED: ("blocked", 2), ALLOWED: ("allowed", 3)}
    shown = cli.ok("policy", "show", "--name", "hw1").stdout
    assert ALLOWED in shown and "sandbox-hw1" in shown  # both layers: the guest's and the filter

    for name in ("hw1", "hw2"):
        domain = str(state_of(cli, name)["domain"])
        destroyed = cli.ok("destroy", "--name", name)
        assert "from the host's copy" in " ".join(destroyed.stderr.split()), destroyed.stderr
        assert leftovers(name, cli) == [] and not domain_exists(domain)
    assert warm_leftovers() == []


def one_shot_name(text: str) -> str:
    found = re.search(r"one-shot sandbox (run-[0-9a-f]{6})", text)
    assert found, text
    return found.group(1)


def test_a_one_shot_run_reports_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.config.write_text(cli.config.read_text() + "warm: 1\n")
    cli.ok("warm", "fill")
    script = tmp_path / "phone.php"
    script.write_text(SCRIPT)
    ran = cli.run("run", "--allow", ALLOWED, str(script))
    assert ran.returncode == 7, ran.stderr
    name = one_shot_name(ran.stderr)
    # No SSH round trip at the end: the records came from the host's copy.
    assert "from the host's copy" in " ".join(ran.stderr.split()), ran.stderr
    # The log summary is printed: both attempts with their PHP lines.
    assert "blocked" in ran.stdout and "allowed" in ran.stdout
    assert "phone.php:2" in ran.stdout and "phone.php:3" in ran.stdout
    assert leftovers(name, cli) == []  # once the detached removal is done
    # `warm: 1` in the config: the up that took the warm VM booted a replacement in the
    # background.
    replacement = cli.ok("warm", "status").stdout
    assert "sandbox-warm." in replacement and ("booting" in replacement or "ready" in replacement)
    cli.ok("warm", "drain")
    assert warm_leftovers() == []
    # Its logs stay.
    rows = [r for r in cli.records(name) if r.get("dport") == 80]
    assert sorted(r["verdict"] for r in rows) == ["allowed", "blocked"]
    # An existing sandbox's policy is not changed by a flag.
    assert cli.run("run", "--name", name, "--allow", ALLOWED, str(script)).returncode != 0


def test_an_interrupted_one_shot_run_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.ok("warm", "fill", "--count", "1")
    script = tmp_path / "wait.php"
    script.write_text('<?php\necho "started\\n";\nsleep(120);\n')
    running = subprocess.Popen(
        cli.argv("run", "--rm", str(script)),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    out = running.stdout
    assert out is not None
    said = b""
    try:

        def started() -> bool | None:
            nonlocal said
            ready, _, _ = select.select([out], [], [], 1)
            if ready:
                said += out.read1(4096)  # type: ignore[attr-defined]
            assert running.poll() is None, said
            return True if b"started" in said else None

        wait_for(started, Deadline(300, "the one-shot run to start"), interval=0.5)
    finally:
        running.send_signal(signal.SIGINT)
        _out, err = running.communicate(timeout=180)
    text = err.decode(errors="replace")
    assert running.returncode == 130, text
    name = one_shot_name(text)
    assert leftovers(name, cli) == []  # once the detached removal is done
    assert warm_leftovers() == []

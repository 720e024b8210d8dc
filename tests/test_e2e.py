"""End to end on real VMs: libvirtd inside the namespace lab, the real base image, the real CLI.

Each scenario asserts that `destroy` leaves nothing behind: no domain, no per-sandbox volume, no
network, no key or seed; only the logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import libvirt
import pytest

from orchestrator import paths
from orchestrator.egress import guestfw
from orchestrator.state import SandboxState
from orchestrator.vm.guest import generate_ed25519
from sandbox_lab import in_lab

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]


def test_up_exec_ssh_destroy(cli: Cli) -> None:
    started = time.monotonic()
    up = cli.ok("up", "--name", "e2e", "--allow", "203.0.113.7")
    print(f"up took {time.monotonic() - started:.1f} s\n{up.stderr}")
    assert "is ready at" in up.stderr

    state = json.loads((cli.sandbox_dir("e2e") / paths.STATE_FILE).read_text())
    assert state["phase"] == "ready" and state["ip"]
    assert state["policy"]["allow"][0]["network"] == "203.0.113.7/32"
    assert "allow" not in state  # one record of the policy; status derives the list

    # Output streams are kept apart and the exit code comes back.
    result = cli.run("exec", "--name", "e2e", "--", "sh", "-c", "hostname; echo oops >&2; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout.strip() == "sandbox-e2e"
    assert result.stderr.strip() == "oops"

    # The guest is the image we built: PHP with the curl extension, xdebug installed.
    php = cli.ok(
        "exec",
        "--name",
        "e2e",
        "--",
        "php",
        "-r",
        "echo extension_loaded('curl') ? 'curl' : 'none';",
    )
    assert php.stdout == "curl"
    cli.ok(
        "exec",
        "--name",
        "e2e",
        "--",
        "test",
        "-f",
        "/usr/share/php/xdebug/LICENSE",
        "-o",
        "-d",
        "/etc/php/8.2/mods-available",
    )
    # The guest's only host key is the one the host generated and pinned.
    keys = cli.ok("exec", "--name", "e2e", "--", "sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub")
    assert keys.stdout.split()[:2] == state["host_key"].split()[:2]
    assert len(keys.stdout.strip().splitlines()) == 1
    # A cold boot loaded the policy from its seed before sshd started; `up` read it back only.
    marker = cli.ok("exec", "--name", "e2e", "--", "cat", guestfw.POLICY_MARKER).stdout
    rules = state["guest_rules"]
    assert marker.strip() == guestfw.marker_line({int(v): text for v, text in rules.items()})

    # OpenSSH with StrictHostKeyChecking=yes against the pinned key.
    ssh = cli.ok("ssh", "--name", "e2e", "--", "echo", "via-openssh")
    assert ssh.stdout.strip() == "via-openssh"

    status = json.loads(cli.ok("status", "--name", "e2e", "--json").stdout)
    assert status["status"] == "ready" and status["domain"] == "running"
    assert status["allow"] == ["203.0.113.7"]
    listing = json.loads(cli.ok("list", "--json").stdout)
    # Sandboxes of other sessions sharing the lab's libvirtd show up too, as orphans.
    ours = [r for r in listing if r["name"] == "e2e"]
    assert len(ours) == 1 and all(r["status"] == "orphan" for r in listing if r not in ours)

    # A guest that presents another host key is refused, fast, with a clear error.
    sfile = cli.sandbox_dir("e2e") / paths.STATE_FILE
    real = sfile.read_text()
    forged = SandboxState.from_json(real)
    other = generate_ed25519("not-the-guest")
    sfile.write_text(forged.to_json().replace(forged.host_key, other.public_line))
    started = time.monotonic()
    refused = cli.run("exec", "--name", "e2e", "--", "true")
    assert refused.returncode == 6, refused.stderr
    assert "host key" in refused.stderr.lower()
    assert time.monotonic() - started < 20
    sfile.write_text(real)

    # Up of an existing name is a conflict.
    again = cli.run("up", "--name", "e2e")
    assert again.returncode == 4 and "exists" in again.stderr

    started = time.monotonic()
    cli.ok("destroy", "--name", "e2e")
    print(f"destroy took {time.monotonic() - started:.2f} s")
    assert leftovers("e2e", cli) == []
    console = (cli.sandbox_dir("e2e") / paths.LOGS_DIR / paths.CONSOLE_LOG).read_text(
        errors="replace"
    )
    # cloud-init checked the seed and the image's config against its schema at boot.
    assert "cloud-init" in console and "Invalid cloud-config" not in console
    # Idempotent.
    assert "nothing to destroy" in cli.ok("destroy", "--name", "e2e").stderr


def test_sshd_never_up_reports_console_and_rolls_back(cli: Cli) -> None:
    cli.config.write_text("boot_timeout: 12\n")
    result = cli.run("up", "--name", "slow")
    assert result.returncode == 8, result.stderr  # TimeoutExpired
    assert "timed out after 12 s waiting for sandbox 'slow' to boot" in result.stderr
    assert "last lines of the VM console" in result.stderr
    assert "hint:" in result.stderr
    assert leftovers("slow", cli) == []


def test_killed_up_then_destroy_then_concurrent_ups(cli: Cli) -> None:
    proc = subprocess.Popen(
        cli.argv("up", "--name", "killed"),
        env=cli.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state_file = cli.sandbox_dir("killed") / paths.STATE_FILE
    conn = libvirt.open("qemu:///system")
    try:
        # Killed at a known half-built point: its VM runs, its state says CREATING (a TCG boot
        # takes 30 s or more, so `up` is far from READY when the kill lands a moment later).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "up ended before its VM started"
            running = [
                d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            ]
            if "sandbox-killed" in running and state_file.exists():
                before = json.loads(state_file.read_text())["phase"]
                assert before == "creating", before
                break
            time.sleep(0.1)
        else:
            pytest.fail("the VM of the killed up never started")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert conn.lookupByName("sandbox-killed").isActive(), "the VM went with the killed up"
    finally:
        conn.close()
    assert leftovers("killed", cli), "the killed up should have left its VM behind"
    # Still half-built after the kill, not READY: what follows tests the half-built path.
    half = json.loads(state_file.read_text())
    assert half["phase"] == "creating", half["phase"]
    assert json.loads(cli.ok("status", "--name", "killed", "--json").stdout)["status"] == "creating"

    assert cli.run("up", "--name", "killed").returncode == 4  # half-built: destroy first
    cli.ok("destroy", "--name", "killed")
    assert leftovers("killed", cli) == []

    # A new up of the same name works, concurrently with another one.
    procs = {
        name: subprocess.Popen(
            cli.argv("up", "--name", name),
            env=cli.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("killed", "other")
    }
    for name, p in procs.items():
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"up {name}: {err}"
    for name in procs:
        result = cli.ok("exec", "--name", name, "--", "hostname")
        assert result.stdout.strip() == f"sandbox-{name}"
    # Guest to guest, on real guests: even with its own firewall flushed, one sandbox reaches
    # nothing of the other (its sshd), since neither allowed the other; the same probe from the
    # host side (the lab) does reach it, so the probe itself works.
    other = json.loads((cli.sandbox_dir("other") / paths.STATE_FILE).read_text())["ip"]
    probe = (
        "iptables -F; iptables -P OUTPUT ACCEPT; "
        f"timeout 8 bash -c 'echo > /dev/tcp/{other}/22' 2>/dev/null && echo tcp-reached; "
        "echo done"
    )
    reached = cli.ok("exec", "--name", "killed", "--", "sh", "-c", probe).stdout
    assert reached.split() == ["done"], reached
    control = subprocess.run(
        in_lab(cli.lab, ["bash", "-c", f"timeout 8 bash -c 'echo > /dev/tcp/{other}/22'"]),
        capture_output=True,
    )
    assert control.returncode == 0, "the probe does not reach the sshd even from the host"
    cli.ok("destroy", "--all")
    assert leftovers("killed", cli) == [] and leftovers("other", cli) == []

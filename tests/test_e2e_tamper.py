"""Which process changed the guest's firewall (issue 12, item 8), with one real VM in the lab.

Guest root changes the rules and puts them back at once: the collection's read-back finds them
intact, but the capture saw both changes and names the process of each. `up`'s own push of the
policy is no such change."""

from __future__ import annotations

import json

import pytest

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "fwtamper"
ALLOWED = "203.0.113.7"

# Guest root: iptables-nft under a telling path (the multi-call binary goes by its name, so the
# directory tells), run by a script that flushes OUTPUT and restores it within milliseconds.
EVIL = """#!/bin/sh
/tmp/evil/iptables-save -t filter > /tmp/evil/saved
/tmp/evil/iptables -F OUTPUT &
flush=$!
wait $flush
/tmp/evil/iptables-restore < /tmp/evil/saved &
restore=$!
wait $restore
echo "script $$ flush $flush restore $restore"
"""
INSTALL = (
    "mkdir -p /tmp/evil && for n in iptables iptables-save iptables-restore; do "
    "cp /usr/sbin/xtables-nft-multi /tmp/evil/$n; done && "
    "cat > /tmp/evil/flip <<'EOF'\n" + EVIL + "EOF\nchmod 755 /tmp/evil/flip"
)


def as_root(cli: Cli, script: str) -> str:
    return cli.ok("exec", "--name", NAME, "--", "sh", "-c", script, timeout=300).stdout


def tamper_rows(cli: Cli) -> list[dict[str, object]]:
    out = cli.ok("logs", "--name", NAME, "--json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["verdict"] == "tamper"]


def test_a_change_undone_before_the_collection_names_its_process(cli: Cli) -> None:
    # One collection per exec, after it: none can fall between the flush and its undo.
    cli.config.write_text(cli.config.read_text() + "collect_every: 0\n")
    cli.ok("up", "--name", NAME, "--allow", ALLOWED)
    # `up` loaded the policy (two iptables-restore commits) after the capture attached: its own.
    assert tamper_rows(cli) == []

    as_root(cli, INSTALL)
    said = as_root(cli, "/tmp/evil/flip").split()
    script, flush, restore = (int(said[i]) for i in (1, 3, 5))
    rows = tamper_rows(cli)
    print(json.dumps(rows, indent=1))
    # The rules match the policy again: the read-back has nothing to say, the capture has.
    assert not any("no longer matches" in str(r["evidence"]) for r in rows)
    by_pid = {r["pid"]: r for r in rows}
    assert {flush, restore} <= set(by_pid), rows
    for pid, command in ((flush, "iptables -F OUTPUT"), (restore, "iptables-restore")):
        exe = f"/tmp/evil/{command.split()[0]}"
        row = by_pid[pid]
        assert (row["exe"], row["ppid"], row["uid"]) == (exe, script, 0)
        assert row["cmdline"] == f"/tmp/evil/{command}"
        assert row["evidence"] == (
            f"the guest's firewall was changed (nftables commit) by {exe} "
            f"(pid {pid}, parent {script}, uid 0): /tmp/evil/{command}"
        )
    # Reads change nothing (the collections' own iptables-save, the script's, `iptables -L`).
    as_root(cli, "iptables -L -n >/dev/null; iptables -S >/dev/null; ip6tables-save >/dev/null")
    assert len(tamper_rows(cli)) == len(rows)
    table = cli.ok("logs", "--name", NAME).stdout
    assert "what changed" in table and f"iptables ({flush})" in table

    # Legacy iptables (Debian's iptables package ships it): a table replaced by setsockopt.
    as_root(cli, "iptables-legacy -A OUTPUT -d 192.0.2.1 -j DROP")
    legacy = [r for r in tamper_rows(cli) if "legacy iptables table replaced" in str(r["evidence"])]
    assert len(legacy) == 1, legacy
    assert legacy[0]["exe"] == "/usr/sbin/xtables-legacy-multi"
    assert legacy[0]["cmdline"] == "iptables-legacy -A OUTPUT -d 192.0.2.1 -j DROP"

    # A change that stays: the read-back row names who changed it since the last collection.
    as_root(cli, "iptables -I OUTPUT -d 192.0.2.2 -j DROP")
    rows = tamper_rows(cli)
    readback = [r for r in rows if "no longer matches" in str(r["evidence"])]
    assert readback and readback[-1]["pid"] is None, rows
    assert "; changed since the last collection by xtables-nft-multi (" in str(
        readback[-1]["evidence"]
    )

    # Guest root unpins the nftables hook's link alone, then undoes its change: that change goes
    # unseen, but the collection says which part of the capture was detached, and attaches it
    # again (the next change is seen).
    pins = "/sys/fs/bpf/sandbox"
    as_root(cli, f"rm {pins}/link_sbx_fwchange_nft && iptables -D OUTPUT -d 192.0.2.2 -j DROP")
    rows = tamper_rows(cli)
    assert any(
        "part of the connection capture was detached in the guest (link_sbx_fwchange_nft;"
        in str(r["evidence"])
        for r in rows
    ), rows
    # The read-back sees the rules put back, and no process the capture saw did it.
    again = [r for r in rows if "matches the policy again" in str(r["evidence"])]
    assert again and "changed since" not in str(again[-1]["evidence"]), rows
    as_root(cli, "iptables -A OUTPUT -d 192.0.2.3 -j DROP")
    assert any(r["cmdline"] == "iptables -A OUTPUT -d 192.0.2.3 -j DROP" for r in tamper_rows(cli))
    cli.ok("destroy", "--name", NAME)

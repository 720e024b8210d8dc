"""Learn mode end to end: a PHP script's destinations learned under allow-all (`sandbox run --rm
--learn`), a policy suggested from the log, and the script replayed in a new sandbox with that
policy unedited: what it did while learning goes through, a call it did not make is blocked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sandbox_lab import Lab, accept_log

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

SCRIPT = Path(__file__).resolve().parent / "data" / "learn" / "learn_me.php"
LOUD = "LEARN MODE"


def one_shot_name(stderr: str) -> str:
    found = re.search(r"sandbox logs --name (run-[0-9a-f]{6}) ", stderr)
    assert found, stderr
    return found.group(1)


def received(lab: Lab, since: int, server: str, port: int, proto: str) -> list[object]:
    return [
        e
        for e in accept_log(lab)[since:]
        if e["server"] == server and e["port"] == port and e["proto"] == proto
    ]


def test_learn_suggest_replay(cli: Cli, lab: Lab, tmp_path: Path) -> None:
    # The learning resolver answers from the lab's hosts file only: never a real resolver.
    cli.config.write_text("boot_timeout: 600\nnetwork:\n  learn_resolvers: []\n")

    start = len(accept_log(lab))
    learned = cli.ok("run", "--rm", "--learn", str(SCRIPT))
    # The script's lines, then the one-shot's table of its records.
    assert learned.stdout.splitlines()[:3] == ["name ok", "address ok", "udp sent"], learned.stdout
    assert LOUD in learned.stderr
    name = one_shot_name(learned.stderr)
    # Allow-all was real: the datagram reached the fake internet.
    assert received(lab, start, "198.51.100.9", 5353, "udp")
    for verb in (["logs"], ["report"]):
        shown = cli.ok(*verb, "--name", name)
        assert LOUD in shown.stderr, verb

    policy = tmp_path / "learned.yaml"
    cli.ok("policy", "suggest", "--name", name, "-o", str(policy))
    text = policy.read_text()
    assert yaml.safe_load(text)["allow"] == [
        {"host": "www.inet.test", "proto": "tcp", "port": 80},
        {"address": "198.51.100.9", "proto": "udp", "port": 5353},
        {"address": "203.0.113.7", "proto": "tcp", "port": 443},
    ], text
    assert "learn_me.php:29" in text and "learn_me.php:31" in text

    start = len(accept_log(lab))
    replay = cli.run("run", "--rm", "--policy", str(policy), str(SCRIPT), "198.51.100.9:80")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.splitlines()[:4] == [
        "name ok",
        "address ok",
        "udp sent",
        "extra failed (111)",
    ], replay.stdout
    assert LOUD not in replay.stderr
    assert received(lab, start, "203.0.113.7", 443, "tcp")
    assert received(lab, start, "198.51.100.9", 5353, "udp")
    assert received(lab, start, "198.51.100.9", 80, "tcp") == []
    replayed = cli.records(one_shot_name(replay.stderr))
    blocked = [(r["dst"], r["dport"]) for r in replayed if r["verdict"] == "blocked"]
    assert blocked == [("198.51.100.9", 80)], replayed

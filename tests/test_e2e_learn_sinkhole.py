"""Learn mode under the sinkhole end to end: the learn script (tests/data/learn/learn_me.php) run
with `sandbox run --rm --learn --sinkhole`. Its name resolves to the sinkhole, which reads its
HTTP request; its literal addresses are blocked; the fake internet's own packet capture sees no
packet of the whole one-shot (up, run, destroy). `policy suggest` names the host with the port
it called, never the sinkhole's address, and keeps the blocked literal addresses; the policy,
unedited, replayed with `run --rm --policy` lets the named call through to the lab's server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sandbox_lab import Lab, accept_log

from .e2e_support import Cli
from .inet_capture import InetCapture
from .test_e2e_learn import SCRIPT, one_shot_name

pytestmark = [pytest.mark.vm, pytest.mark.root]

SHOUT = "allows ALL egress"
SAID = "learn mode under the sinkhole"
WWW = ("203.0.113.7", "2001:db8:1::9")  # www.inet.test in the lab
# Every address the script reaches, by name or literally: the lab may carry other sessions'
# sandboxes, so the proof looks at the packets and connections that could be this run's.
OURS = (*WWW, "198.51.100.9")


def ours(packet: str) -> bool:
    """A packet (tcpdump -n line) to or from one of the script's destinations, or any DNS one:
    a name forwarded upstream would be a lookup leaving the machine."""
    return any(address in packet for address in OURS) or ".53:" in packet or ".53 " in packet


def test_learn_under_the_sinkhole_suggest_replay(cli: Cli, lab: Lab, tmp_path: Path) -> None:
    start = len(accept_log(lab))
    with InetCapture(lab, tmp_path / "inet.pcap") as capture:
        learned = cli.run("run", "--rm", "--learn", "--sinkhole", str(SCRIPT))
    assert learned.returncode == 0, learned.stdout + learned.stderr
    # The name reached the sinkhole (its connect succeeded); the literal addresses were refused
    # (--blocked reject: ECONNREFUSED for TCP, the datagram's send fails).
    assert learned.stdout.splitlines()[:3] == [
        "name ok",
        "address failed (111)",
        "udp failed",
    ], learned.stdout
    # Nothing left the machine: not a packet in the fake internet, not a line in its servers' log.
    assert capture.packets(ours) == [], capture.packets()
    assert [e for e in accept_log(lab)[start:] if e["server"] in OURS] == []
    assert SAID in learned.stderr and SHOUT not in learned.stderr, learned.stderr
    name = one_shot_name(learned.stderr)

    records = cli.records_when(
        name,
        lambda rs: any(r["verdict"] == "sinkholed" and r.get("http") for r in rs),
        "the sinkholed request",
    )
    sinkholed = [r for r in records if r["verdict"] == "sinkholed"]
    assert [(r["dns_name"], r["dport"], r.get("http")) for r in sinkholed] == [
        ("www.inet.test", 80, "GET www.inet.test /"),
    ], records
    blocked = {(r["dst"], r["dport"], r["proto"]) for r in records if r["verdict"] == "blocked"}
    assert blocked == {("203.0.113.7", 443, "tcp"), ("198.51.100.9", 5353, "udp")}, records
    for verb in (["logs"], ["report"]):
        shown = cli.ok(*verb, "--name", name)
        assert SAID in shown.stderr and SHOUT not in shown.stderr, (verb, shown.stderr)

    policy = tmp_path / "learned.yaml"
    suggested = cli.ok("policy", "suggest", "--name", name, "-o", str(policy))
    assert SAID in suggested.stderr and SHOUT not in suggested.stderr, suggested.stderr
    text = policy.read_text()
    # The same policy as learning under allow-all makes (test_e2e_learn.py).
    assert yaml.safe_load(text)["allow"] == [
        {"host": "www.inet.test", "proto": "tcp", "port": 80},
        {"address": "198.51.100.9", "proto": "udp", "port": 5353},
        {"address": "203.0.113.7", "proto": "tcp", "port": 443},
    ], text
    assert "learn_me.php:29" in text
    assert sinkholed[0]["dst"] not in text  # the sinkhole's address is in no entry or comment

    start = len(accept_log(lab))
    # The same capture sees the replay's packets: the learning run's empty one proves something.
    with InetCapture(lab, tmp_path / "inet-replay.pcap") as capture:
        replay = cli.run("run", "--rm", "--policy", str(policy), str(SCRIPT))
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.splitlines()[:3] == ["name ok", "address ok", "udp sent"], replay.stdout
    assert capture.packets(lambda p: ".80:" in p and ours(p)), capture.packets()
    assert SAID not in replay.stderr and SHOUT not in replay.stderr
    # The named call reached the lab's real server for www.inet.test, on the port learned.
    reached = [
        e
        for e in accept_log(lab)[start:]
        if e["server"] in WWW and e["port"] == 80 and e["proto"] == "tcp"
    ]
    assert reached, accept_log(lab)[start:]
    replayed = cli.records(one_shot_name(replay.stderr))
    assert not [r for r in replayed if r["verdict"] in ("blocked", "sinkholed")], replayed

"""Learn mode and `sandbox policy suggest`, pure parts: the allow-all widening, the resolver of a
learn-mode network, and records -> suggested policy -> YAML, from a real recording
(tests/data/learn: `sandbox up --learn` then `sandbox run tests/data/learn/learn_me.php` in the
lab; see test_e2e_learn.py for the same end to end)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml

from orchestrator.capture.records import Attempt, DnsQuery, Frame, Verdict
from orchestrator.config import parse_settings
from orchestrator.egress import suggest
from orchestrator.egress.policy import (
    EgressPolicy,
    Learn,
    build_policy,
    learn_policy,
    load_policy_file,
)
from orchestrator.errors import UsageError
from orchestrator.lifecycle.build import host_resolvers, learn_upstream
from orchestrator.vm.domain import DNSMASQ_NS, render_network

from .conftest import Golden
from .test_renderers import net_spec

DATA = Path(__file__).resolve().parent / "data" / "learn"
OWN = [ipaddress.ip_network("192.168.208.0/20"), ipaddress.ip_network("2001:db8:213::/48")]


def recorded() -> list[Attempt]:
    lines = (DATA / "connections.jsonl").read_text().splitlines()
    return [Attempt.from_json(line) for line in lines if line.strip()]


def recorded_names() -> dict[str, list[str]]:
    """What the lab's resolver answered during the recording: the replay's resolver."""
    answers: dict[str, set[str]] = {}
    for line in (DATA / "dns.jsonl").read_text().splitlines():
        query = DnsQuery.from_json(line)
        answers.setdefault(query.name, set()).update(query.addresses())
    return {name: sorted(addrs) for name, addrs in answers.items()}


def load_text(text: str, tmp_path: Path) -> EgressPolicy:
    """`text` loaded as `sandbox up --policy FILE` loads it, names resolved as recorded."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    names = recorded_names()
    pf = load_policy_file(path)
    assert pf.dns is not None
    return build_policy(pf.allow, dns=pf.dns, resolve=lambda name: names[name])


# ---- allow-all ----------------------------------------------------------------------------------


def test_learn_policy_allows_everything_but_the_sandbox_networks() -> None:
    base = build_policy(["203.0.113.7:80"])
    policy = learn_policy(base, OWN)
    assert policy.learn is Learn.ALLOW_ALL
    for proto, dst, port in [
        ("tcp", "8.8.8.8", 53),
        ("udp", "198.51.100.9", 5353),
        ("icmp", "192.0.2.1", None),
        ("tcp", "2001:db8:1::9", 443),
        ("tcp", "203.0.113.7", 80),
        ("tcp", "255.255.255.254", 1),
        ("tcp", "ffff::1", 1),
    ]:
        assert policy.allows(proto, dst, port), (proto, dst, port)
    for dst in ["192.168.208.1", "192.168.223.254", "2001:db8:213::1", "2001:db8:213:ffff::2"]:
        assert not policy.allows("tcp", dst, 22), dst
    # The wide entries tile the complement exactly: no address both excluded and allowed.
    for entry in policy.allow:
        assert not any(entry.network.overlaps(own) for own in OWN if own.version == entry.version)
    assert not base.allows("tcp", "8.8.8.8", 53)


def test_learn_off_leaves_the_policy_alone() -> None:
    base = build_policy(["203.0.113.7:80"])
    assert learn_policy(base, OWN, mode=Learn.OFF) is base


def test_learn_survives_the_state_file_and_older_states_are_not_learning() -> None:
    policy = learn_policy(build_policy([]), OWN)
    assert EgressPolicy.from_dict(policy.to_dict()) == policy
    assert EgressPolicy.from_dict(policy.to_dict()).learn is Learn.ALLOW_ALL
    older = build_policy([]).to_dict()
    del older["learn"]
    assert EgressPolicy.from_dict(older).learn is Learn.OFF


def _options(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [o.get("value", "") for o in root.iter(f"{{{DNSMASQ_NS}}}option")]


def test_a_learning_resolver_answers_from_the_hosts_file_and_the_upstream_only() -> None:
    enforcing = _options(render_network(net_spec()))
    assert "no-resolv" in enforcing and "no-hosts" in enforcing
    assert not any(o.startswith("server=") for o in enforcing)
    learning = _options(
        render_network(dataclasses.replace(net_spec(), learn_upstream=("203.0.113.53",)))
    )
    # Never the host's resolv.conf as dnsmasq reads it: only the servers the config names.
    assert "no-resolv" in learning and "no-hosts" not in learning
    assert [o for o in learning if o.startswith("server=")] == ["server=203.0.113.53"]
    # The query log stays: it is the record learn mode learns from.
    assert any(o.startswith("log-facility=") for o in learning)


def test_learn_upstream_from_the_config_or_the_hosts_resolv_conf() -> None:
    text = "# comment\nnameserver 203.0.113.53\nnameserver fe80::1%eth0\nnameserver bogus\n"
    assert host_resolvers(text) == ("203.0.113.53", "fe80::1")
    assert learn_upstream(()) == ()
    assert learn_upstream(("198.51.100.53",)) == ("198.51.100.53",)
    settings = parse_settings({"network": {"learn_resolvers": ["198.51.100.53"]}}, "test")
    assert settings.network.learn_resolvers == ("198.51.100.53",)
    assert parse_settings({}, "test").network.learn_resolvers is None
    with pytest.raises(UsageError, match="learn_resolvers"):
        parse_settings({"network": {"learn_resolvers": ["not-an-address"]}}, "test")


# ---- suggest ------------------------------------------------------------------------------------


def test_suggested_policy_golden(golden: Golden) -> None:
    text = suggest.render(suggest.suggest(recorded()), ["learned from tests/data/learn"])
    golden.check("learn/suggested-policy.yaml", text)


def test_suggestion_from_the_recording_names_ports_and_origins() -> None:
    result = suggest.suggest(recorded())
    assert result.dns
    shown = [(e.host, e.address, e.proto, e.port) for e in result.entries]
    # The name the script asked for, as a name (its address 2001:db8:1::9 is not in the policy);
    # the literal address the script used, as an address, although the same lookup returned it.
    assert shown == [
        ("www.inet.test", None, "tcp", 80),
        (None, "198.51.100.9", "udp", 5353),
        (None, "203.0.113.7", "tcp", 443),
    ]
    lines = {e.port: e.origins for e in result.entries}
    assert lines[80] == (
        "php8.2 (315): stream_socket_client() at learn_me.php:8 <- tcp() at learn_me.php:29",
    )
    assert lines[5353][0].endswith("udp() at learn_me.php:31")


def test_suggested_policy_loads_unchanged_and_lets_exactly_the_recorded_attempts_through(
    tmp_path: Path,
) -> None:
    attempts = recorded()
    policy = load_text(suggest.render(suggest.suggest(attempts)), tmp_path)
    assert policy.dns
    tried = [a for a in attempts if a.verdict is Verdict.ALLOWED]
    assert tried
    for attempt in tried:
        assert policy.allows(attempt.proto, attempt.dst, attempt.dport), attempt
    # The same name on a port it never used, another port of an address, another protocol.
    assert not policy.allows("tcp", "2001:db8:1::9", 443)
    assert not policy.allows("tcp", "198.51.100.9", 80)
    assert not policy.allows("tcp", "198.51.100.9", 5353)
    assert not policy.allows("udp", "203.0.113.7", 443)


HOSTILE = "evil\n- 0.0.0.0/0\nallow: [0.0.0.0/0]\r\u2028\u0085# x: {a"


def test_guest_text_cannot_leave_a_comment_or_become_an_entry(tmp_path: Path) -> None:
    base = next(a for a in recorded() if a.verdict is Verdict.ALLOWED and a.proto == "udp")
    hostile = [
        dataclasses.replace(
            base,
            exe=f"/usr/bin/{HOSTILE}",
            stack=(Frame(f"f{HOSTILE}", f"/x/{HOSTILE}.php", 3, f"'{HOSTILE}'"),),
        ),
        # A name that is no host name: its address stands in.
        dataclasses.replace(base, dns_name=HOSTILE, dst="203.0.113.9", dport=9),
        dataclasses.replace(base, dns_name="Good.Example.", dst="203.0.113.10", dport=10),
    ]
    text = suggest.render(suggest.suggest(hostile), [f"sandbox {HOSTILE}"])
    for line in text.splitlines():
        assert line.isascii() and line.isprintable(), line
    data = yaml.safe_load(text)
    assert data == {
        "dns": True,
        "allow": [
            {"host": "good.example", "proto": "udp", "port": 10},
            {"address": "198.51.100.9", "proto": "udp", "port": 5353},
            {"address": "203.0.113.9", "proto": "udp", "port": 9},
        ],
    }
    policy = load_text(text.replace("good.example", "198.51.100.10"), tmp_path)
    assert not policy.allows("tcp", "192.0.2.1", 1)


def test_comment_text_escapes_every_line_break_and_caps() -> None:
    assert suggest.comment_text("a\nb\rc\u2028d\u0085e\\") == "a\\x0ab\\x0dc\\u2028d\\x85e\\\\"
    assert len(suggest.comment_text("x" * 1000)) == suggest.MAX_COMMENT


def test_nothing_tried_is_an_empty_policy_that_still_loads(tmp_path: Path) -> None:
    only_dns = [a for a in recorded() if a.verdict is Verdict.DNS]
    text = suggest.render(suggest.suggest(only_dns))
    assert yaml.safe_load(text) == {"dns": True, "allow": []}
    assert load_text(text, tmp_path).allow == ()


def test_a_learn_mode_report_says_so_and_older_reports_read_as_not_learning() -> None:
    from orchestrator.capture import report as reports

    from .test_report import RUN_1
    from .test_report import recorded as recorded_report

    enforced = recorded_report("rpa", RUN_1)
    assert enforced.policy is not None and enforced.policy.learn == "off"
    assert "LEARN MODE" not in reports.render_html(enforced)
    learning = dataclasses.replace(
        enforced, policy=dataclasses.replace(enforced.policy, learn="allow-all")
    )
    assert "LEARN MODE (allow-all)" in reports.render_html(learning)
    assert reports.from_json(reports.to_json(learning), "x").policy == learning.policy
    older = reports.to_json(enforced).replace(',\n    "learn": "off"', "")
    assert '"learn"' not in older
    assert reports.from_json(older, "x") == enforced


# ---- learning under the sinkhole ----------------------------------------------------------------

GATEWAY = "192.168.208.17"  # the recording's sandbox network gateway (its resolver)


def test_learning_under_the_sinkhole_lets_nothing_out() -> None:
    base = build_policy([], sinkhole=True)
    policy = learn_policy(base, OWN, mode=Learn.SINKHOLE)
    assert policy.learn is Learn.SINKHOLE and policy.sinkhole and policy.allow == ()
    assert policy == dataclasses.replace(base, learn=Learn.SINKHOLE)
    # Both filters: the gateway (the sinkhole), and nothing outside.
    enforced = policy.with_sinkhole(ipaddress.IPv4Address(GATEWAY))
    assert enforced.allows("tcp", GATEWAY, 80) and enforced.allows("udp", GATEWAY, 5353)
    for proto, dst, port in [("tcp", "203.0.113.7", 443), ("udp", "198.51.100.9", 5353)]:
        assert not enforced.allows(proto, dst, port)
    assert not enforced.allows("tcp", "2001:db8:1::9", 80)
    assert EgressPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("policy", "mode", "message", "hint"),
    [
        # No resolver: nothing to learn names from (allow-all would use outside resolvers).
        (build_policy([], dns=False), Learn.ALLOW_ALL, "--no-dns", "drop --no-dns"),
        # A policy file's sinkhole: true under --learn alone: the user says which.
        (build_policy([], sinkhole=True), Learn.ALLOW_ALL, "sinkhole mode on", "--no-sinkhole"),
        (build_policy([]), Learn.SINKHOLE, "sinkhole mode", "--learn --sinkhole"),
        # Nothing leaves while learning under the sinkhole: no allow entries.
        (
            build_policy(["203.0.113.7:443"], sinkhole=True),
            Learn.SINKHOLE,
            "would let these out: 203.0.113.7:443",
            "--sinkhole --policy FILE without --learn",
        ),
    ],
)
def test_learn_modes_that_would_not_learn_what_they_say_are_refused(
    policy: EgressPolicy, mode: Learn, message: str, hint: str
) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        learn_policy(policy, OWN, mode=mode)
    assert hint in (raised.value.hint or "")


def _sinkholed(**changes: object) -> Attempt:
    """The recording's named call as learning under the sinkhole records it."""
    named = next(a for a in recorded() if a.verdict is Verdict.ALLOWED and a.dport == 80)
    fields: dict[str, object] = {"verdict": Verdict.SINKHOLED, "dst": GATEWAY, "family": 4}
    return dataclasses.replace(named, **{**fields, **changes})  # type: ignore[arg-type]


def sinkhole_learned() -> list[Attempt]:
    """What `run --learn --sinkhole learn_me.php` records: the name sinkholed (with the HTTP
    request the sinkhole read), the literal addresses blocked, and a connection to the sinkhole
    with no name behind it and one to the gateway's SSH port, host-blocked."""
    out: list[Attempt] = []
    for attempt in recorded():
        if attempt.verdict is Verdict.ALLOWED and attempt.dport == 80:
            out.append(_sinkholed(http="GET www.inet.test /", payload="HTTP request"))
        elif attempt.verdict is Verdict.ALLOWED:
            out.append(dataclasses.replace(attempt, verdict=Verdict.BLOCKED))
        else:
            out.append(attempt)
    out.append(_sinkholed(id="nameless", dns_name=None, dport=8080))
    out.append(
        _sinkholed(
            id="literal",
            dport=9000,
            stack=(Frame("fsockopen", "/x/learn_me.php", 40, f"'{GATEWAY}', 9000"),),
        )
    )
    out.append(_sinkholed(id="ssh", verdict=Verdict.HOST_BLOCKED, dns_name=None, dport=22))
    return out


def test_sinkhole_learned_policy_golden(golden: Golden) -> None:
    result = suggest.suggest(sinkhole_learned(), inside=OWN)
    text = suggest.render(result, ["learned under the sinkhole from tests/data/learn"])
    golden.check("learn/suggested-policy-sinkhole.yaml", text)


def test_sinkholed_names_become_hosts_and_the_sinkhole_never_an_address(tmp_path: Path) -> None:
    result = suggest.suggest(sinkhole_learned(), inside=OWN)
    shown = [(e.host, e.address, e.proto, e.port) for e in result.entries]
    # The same entries as learning under allow-all: the name with its port, the literal
    # addresses (blocked while learning) as addresses.
    assert shown == [
        ("www.inet.test", None, "tcp", 80),
        (None, "198.51.100.9", "udp", 5353),
        (None, "203.0.113.7", "tcp", 443),
    ]
    assert result.skipped == (
        "sinkholed tcp port 8080 without a name (the sinkhole's own address)",
        "sinkholed tcp port 9000 without a name (the sinkhole's own address)",
        f"tcp port 22 to {GATEWAY}, inside the sandbox network",
    )
    text = suggest.render(result)
    assert "# not expressible as an allow entry: sinkholed tcp port 8080" in text
    assert yaml.safe_load(text)["allow"][0] == {"host": "www.inet.test", "proto": "tcp", "port": 80}
    assert "stream_socket_client() at learn_me.php:8 <- tcp() at learn_me.php:29" in text
    # Loads as `up --policy` loads it, and lets the recorded calls through at their real
    # addresses (www.inet.test resolved on the host at `up`).
    policy = load_text(text, tmp_path)
    assert policy.allows("tcp", "203.0.113.7", 80) and policy.allows("tcp", "2001:db8:1::9", 80)
    assert policy.allows("tcp", "203.0.113.7", 443)
    assert not policy.allows("tcp", GATEWAY, 80)
    assert not any(
        e.network.overlaps(own) for e in policy.allow for own in OWN if own.version == e.version
    )


def test_without_the_sandbox_ranges_a_nameless_sinkholed_attempt_is_still_skipped() -> None:
    # The sinkhole's address never becomes an entry, whatever ranges the caller knows.
    result = suggest.suggest([_sinkholed(dns_name=None)])
    assert result.entries == () and result.skipped == (
        "sinkholed tcp port 80 without a name (the sinkhole's own address)",
    )


def test_a_report_learned_under_the_sinkhole_says_nothing_left() -> None:
    from orchestrator.capture import report as reports

    from .test_report import RUN_1
    from .test_report import recorded as recorded_report

    enforced = recorded_report("rpa", RUN_1)
    assert enforced.policy is not None
    learning = dataclasses.replace(
        enforced,
        policy=dataclasses.replace(enforced.policy, learn="sinkhole", sinkhole=True),
    )
    page = reports.render_html(learning)
    assert "LEARN MODE (sinkhole)" in page and "Nothing left the machine" in page
    assert "every outside destination was allowed" not in page
    assert reports.from_json(reports.to_json(learning), "x").policy == learning.policy

"""A connection's first bytes summarised (capture/payload.py), on bytes recorded in a real VM.

tests/data/hostflows/php-requests.pcap is the host-side flow record of a real sandbox (lab, the
default image) in which PHP made, under `--allow 203.0.113.7 --allow www.inet.test`:
file_get_contents('http://www.inet.test/hello/path?q=1') and stream_socket_client to
tls://www.inet.test:443 (both over IPv6 to 2001:db8:1::9), a POST to http://203.0.113.7/v4/post
with an X-Token header, a tls://203.0.113.7:443 with peer_name api.inet.test, and a fsockopen to
203.0.113.7:80 that wrote "HELLO raw\\n" (not a request: the capture filter leaves it out).
php-requests.attempts.jsonl is the same sandbox's connections.jsonl, as collected then.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from orchestrator.capture import payload
from orchestrator.capture.records import Attempt

DATA = Path(__file__).parent / "data" / "hostflows"
PCAP = DATA / "php-requests.pcap"


def _segments() -> list[payload.Segment]:
    return payload.read_segments([PCAP])


def _client_hello() -> bytes:
    import dpkt

    with PCAP.open("rb") as handle:
        for _, frame in dpkt.pcap.Reader(handle):
            data = bytes(dpkt.ethernet.Ethernet(frame).data.data.data)
            if data[:1] == b"\x16":
                return data
    raise AssertionError("no ClientHello in the recording")


def test_real_requests_are_read_from_the_host_flow_record() -> None:
    found = [(s.dst, s.dport, s.payload.kind, s.payload.sni, s.payload.http) for s in _segments()]
    assert found == [
        ("2001:db8:1::9", 80, "http", None, "GET www.inet.test /hello/path?q=1"),
        ("2001:db8:1::9", 443, "tls", "www.inet.test", None),
        ("203.0.113.7", 80, "http", None, "POST 203.0.113.7 /v4/post"),
        ("203.0.113.7", 443, "tls", "api.inet.test", None),
    ]
    post = _segments()[2].payload
    assert ("x-token", "abc") in post.headers and post.method == "POST"


def test_a_cut_client_hello_names_no_server() -> None:
    hello = _client_hello()
    assert payload.summarize(hello).sni == "www.inet.test"
    # Cut before its extensions end: no name is made up from half a record.
    cut = payload.summarize(hello[:200])
    assert cut.kind == "raw" and cut.sni is None and cut.size == 200
    assert cut.hex == hello[: payload.HEX_BYTES].hex()


def test_anything_else_is_capped_hex_and_never_raises() -> None:
    raw = payload.summarize(b"HELLO raw\n" * 1000)
    assert raw.kind == "raw" and raw.size == payload.READ_BYTES
    assert raw.hex == (b"HELLO raw\n" * 10)[: payload.HEX_BYTES].hex()
    assert raw.describe().startswith(f"{payload.READ_BYTES} bytes: 48454c4c4f")
    hello = _client_hello()
    rng = random.Random(16)
    for _ in range(2000):
        data = bytearray(hello if rng.random() < 0.5 else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        summary = payload.summarize(bytes(data[: rng.randint(0, len(data))]))
        assert summary.sni is None or len(summary.sni) <= payload.MAX_NAME


def test_a_hostile_request_is_bounded() -> None:
    long = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: " + b"h" * 600 + b"\r\n"
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    summary = payload.summarize(long + headers + b"\r\n")
    assert summary.kind == "http"
    assert summary.path is not None and len(summary.path) <= payload.MAX_PATH
    assert summary.host is not None and len(summary.host) <= payload.MAX_NAME


def test_attach_joins_the_guest_attempts_by_socket() -> None:
    attempts = [Attempt.from_json(line) for line in (DATA / "php-requests.attempts.jsonl").open()]
    joined = payload.attach(attempts, _segments())
    sent = {(a.dst, a.dport, a.sport): (a.sni, a.http) for a in joined if a.sni or a.http}
    assert sent == {
        ("2001:db8:1::9", 80, 45284): (None, "GET www.inet.test /hello/path?q=1"),
        ("2001:db8:1::9", 443, 46904): ("www.inet.test", None),
        ("203.0.113.7", 80, 35796): (None, "POST 203.0.113.7 /v4/post"),
        ("203.0.113.7", 443, 60910): ("api.inet.test", None),
    }
    # The raw fsockopen, the DNS queries and the probes are left as they were.
    untouched = [a for a in joined if not (a.sni or a.http)]
    assert len(untouched) == len(attempts) - 4
    assert all(a in attempts for a in untouched)
    # Another socket on the same destination gets nothing; nor does one far from it in time.
    other = dataclasses.replace(attempts[3], sport=1)
    late = dataclasses.replace(attempts[3], time="2026-12-06T21:27:46.063Z")
    assert payload.attach([other, late], _segments()) == [other, late]


def test_records_keep_what_was_sent_and_old_lines_still_load() -> None:
    attempts = [Attempt.from_json(line) for line in (DATA / "php-requests.attempts.jsonl").open()]
    joined = payload.attach(attempts, _segments())
    for attempt in joined:
        assert Attempt.from_json(attempt.to_json()) == attempt
    assert '"sni"' not in attempts[0].to_json()  # absent, not null, when unknown

"""xdebug: the guest configuration, each run's environment, the trace parser and the join of
traces with connection attempts, on real traces and attempts from a guest (tests/data/xdebug/,
see its README) and on cut, compressed and made-up variants of them."""

from __future__ import annotations

import dataclasses
import gzip
import re
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.capture.records import Attempt, Frame, Verdict, iso_time, parse_time
from orchestrator.run import xdebug
from orchestrator.run.xdebug import XdebugMode

from .conftest import Golden

DATA = Path(__file__).parent / "data" / "xdebug"
SAMPLES = [
    "phone_home",
    "phone_home_2",
    "example",
    "burst",
    "burst_auditd",
    "killed",
    "composer",
    "guzzle",
    "guzzle_2",
    "symfony",
    "streams",
    "learn",
]


def _traces(sample: str) -> list[xdebug.Trace]:
    return [
        xdebug.parse_trace(path.read_bytes(), path.name)
        for path in sorted((DATA / sample).iterdir())
        if xdebug.is_trace_name(path.name)
    ]


def _attempts(sample: str) -> list[Attempt]:
    text = (DATA / sample / "attempts.jsonl").read_text()
    return [Attempt.from_json(line) for line in text.splitlines()]


def _described(attempt: Attempt) -> str:
    """`fsockopen() at phone_home.php:12 ← main`, or "" without a PHP stack."""
    return " ← ".join(frame.describe() for frame in attempt.stack)


def _origin(attempt: Attempt) -> str:
    """The innermost frame as function@line."""
    return f"{attempt.stack[0].function}@{attempt.stack[0].line}" if attempt.stack else ""


def _render(trace: xdebug.Trace) -> str:
    lines = [
        f"pid={trace.pid} start={trace.start:.6f} error={trace.start_error:.6f} "
        f"end={trace.end:.6f} complete={trace.complete}"
    ]
    for call in trace.calls:
        leave = "-" if call.exit is None else f"{call.exit:.6f}"
        lines.append(
            f"{call.number} L{call.level} parent={call.parent} {call.function} "
            f"{'internal' if call.internal else 'user'} {call.file}:{call.line} "
            f"[{call.entry:.6f}, {leave}] ({', '.join(call.args)})"
        )
    return "\n".join(lines) + "\n"


# ---- configuration -----------------------------------------------------------------------------


def test_guest_files_golden(golden: Golden) -> None:
    files = xdebug.guest_files(XdebugMode.TRACE)
    assert sorted(files) == [
        "/etc/sandbox/php/coverage/coverage.ini",
        "/etc/sandbox/php/coverage/prepend.php",
        "/etc/sandbox/php/xdebug.ini",
    ]
    for path, content in files.items():
        golden.check(f"xdebug/{path.rsplit('/', 1)[-1]}", content)


# What composer/xdebug-handler 3.0.3 (Debian's, XdebugHandler::writeTmpIni) comments out of
# every ini it copies into the restarted PHP's: PHP's /mi is Python's MULTILINE | IGNORECASE.
HANDLER_REGEX = re.compile(r"^\s*(zend_extension\s*=.*xdebug.*)$", re.MULTILINE | re.IGNORECASE)


def test_the_ini_loads_xdebug_through_a_line_the_handler_keeps() -> None:
    ini = xdebug.guest_files(XdebugMode.TRACE)["/etc/sandbox/php/xdebug.ini"]
    loads = [line for line in ini.splitlines() if line.startswith("zend_extension")]
    assert loads == [f"zend_extension={xdebug.GUEST_EXTENSION}"]
    assert HANDLER_REGEX.search(ini) is None
    assert HANDLER_REGEX.search("zend_extension=xdebug.so") is not None  # what it was before
    # The image makes the link the ini names.
    recipe = (Path(__file__).parent.parent / "images" / "customize.sh").read_text()
    assert f'"$root{xdebug.GUEST_EXTENSION}"' in recipe


@pytest.mark.parametrize(
    ("mode", "line"),
    [
        (XdebugMode.TRACE, "xdebug.mode=trace"),
        (XdebugMode.DEBUG, "xdebug.mode=debug,trace"),
        (XdebugMode.DEVELOP, "xdebug.mode=develop,trace"),
        (XdebugMode.PROFILE, "xdebug.mode=profile"),
        (XdebugMode.COVERAGE, "xdebug.mode=coverage"),
        (XdebugMode.OFF, "xdebug.mode=off"),
    ],
)
def test_guest_ini_default_mode(mode: XdebugMode, line: str) -> None:
    ini = xdebug.guest_files(mode)["/etc/sandbox/php/xdebug.ini"]
    assert [x for x in ini.splitlines() if x.startswith("xdebug.mode=")] == [line]
    # What the join depends on is there whatever the default.
    for setting in ("trace_format=1", "trace_output_name=trace.%p.%r", "start_with_request=yes"):
        assert f"xdebug.{setting}\n" in ini


def test_run_env_trace() -> None:
    assert xdebug.run_env(XdebugMode.TRACE, "20261123-140000-abcd") == {
        "PHP_INI_SCAN_DIR": ":/etc/sandbox/php",
        "XDEBUG_MODE": "trace",
        "XDEBUG_CONFIG": "output_dir=/var/lib/sandbox/xdebug/20261123-140000-abcd",
    }


def test_run_env_debug_points_at_the_tunnel() -> None:
    env = xdebug.run_env(XdebugMode.DEBUG, "r", debug_port=41234)
    assert env["XDEBUG_MODE"] == "debug,trace"
    assert env["XDEBUG_CONFIG"] == (
        "output_dir=/var/lib/sandbox/xdebug/r client_host=127.0.0.1 client_port=41234"
    )
    default = xdebug.run_env(XdebugMode.DEBUG, "r")["XDEBUG_CONFIG"]
    assert default.endswith("client_port=9003")


def test_run_env_other_modes() -> None:
    assert xdebug.run_env(XdebugMode.DEVELOP, "r")["XDEBUG_MODE"] == "develop,trace"
    assert xdebug.run_env(XdebugMode.PROFILE, "r")["XDEBUG_MODE"] == "profile"
    coverage = xdebug.run_env(XdebugMode.COVERAGE, "r")
    assert coverage["XDEBUG_MODE"] == "coverage"
    assert coverage["PHP_INI_SCAN_DIR"] == ":/etc/sandbox/php:/etc/sandbox/php/coverage"
    # Off does not even load the extension.
    assert xdebug.run_env(XdebugMode.OFF, "r") == {}


def test_coverage_prepend_is_where_its_ini_says() -> None:
    files = xdebug.guest_files(XdebugMode.COVERAGE)
    ini = files["/etc/sandbox/php/coverage/coverage.ini"]
    assert f"auto_prepend_file={xdebug.COVERAGE_PREPEND}\n" in ini
    assert files[xdebug.COVERAGE_PREPEND].startswith("<?php\n")


def test_trace_names() -> None:
    assert xdebug.is_trace_name("trace.415.0b0e58.xt")
    assert xdebug.is_trace_name("trace.415.0b0e58.xt.gz")
    for other in (
        "cachegrind.out.893.04858a",
        "coverage.899.f02869.json",
        "trace.abc.0b0e58.xt",
        "trace.415.xt",
        "trace.415.0b0e58.xt.tmp",
    ):
        assert not xdebug.is_trace_name(other), other


# ---- parsing real traces -----------------------------------------------------------------------


def test_golden_parse_of_real_traces(golden: Golden) -> None:
    for sample in ("phone_home", "killed", "strings"):
        rendered = "".join(_render(trace) for trace in _traces(sample))
        golden.check(f"xdebug/{sample}-trace.txt", rendered)


def test_origin_comes_from_the_footer() -> None:
    parent, child = _traces("phone_home")
    # TRACE END [2026-12-05 18:34:16.913234] minus the footer's index 0.664733; the header
    # (18:34:16.297851, written in UTC although the script ran with TZ=America/New_York) is
    # 49 ms later: it is written after compilation.
    assert parent.pid == 328 and parent.complete and parent.start_error == 0.0
    assert parent.start == pytest.approx(parse_time("2026-12-05T18:34:16.248501Z").timestamp())
    assert child.pid == 330 and child.complete
    assert [c.function for c in child.calls] == ["{main}", "fsockopen"]


def test_without_a_footer_the_origin_is_bounded() -> None:
    for path in sorted((DATA / "phone_home").glob("trace.*")):
        whole = xdebug.parse_trace(path.read_bytes(), path.name)
        text = path.read_bytes()
        cut = text[: text.index(b"\t\t\t")]  # footer and TRACE END gone
        partial = xdebug.parse_trace(cut, path.name)
        assert not partial.complete and partial.start_error > 0
        assert abs(partial.start - whole.start) <= partial.start_error
        assert [c.number for c in partial.calls] == [c.number for c in whole.calls]


def test_killed_process() -> None:
    (trace,) = _traces("killed")
    assert not trace.complete
    assert trace.calls[-1].function == "usleep" and trace.calls[-1].exit is None
    running = [c.function for c in trace.calls if c.exit is None]
    assert running == ["{main}", "again", "usleep"]


def test_a_trace_cut_anywhere_parses_to_a_prefix() -> None:
    """A trace fetched while its process still writes it can end anywhere, even mid-line."""
    path = next((DATA / "phone_home").glob("trace.328.*"))
    data = path.read_bytes()
    whole = {c.number: c for c in xdebug.parse_trace(data, path.name).calls}
    header_end = data.index(b"]\n") + 2
    for size in range(header_end, len(data)):
        trace = xdebug.parse_trace(data[:size], path.name)
        for call in trace.calls:
            full = whole[call.number]
            assert call.exit in (None, full.exit)
            assert call == replace(full, exit=call.exit), size
    with pytest.raises(xdebug.TraceError):
        xdebug.parse_trace(data[: header_end - 2], path.name)


def test_gzip_traces() -> None:
    path = next((DATA / "phone_home").glob("trace.328.*"))
    plain = xdebug.parse_trace(path.read_bytes(), path.name)
    packed = gzip.compress(path.read_bytes())
    assert xdebug.parse_trace(packed, path.name + ".gz") == replace(plain, name=path.name + ".gz")
    # A compressed trace of a killed process has no gzip trailer: what inflates is kept.
    cut = xdebug.parse_trace(packed[: len(packed) * 2 // 3], path.name + ".gz")
    assert 0 < len(cut.calls) < len(plain.calls) and not cut.complete
    with pytest.raises(xdebug.TraceError, match="damaged gzip"):
        xdebug.parse_trace(b"\x1f\x8b" + b"\xff" * 40, "trace.1.ab.xt.gz")


def test_not_a_trace() -> None:
    with pytest.raises(xdebug.TraceError, match="not named like"):
        xdebug.parse_trace(b"", "cachegrind.out.893.04858a")
    with pytest.raises(xdebug.TraceError, match="no TRACE START"):
        xdebug.parse_trace(b"Version: 3.2.0\nFile format: 2\n", "trace.1.ab.xt")


def test_arguments_as_xdebug_writes_them() -> None:
    (trace,) = _traces("strings")
    md5 = [c for c in trace.calls if c.function == "md5"]
    # Control characters escaped (so tabs only separate fields), quotes escaped, other bytes
    # as they are (here \xff\xfe, not UTF-8), long strings cut at 512 bytes.
    assert md5[0].args == (
        "'tab\\there\\nnewline \\'quote\\' \\\\ back \\001 ctrl \ufffd\ufffd bytes ünï'",
    )
    assert md5[1].args[0] == "'" + "y" * 512 + "'..."


# ---- the join on real samples ------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES)
def test_golden_attribution(sample: str, golden: Golden) -> None:
    attributed = xdebug.attribute(_attempts(sample), _traces(sample))
    golden.check(f"xdebug/{sample}.jsonl", "".join(a.to_json() + "\n" for a in attributed))


PHONE_HOME = {
    # Checked by hand against the script, the destinations and the order of the calls.
    "k0-63974770261": "fsockopen@34",
    "k1-63992316011": "fsockopen@35",
    "k2-64001179221": "stream_socket_client@36",
    "k3-64003187121": "file_get_contents@37",
    "k4-64013265221": "fopen@38",
    "k5-64030537951": "curl_exec@29",
    "k6-64044386891": "socket_connect@41",
    "k7-64067531611": "gethostbyname@43",
    "k8-64074991421": "gethostbyname@43",  # glibc asks twice (the answer is REFUSED, attempts:2)
    "k9-64078064141": "dns_get_record@44",  # so does the resolver behind dns_get_record()
    "k10-64081264001": "dns_get_record@44",
    "k11-64087281941": "fsockopen@7",
    "k12-64089285091": "stream_socket_client@17",
    "c64091636021-328-43": "fsockopen@47",  # IPv6: the connect() only, no firewall record
    "k13-64094336231": "gethostbyname@49",
    "k14-64096623491": "gethostbyname@49",
    "k15-64465594721": "fsockopen@3",  # the child process
}


def test_every_attempt_of_phone_home_names_its_line() -> None:
    attributed = xdebug.attribute(_attempts("phone_home"), _traces("phone_home"))
    assert {a.id.split(".")[0]: _origin(a) for a in attributed} == PHONE_HOME
    by_id = {a.id.split(".")[0]: a for a in attributed}
    path = "/var/lib/sandbox/runs/20261205-183414-8c60/phone_home.php"
    assert by_id["k11-64087281941"].stack == (
        Frame("fsockopen", path, 7, "'198.51.100.9', 80, NULL, NULL, 2"),
        Frame("phone_home", path, 45),
        Frame("{main}", "", 0),
    )
    assert _described(by_id["k12-64089285091"]) == (
        "stream_socket_client() at phone_home.php:17 ← Client->send() at phone_home.php:46 ← main"
    )
    assert [f.function for f in by_id["k5-64030537951"].stack] == [
        "curl_exec",
        "Client::fetch",
        "{main}",
    ]
    assert by_id["k14-64096623491"].stack[1] == Frame("{closure:phone_home.php:48-50}", path, 51)
    assert by_id["k15-64465594721"].stack == (
        Frame(
            "fsockopen",
            "/var/lib/sandbox/runs/20261205-183414-8c60/child.php",
            3,
            "'198.51.100.9', 443, NULL, NULL, 2",
        ),
        Frame("{main}", "", 0),
    )


def test_second_run_of_phone_home() -> None:
    """Same script, other timings; curl_init() names the URL but curl_exec() connects."""
    attributed = xdebug.attribute(_attempts("phone_home_2"), _traces("phone_home_2"))
    origins = [_origin(a) for a in sorted(attributed, key=lambda a: (a.time, a.id))]
    assert origins == [
        "fsockopen@34",
        "fsockopen@35",
        "stream_socket_client@36",
        "file_get_contents@37",
        "fopen@38",
        "curl_exec@29",
        "socket_connect@41",
        "gethostbyname@43",
        "gethostbyname@43",
        "dns_get_record@44",
        "dns_get_record@44",
        "fsockopen@7",
        "stream_socket_client@17",
        "fsockopen@47",
        "gethostbyname@49",
        "gethostbyname@49",
        "fsockopen@3",
    ]


def test_the_example_script() -> None:
    attributed = xdebug.attribute(_attempts("example"), _traces("example"))
    assert [(a.verdict, a.dst, _described(a)) for a in attributed] == [
        (
            Verdict.ALLOWED,
            "203.0.113.7",
            "fsockopen() at example.php:26 ← Telemetry->send() at example.php:43 ← main",
        ),
        (
            Verdict.BLOCKED,
            "198.51.100.9",
            "file_get_contents() at example.php:39 ← check_licence() at example.php:44 ← main",
        ),
        (Verdict.DNS, "192.168.208.17", "gethostbyname() at example.php:45 ← main"),
        (Verdict.DNS, "192.168.208.17", "gethostbyname() at example.php:45 ← main"),
        (
            Verdict.BLOCKED,
            "2001:db8:1::9",
            "stream_socket_client() at example.php:47 ← main",
        ),
    ]


def _numbered_burst(sample: str) -> tuple[list[Attempt], xdebug.Trace]:
    """A burst sample with each fsockopen()'s timeout argument replaced by its call number:
    the stacks of the 100 connects differ only there. The join never reads a timeout."""
    path = next((DATA / sample).glob("trace.*"))
    text = path.read_text()

    def number(match: re.Match[str]) -> str:
        return f"{match.group(1)}{match.group(2)}{match.group(3)}{match.group(2)}"

    text = re.sub(r"^(\d+\t)(\d+)(\t0\t.*\tfsockopen\t.*\t)1$", number, text, flags=re.M)
    return _attempts(sample), xdebug.parse_trace(text.encode(), path.name)


def _burst_calls(sample: str) -> tuple[list[Attempt], xdebug.Trace, list[int]]:
    """The burst's attempts joined, its trace, and the number of the call each connect got
    (the name lookup before the burst left out)."""
    attempts, trace = _numbered_burst(sample)
    fsockopens = [c.number for c in trace.calls if c.function == "fsockopen"]
    attributed = xdebug.attribute(attempts, [trace])
    used = [int(str(a.stack[0].args).rsplit(", ", 1)[1]) for a in attributed if a.stack]
    assert used == fsockopens  # every attempt, each its own call, in order
    assert attributed[0].verdict is Verdict.DNS and used[0] == fsockopens[0]
    return attributed[1:], trace, used[1:]


@pytest.mark.parametrize("sample", ["burst", "burst_auditd"])
def test_back_to_back_connects_one_each(sample: str) -> None:
    connects, _trace, used = _burst_calls(sample)
    assert len(connects) == len(used) == 100
    assert all(a.dst == "198.51.100.9" for a in connects)


def test_connect_stamps_are_to_the_millisecond() -> None:
    """The capture's stamp is the connect()'s return, inside the call that made it up to the
    millisecond it is cut to (and under half a millisecond between the two clocks, measured:
    0.43 ms at most). But three of these fsockopen() calls fit in a millisecond: the innermost
    call whose interval holds the stamp's millisecond is its own for only a few of them (9 of
    100 here), so the order of the calls still has to decide (the alignment)."""
    connects, trace, used = _burst_calls("burst")
    by_number = {c.number: c for c in trace.calls}
    naive_right = 0
    for attempt, number in zip(connects, used, strict=True):
        stamp = parse_time(attempt.time).timestamp()
        call = by_number[number]
        assert call.exit is not None
        assert trace.at(call.entry) - (stamp + 0.001) < 0.001 and stamp <= trace.at(call.exit)
        holding = [
            c
            for c in trace.calls
            if c.exit is not None
            and trace.at(c.entry) <= stamp + 0.001
            and trace.at(c.exit) >= stamp
        ]
        naive_right += max(holding, key=lambda c: c.level).number == number
    assert naive_right < 50


def test_auditd_stamps_came_before_their_call() -> None:
    """burst_auditd, recorded when attempt times came from auditd (the coarse clock at connect()
    entry, whose tick lag TCG stretches): most stamps fall before their own call even began,
    inside the previous one; the alignment still gives each connect its call (LATE)."""
    connects, trace, used = _burst_calls("burst_auditd")
    starts = {c.number: trace.at(c.entry) for c in trace.calls}
    early = [
        a
        for a, n in zip(connects, used, strict=True)
        if parse_time(a.time).timestamp() + 0.001 < starts[n]
    ]
    assert len(early) > 50


def test_a_trace_cut_short_still_attributes() -> None:
    attributed = xdebug.attribute(_attempts("killed"), _traces("killed"))
    assert [_origin(a) for a in attributed] == ["fsockopen@5"] * 6
    assert all(a.stack[1] == Frame("again", a.stack[0].file, 9) for a in attributed)


def test_attempts_without_a_trace_are_left_alone() -> None:
    attempts = _attempts("phone_home")
    traces = _traces("phone_home")
    first = attempts[0]
    strangers = [
        replace(first, id="x1", pid=None),
        replace(first, id="x2", pid=4242),
        replace(first, id="x3", time="2026-12-05T17:00:00.000Z"),  # before the process
        replace(first, id="x4", time="2026-12-05T20:00:00.000Z"),  # long after it ended
    ]
    attributed = xdebug.attribute([*strangers, *attempts], traces)
    assert attributed[:4] == strangers
    assert all(a.stack for a in attributed[4:])
    assert xdebug.attribute(strangers, []) == strangers


# ---- the join on made-up traces: what the samples do not show ----------------------------------

START = parse_time("2026-11-23T12:00:00.000Z").timestamp()


def _trace(pid: int, lines: list[str], *, complete: bool = True, offset: float = 0.0) -> bytes:
    """A computerized trace whose time index 0 is START + offset."""
    # The header is written after index 0, before the first call (at 0.001 here).
    body = ["Version: 3.2.0", "File format: 4", f"TRACE START [{_utc(START + offset + 0.0005)}]"]
    body += lines
    if complete:
        end = max(float(line.split("\t")[3]) for line in lines) + 0.001
        body += [f"\t\t\t{end:.6f}\t1000", f"TRACE END   [{_utc(START + offset + end)}]", ""]
    return ("\n".join(body) + "\n").encode()


def _utc(moment: float) -> str:
    return iso_time(moment).replace("T", " ").replace("Z", "000")


def _call(number: int, level: int, time: float, function: str, *args: str, line: int = 1) -> str:
    internal = "0" if function in xdebug.NETWORK_FUNCTIONS or function == "strlen" else "1"
    fields = [str(level), str(number), "0", f"{time:.6f}", "1000", function, internal, ""]
    return "\t".join([*fields, "/a.php", str(line), str(len(args)), *args])


def _exit(number: int, level: int, time: float) -> str:
    return f"{level}\t{number}\t1\t{time:.6f}\t1000"


def _attempt(ident: str, pid: int, at: float, dst: str, **changes: object) -> Attempt:
    attempt = Attempt(
        id=ident,
        time=iso_time(START + at),
        verdict=Verdict.BLOCKED,
        proto="tcp",
        family=6 if ":" in dst else 4,
        dst=dst,
        dport=80,
        pid=pid,
    )
    return replace(attempt, **changes)  # type: ignore[arg-type]


def test_a_name_the_resolver_returned_counts_as_named() -> None:
    data = _trace(
        7,
        [
            _call(0, 1, 0.001, "{main}"),
            _call(1, 2, 0.010, "fsockopen", "'api.example'", "443", line=3),
            _exit(1, 2, 0.030),
            _call(2, 2, 0.031, "fsockopen", "'198.51.100.9'", "443", line=4),
            _exit(2, 2, 0.050),
        ],
    )
    trace = xdebug.parse_trace(data, "trace.7.aa.xt")
    lookup = _attempt("d", 7, 0.012, "192.168.1.1", verdict=Verdict.DNS, proto="udp")
    # Stamped inside the second call, but the resolver said api.example is 203.0.113.7.
    connect = _attempt("c", 7, 0.029, "203.0.113.7", dns_name="api.example", dport=443)
    attributed = xdebug.attribute([lookup, connect], [trace])
    assert [_origin(a) for a in attributed] == ["fsockopen@3", "fsockopen@3"]


def test_a_process_that_ran_php_twice() -> None:
    """pcntl_exec() keeps the pid: the first trace ends without a footer, the second starts."""
    first = _trace(
        7,
        [_call(0, 1, 0.001, "{main}"), _call(1, 2, 0.010, "fsockopen", "'198.51.100.9'")],
        complete=False,
    )
    second = _trace(
        7,
        [
            _call(0, 1, 0.001, "{main}"),
            _call(1, 2, 0.010, "fsockopen", "'198.51.100.9'", line=9),
            _exit(1, 2, 0.020),
        ],
        offset=1.0,
    )
    traces = [
        xdebug.parse_trace(second, "trace.7.bb.xt"),
        xdebug.parse_trace(first, "trace.7.aa.xt"),
    ]
    attempts = [_attempt("a", 7, 0.012, "198.51.100.9"), _attempt("b", 7, 1.012, "198.51.100.9")]
    assert [_origin(a) for a in xdebug.attribute(attempts, traces)] == [
        "fsockopen@1",
        "fsockopen@9",
    ]


def test_calls_left_by_an_exception_get_the_right_parents() -> None:
    """A call whose exit line never came (unwound) is not the parent of the next call."""
    data = _trace(
        7,
        [
            _call(0, 1, 0.001, "{main}"),
            _call(1, 2, 0.002, "risky"),
            _call(2, 3, 0.003, "strlen", "'x'"),
            _call(3, 2, 0.010, "fsockopen", "'198.51.100.9'", line=8),
            _exit(3, 2, 0.020),
        ],
    )
    trace = xdebug.parse_trace(data, "trace.7.aa.xt")
    by_function = {c.function: c for c in trace.calls}
    assert by_function["fsockopen"].parent == 0
    (attributed,) = xdebug.attribute([_attempt("a", 7, 0.011, "198.51.100.9")], [trace])
    assert [f.function for f in attributed.stack] == ["fsockopen", "{main}"]


def test_the_other_address_loses_to_the_named_one() -> None:
    data = _trace(
        7,
        [
            _call(0, 1, 0.001, "{main}"),
            _call(1, 2, 0.010, "fsockopen", "'203.0.113.7'", line=3),
            _exit(1, 2, 0.014),
            _call(2, 2, 0.015, "stream_socket_client", "'tcp://[2001:db8:1::9]:80'", line=4),
            _exit(2, 2, 0.019),
        ],
    )
    trace = xdebug.parse_trace(data, "trace.7.aa.xt")
    # Both stamped in the first call's interval; equal stamps, listed in the wrong order.
    attempts = [_attempt("v6", 7, 0.011, "2001:db8:1::9"), _attempt("v4", 7, 0.011, "203.0.113.7")]
    assert [_origin(a) for a in xdebug.attribute(attempts, [trace])] == [
        "stream_socket_client@4",
        "fsockopen@3",
    ]


def test_one_server_by_name_and_by_address_on_two_ports() -> None:
    """tests/data/learn/learn_me.php: www.inet.test is 203.0.113.7, called by name on 80, then
    by address on 443. Both calls name the address; the port tells them apart, however late
    the first connect's stamp comes (here inside the second call)."""
    data = _trace(
        7,
        [
            _call(0, 1, 0.001, "{main}"),
            _call(1, 2, 0.010, "stream_socket_client", "'tcp://www.inet.test:80'", line=29),
            _exit(1, 2, 0.014),
            _call(2, 2, 0.015, "stream_socket_client", "'tcp://203.0.113.7:443'", line=30),
            _exit(2, 2, 0.019),
            _call(3, 2, 0.020, "fsockopen", "'203.0.113.7'", "8080", line=31),
            _exit(3, 2, 0.024),
        ],
    )
    trace = xdebug.parse_trace(data, "trace.7.aa.xt")
    # The resolver's answer names both connects www.inet.test. Stamped in one millisecond
    # and listed in the wrong order, their destinations alone cannot tell them apart.
    by_name = _attempt("n", 7, 0.0145, "203.0.113.7", dns_name="www.inet.test", dport=80)
    by_address = _attempt("a", 7, 0.0145, "203.0.113.7", dns_name="www.inet.test", dport=443)
    by_port_argument = _attempt("p", 7, 0.021, "203.0.113.7", dport=8080)
    # getaddrinfo()'s probe of the address it sorts: port 0, the lookup's call.
    probe = _attempt("q", 7, 0.012, "203.0.113.7", dns_name="www.inet.test", dport=0, proto="udp")
    attempts = [by_address, probe, by_name, by_port_argument]
    assert [_origin(a) for a in xdebug.attribute(attempts, [trace])] == [
        "stream_socket_client@30",
        "stream_socket_client@29",
        "stream_socket_client@29",
        "fsockopen@31",
    ]


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("tcp://www.inet.test:80", 80),
        ("https://example.org/x", 443),
        ("http://[2001:db8::1]/", 80),
        ("[2001:db8::1]:8443", 8443),
        ("203.0.113.7:25", 25),
        ("tcp://203.0.113.7", None),
        ("2001:db8::1", None),
        ("example.org", None),
        ("example.org:99999", None),
    ],
)
def test_the_port_a_string_names(text: str, port: int | None) -> None:
    assert xdebug._port(text) == port


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(xdebug.TraceError, match="inflates to more than 1 MiB"):
        xdebug._decompress(bomb, "trace.1.ab.xt.gz", limit=1 << 20)
    assert xdebug._decompress(gzip.compress(b"ok"), "t", limit=2) == b"ok"


# --- the requests of `sandbox serve` -------------------------------------------------------------


def test_each_serve_request_is_named_from_its_trace() -> None:
    traces = _traces("serve")
    assert sorted(xdebug.request_of(t) or "" for t in traces) == [
        "GET /fetch",
        "GET /phone?from=test",
    ]
    # A trace without the serve prepend names no request.
    assert all(xdebug.request_of(t) is None for t in _traces("phone_home"))


def test_attempts_get_the_request_being_served_and_the_line() -> None:
    traces = _traces("serve")
    attempts = xdebug.name_requests(xdebug.attribute(_attempts("serve"), traces), traces)
    assert [(a.dst, a.request, _origin(a)) for a in attempts] == [
        ("198.51.100.9", "GET /phone?from=test", "fsockopen@5"),
        ("203.0.113.7", "GET /fetch", "file_get_contents@10"),
    ]
    # Outside every request's trace (another process, or between requests): no request.
    other = dataclasses.replace(attempts[0], request=None, pid=9999)
    later = dataclasses.replace(attempts[0], request=None, time="2026-12-05T18:00:00.000Z")
    assert [a.request for a in xdebug.name_requests([other, later], traces)] == [None, None]


def test_a_request_name_is_bounded_and_unquoted() -> None:
    call = xdebug.Call(
        1,
        1,
        xdebug.SERVE_MARKER,
        False,
        "/etc/sandbox/php/serve-prepend.php",
        9,
        ("'POST'", "'/" + "a" * 600 + "'..."),
        0.0,
        0.0,
        None,
    )
    trace = xdebug.Trace(1, "trace.1.ab.xt", 0.0, 0.0, 1.0, True, (call,))
    named = xdebug.request_of(trace)
    assert named is not None and named.startswith("POST /aaa") and len(named) == 300
    # Only our own marker counts: an internal function of that name is not it.
    internal = dataclasses.replace(call, internal=True)
    assert xdebug.request_of(dataclasses.replace(trace, calls=(internal,))) is None


# ---- real packages: a restarted Composer, curl_multi requests ----------------------------------

CURL_DOWNLOADER = "/usr/share/php/Composer/Util/Http/CurlDownloader.php"


def _request_url(attempt: Attempt) -> str:
    """The URL in the innermost frame's arguments (curl_setopt or curl_setopt_array)."""
    assert attempt.stack and attempt.stack[0].args is not None, attempt
    found = re.search(r"(?:^|, )(?:10002 => |10002, )'([^']*)'", attempt.stack[0].args)
    assert found, attempt.stack[0].args
    return found.group(1)


def test_composer_restarted_by_xdebug_handler_is_traced_and_attributed() -> None:
    """`composer show` against a blocked repository: xdebug-handler restarted PHP (the first
    trace ends in proc_open with -n -c), the restarted process loaded xdebug again from the
    copied ini and made every attempt; each names the curl_setopt(CURLOPT_URL) of its own
    request in CurlDownloader, not the curl_multi_exec polling loop."""
    parent, restarted = _traces("composer")
    launch = [c for c in parent.calls if c.function == "proc_open"]
    assert len(launch) == 1 and launch[0].file.endswith("/XdebugHandler/XdebugHandler.php")
    assert "1 => '-n', 2 => '-c'" in launch[0].args[0]
    attempts = _attempts("composer")
    assert {a.pid for a in attempts} == {restarted.pid}
    attributed = xdebug.attribute(attempts, [parent, restarted])
    assert [(a.verdict, a.dst) for a in attributed] == [(Verdict.BLOCKED, "198.51.100.9")] * 4
    for attempt in attributed:
        assert attempt.stack[0] == Frame(
            "curl_setopt",
            CURL_DOWNLOADER,
            193,
            "class CurlHandle {  }, 10002, 'http://198.51.100.9/packages.json'",
        )
    # The first request, then Composer's three retries (restartJob), each its own request.
    callers = [(a.stack[1].line, a.stack[2].function) for a in attributed]
    assert (
        callers
        == [(140, "Composer\\Util\\Http\\CurlDownloader->download")]
        + [(589, "Composer\\Util\\Http\\CurlDownloader->restartJob")] * 3
    )
    assert all(a.stack[-2].file == "/usr/bin/composer" for a in attributed)


@pytest.mark.parametrize("sample", ["guzzle", "guzzle_2"])
def test_guzzle_async_requests_name_the_request_not_the_poll(sample: str) -> None:
    """Three getAsync() requests in flight together (GuzzleHttp\\Handler\\CurlMultiHandler):
    each attempt, the resolver query of curl's thread included, names the request it was for:
    curl_setopt_array in Guzzle's CurlFactory, down to the getAsync() line of the script. In
    guzzle_2 the query came while the script read the blocked request's error (curl_getinfo in
    CurlFactory::finishError), outside any curl_multi call."""
    attributed = xdebug.attribute(_attempts(sample), _traces(sample))
    resolver = attributed[2].dst  # the sandbox network's own address: each sandbox has one
    rows = [
        (a.verdict, a.dst, _request_url(a), a.stack[0].function, a.stack[-2].line)
        for a in attributed
    ]
    assert rows == [
        (
            Verdict.ALLOWED,
            "203.0.113.7",
            "http://203.0.113.7/guzzle/allowed",
            "curl_setopt_array",
            7,
        ),
        (
            Verdict.BLOCKED,
            "198.51.100.9",
            "http://198.51.100.9/guzzle/blocked",
            "curl_setopt_array",
            8,
        ),
        (Verdict.DNS, resolver, "http://www.inet.test/guzzle/named", "curl_setopt_array", 9),
        (
            Verdict.ALLOWED,
            "2001:db8:1::9",
            "http://www.inet.test/guzzle/named",
            "curl_setopt_array",
            9,
        ),
    ]
    for attempt in attributed:
        assert attempt.stack[0].file == "/usr/share/php/GuzzleHttp/Handler/CurlFactory.php"
        assert attempt.stack[0].line == 70
        assert attempt.stack[-2].function == "GuzzleHttp\\Client->getAsync"


def test_symfony_http_client_requests() -> None:
    attributed = xdebug.attribute(_attempts("symfony"), _traces("symfony"))
    assert [(a.dst, _request_url(a)) for a in attributed] == [
        ("203.0.113.7", "http://203.0.113.7/symfony/allowed"),
        ("198.51.100.9", "http://198.51.100.9/symfony/blocked"),
        ("192.168.208.1", "http://www.inet.test/symfony/named"),
        ("2001:db8:1::9", "http://www.inet.test/symfony/named"),
    ]
    for attempt in attributed:
        assert _described(attempt) == (
            "curl_setopt() at CurlHttpClient.php:316"
            " ← Symfony\\Component\\HttpClient\\CurlHttpClient->request() at symfony.php:9 ← main"
        )


def test_without_a_dns_name_a_named_request_still_fits() -> None:
    """The address 2001:db8:1::9 is in no URL; without the name the resolver returned for it,
    the only request that can have led there is the one naming a host."""
    attempts = [replace(a, dns_name=None) for a in _attempts("guzzle")]
    attributed = xdebug.attribute(attempts, _traces("guzzle"))
    assert _request_url(attributed[3]) == "http://www.inet.test/guzzle/named"
    assert _request_url(attributed[0]) == "http://203.0.113.7/guzzle/allowed"


def test_an_attempt_no_request_fits_keeps_the_polling_call() -> None:
    """A connect to an address and name no queued request names (a redirect, a proxy) is not
    pinned on a request that did not make it: it keeps the curl_multi call it was made in."""
    attempts = [
        replace(a, dst="192.0.2.99", dns_name="proxy.example") for a in _attempts("symfony")[:2]
    ]
    attributed = xdebug.attribute(attempts, _traces("symfony"))
    assert all(a.stack[0].function in xdebug.ASYNC_DRIVERS for a in attributed)
    assert all(a.stack[0].file.endswith("/Response/CurlResponse.php") for a in attributed)


def test_non_blocking_streams_and_stream_contexts() -> None:
    """stream_socket_client(..., STREAM_CLIENT_ASYNC_CONNECT) connects (and looks the name up)
    inside the call itself, before stream_select waits on it; an HTTP stream with a context
    connects inside file_get_contents."""
    attributed = xdebug.attribute(_attempts("streams"), _traces("streams"))
    assert [(a.verdict, a.dst, _origin(a)) for a in attributed] == [
        (Verdict.ALLOWED, "203.0.113.7", "stream_socket_client@6"),
        (Verdict.BLOCKED, "198.51.100.9", "stream_socket_client@6"),
        (Verdict.DNS, attributed[2].dst, "stream_socket_client@6"),
        (Verdict.ALLOWED, "2001:db8:1::9", "stream_socket_client@6"),
        (Verdict.BLOCKED, "198.51.100.9", "file_get_contents@25"),
    ]
    assert [(a.stack[0].args or "").split(",")[0] for a in attributed[:4]] == [
        "'tcp://203.0.113.7:80'",
        "'tcp://198.51.100.9:80'",
        "'tcp://www.inet.test:80'",
        "'tcp://www.inet.test:80'",
    ]

"""`sandbox report`: the pure core (records -> model -> JSON / HTML, two runs compared) on records
a real guest made (tests/data/report/README.md), the run naming across sandboxes, the CLI, and
the HTML opened in a real headless browser (chromium from Debian)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from orchestrator import cli, lifecycle, paths
from orchestrator.capture import logview
from orchestrator.capture import report as reports
from orchestrator.capture.records import Attempt
from orchestrator.config import Settings
from orchestrator.errors import NotFoundError, UsageError
from orchestrator.run import target as runs

from .conftest import Golden

DATA = Path(__file__).parent / "data" / "report"
RUN_1 = "20261205-205013-a315"  # rpa: v1/audit.php, allowed 203.0.113.7 and www.inet.test
RUN_2 = "20261205-205020-dd58"  # rpa: v2/audit.php
RUN_B = "20261205-205100-5f09"  # rpb: v1/audit.php, allowed 203.0.113.7 and 198.51.100.9:443
HOSTILE_EXE = "/tmp/<script>alert(1)</script>\x1b[31m"  # what v1/audit.php named its helper


def recorded(sandbox: str, run_id: str) -> reports.Report:
    logs = DATA / sandbox / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == run_id]
    return reports.build(sandbox, record, logview.read_attempts(logs), logview.read_dns(logs))


def test_the_json_of_a_recorded_run(golden: Golden) -> None:
    golden.check("report/rpa-run1.json", reports.to_json(recorded("rpa", RUN_1)))


def test_the_html_of_a_recorded_run(golden: Golden) -> None:
    golden.check("report/rpa-run1.html", reports.render_html(recorded("rpa", RUN_1)))


def test_the_diff_of_two_sandboxes_runs(golden: Golden) -> None:
    result = reports.diff(recorded("rpa", RUN_1), recorded("rpb", RUN_B))
    golden.check("report/diff-rpa-rpb.json", reports.to_json(result))


def test_destinations_processes_dns_and_policy_of_a_run() -> None:
    report = recorded("rpa", RUN_1)
    assert report.schema == "sandbox-report/1"
    summary = {
        d.key: (d.verdict, d.count, d.php.describe() if d.php else None, d.names)
        for d in report.destinations
    }
    assert summary == {
        "tcp 203.0.113.7:80": ("allowed", 1, "fsockopen() at audit.php:4", ("www.inet.test",)),
        "tcp 198.51.100.9:443": ("blocked", 1, "fsockopen() at audit.php:4", ()),
        "tcp [2001:db8:1::9]:80": (
            "allowed",
            1,
            "file_get_contents() at audit.php:10",
            ("www.inet.test",),
        ),
        # The helper ran php -n: no xdebug, no PHP line.
        "tcp 198.51.100.9:80": ("blocked", 1, None, ()),
    }
    # Only the run's records: the sandbox's log also holds run 2's and a stray record of none.
    assert [d.first for d in report.destinations] == sorted(d.first for d in report.destinations)
    assert report.counts == reports.Counts(
        attempts=7, allowed=2, blocked=2, destinations=4, dns_queries=4
    )
    assert [(p.pid, p.exe, p.attempts) for p in report.processes] == [
        (326, "/usr/bin/php8.2", 6),
        (328, HOSTILE_EXE, 1),
    ]
    # Each query the resolver logged is tied to the guest socket that asked, and its PHP line.
    assert [
        (q.name, q.qtype, q.refused, q.php.describe() if q.php else None) for q in report.dns
    ] == [
        ("www.inet.test", "A", False, "file_get_contents() at audit.php:10"),
        ("www.inet.test", "AAAA", False, "file_get_contents() at audit.php:10"),
        ("api.inet.test", "A", True, "gethostbyname() at audit.php:11"),
        ("api.inet.test", "A", True, "gethostbyname() at audit.php:11"),
    ]
    assert report.policy == reports.PolicyInfo(
        allow=("203.0.113.7", "2001:db8:1::9 (www.inet.test)"),
        names=(reports.NameInfo("www.inet.test", ("2001:db8:1::9", "203.0.113.7")),),
        dns=True,
        blocked="reject",
    )
    kinds = [e.kind for e in report.timeline]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("attempt") == 7 and kinds.count("dns") == 4
    assert [e.time for e in report.timeline] == sorted(e.time for e in report.timeline)


def test_the_second_runs_queries_are_its_own() -> None:
    report = recorded("rpa", RUN_2)
    assert [(q.name, q.qtype) for q in report.dns] == [
        ("www.inet.test", "A"),
        ("www.inet.test", "AAAA"),
    ]
    assert {d.key for d in report.destinations} == {
        "tcp 203.0.113.7:80",
        "tcp [2001:db8:1::9]:80",
        "udp 198.51.100.9:5353",
        "tcp 198.51.100.9:80",
    }


def test_a_query_another_runs_record_claims_is_not_this_runs() -> None:
    """Run 2's queries fall in run 1's window once run 1 is said to have lasted longer (two runs
    at once): the guest's records of which socket asked keep them run 2's."""
    logs = DATA / "rpa" / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == RUN_1]
    longer = dataclasses.replace(record, ended=record.ended + 10 if record.ended else None)
    report = reports.build("rpa", longer, logview.read_attempts(logs), logview.read_dns(logs))
    assert len(report.dns) == 4
    assert {q.process for q in report.dns} == {"php8.2 (326)"}


def test_the_process_tree() -> None:
    """The helper's parent was a shell that made no attempt (ppid 327): with php as its parent
    it is shown under it; a ppid cycle the guest made up shows each process once."""
    logs = DATA / "rpa" / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == RUN_1]
    stored = logview.read_attempts(logs)

    def tree(change: dict[int, int]) -> list[tuple[int, int]]:
        attempts = [
            dataclasses.replace(a, ppid=change[a.pid]) if a.pid in change else a for a in stored
        ]
        report = reports.build("rpa", record, attempts, [])
        return [(p.pid, p.depth) for p in report.processes]

    assert tree({}) == [(326, 0), (328, 0)]
    assert tree({328: 326}) == [(326, 0), (328, 1)]
    assert tree({328: 326, 326: 328}) == [(326, 0), (328, 1)]
    assert tree({326: 326}) == [(326, 0), (328, 0)]


def test_a_deep_process_chain() -> None:
    """The guest decides how deep its process tree is: 5,000 generations are no recursion."""
    logs = DATA / "rpa" / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == RUN_1]
    (first, *_rest) = [a for a in logview.read_attempts(logs) if a.run == RUN_1]
    chain = [
        dataclasses.replace(first, id=f"c{n}", pid=1000 + n, ppid=999 + n) for n in range(5000)
    ]
    report = reports.build("rpa", record, chain, [])
    assert [p.depth for p in report.processes] == list(range(5000))


def test_a_run_recorded_before_runs_kept_their_policy() -> None:
    logs = DATA / "rpa" / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == RUN_1]
    old = runs.RunRecord.from_json(
        json.dumps({k: v for k, v in json.loads(record.to_json()).items() if k != "policy"})
    )
    assert old.policy is None
    report = reports.build("rpa", old, logview.read_attempts(logs), logview.read_dns(logs))
    assert report.policy is None
    assert "Not recorded" in reports.render_html(report)


def test_diff_new_gone_and_changed() -> None:
    # Across sandboxes: rpb allowed 198.51.100.9:443 and not www.inet.test.
    across = reports.diff(recorded("rpa", RUN_1), recorded("rpb", RUN_B))
    assert [(c.status, c.key, c.verdict_a, c.verdict_b) for c in across.changes] == [
        ("gone", "tcp [2001:db8:1::9]:80", "allowed", None),
        ("changed", "tcp 198.51.100.9:443", "blocked", "allowed"),
        ("same", "tcp 198.51.100.9:80", "blocked", "blocked"),
        # Named www.inet.test in run A only: still the same destination, by its address.
        ("same", "tcp 203.0.113.7:80", "allowed", "allowed"),
    ]
    # Two versions of the script in one sandbox: v2 dropped the 443 call and added a UDP one.
    versions = reports.diff(recorded("rpa", RUN_1), recorded("rpa", RUN_2))
    assert versions.counts() == {"new": 1, "gone": 1, "changed": 0, "same": 3}
    assert [(c.status, c.key) for c in versions.changes[:2]] == [
        ("new", "udp 198.51.100.9:5353"),
        ("gone", "tcp 198.51.100.9:443"),
    ]
    assert reports.diff(recorded("rpa", RUN_2), recorded("rpa", RUN_2)).counts()["same"] == 4


def test_a_name_matches_across_changed_addresses() -> None:
    """A name that resolves elsewhere in the other run (a CDN) is the same destination."""
    a = recorded("rpa", RUN_2)
    moved = tuple(
        dataclasses.replace(d, address="2001:db8:1::99", key="tcp [2001:db8:1::99]:80")
        if d.address == "2001:db8:1::9"
        else d
        for d in a.destinations
    )
    b = dataclasses.replace(a, destinations=moved)
    assert reports.diff(a, b).counts() == {"new": 0, "gone": 0, "changed": 0, "same": 4}


def test_a_saved_report_reads_back_and_compares() -> None:
    saved = reports.to_json(recorded("rpa", RUN_1))
    again = reports.from_json(saved, "r.json")
    assert again == recorded("rpa", RUN_1)
    assert reports.diff(again, recorded("rpb", RUN_B)) == reports.diff(
        recorded("rpa", RUN_1), recorded("rpb", RUN_B)
    )
    # A newer version's extra fields are left out.
    newer = json.loads(saved)
    newer["destinations"][0]["ja4"] = "t13d1516h2_8daaf6152771_02713d6af862"
    assert reports.from_json(json.dumps(newer), "r.json") == again


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda v: v.update(schema="sandbox-report/2"), "schema 'sandbox-report/2'"),
        (lambda v: v["destinations"][0].update(count="1"), "destinations: count: int expected"),
        (lambda v: v["destinations"][0].update(count=True), "count: int expected, not bool"),
        (lambda v: v["run"].update(php=1), "run: php: bool expected, not int"),
        (lambda v: v["run"].pop("id"), "RunInfo without id"),
        (lambda v: v.update(processes={}), "processes: a list expected"),
        (lambda v: v["destinations"][0].update(php=[]), "an object expected for Place"),
    ],
)
def test_a_saved_report_that_does_not_fit_is_refused(change: Any, error: str) -> None:
    value = json.loads(reports.to_json(recorded("rpa", RUN_1)))
    change(value)
    with pytest.raises(reports.ReportFileError, match=re.escape(error)):
        reports.from_json(json.dumps(value), "r.json")
    with pytest.raises(reports.ReportFileError, match="not JSON"):
        reports.from_json(b"\xff", "r.json")


# ---- guest text is attacker input ------------------------------------------------------------


class _Dom(HTMLParser):
    """The elements and text of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


def hostile_report() -> reports.Report:
    """Run 1's real records, with guest text of the worst kind in every field a guest controls."""
    logs = DATA / "rpa" / "logs"
    (record,) = [r for r in runs.load_records(logs) if r.id == RUN_1]

    def worse(a: Attempt) -> Attempt:
        if a.exe is None:
            return a
        return dataclasses.replace(
            a,
            exe="/tmp/<img src=x onerror=alert(2)>",
            cmdline='"><script>alert(3)</script>\x00\u202egnp.exe',
            dns_name=a.dns_name and "<iframe src=//evil.example>",
            request="GET /<style>body{display:none}</style>",
        )

    attempts = [worse(a) for a in logview.read_attempts(logs)]
    return reports.build("rpa", record, attempts, logview.read_dns(logs))


def test_hostile_guest_text_is_escaped_and_inert() -> None:
    for report in (recorded("rpa", RUN_1), hostile_report()):
        html = reports.render_html(report)
        dom = parse(html)
        # Only the template's own elements: none of the guest's tags became one.
        assert not {"script", "img", "iframe"} & set(dom.tags), set(dom.tags)
        assert dom.tags.count("style") == 1
        # No control character reaches the page raw; each is shown as an escape.
        assert not any(ord(c) < 0x20 and c not in "\n" for c in html)
        assert "\u202e" not in html
    text = "".join(parse(reports.render_html(recorded("rpa", RUN_1))).text)
    assert "/tmp/<script>alert(1)</script>\\x1b[31m" in text  # shown as text, escapes visible
    text = "".join(parse(reports.render_html(hostile_report())).text)
    assert '"><script>alert(3)</script>\\x00\\u202egnp.exe' in text
    assert "GET /<style>body{display:none}</style>" in text


def test_the_json_keeps_guest_text_as_data() -> None:
    out = reports.to_json(hostile_report())
    assert out.isascii()  # bidi and control characters as \\u escapes
    value = json.loads(out)
    assert value["processes"][0]["cmdline"] == '"><script>alert(3)</script>\x00\u202egnp.exe'


def test_the_html_loads_nothing_and_runs_nothing() -> None:
    html = reports.render_html(recorded("rpa", RUN_1))
    dom = parse(html)
    assert not [value for name, value in dom.attrs if name in ("src", "href", "action")]
    assert "url(" not in html and "@import" not in html
    csp = "default-src 'none'; style-src 'unsafe-inline'"
    assert f'<meta http-equiv="Content-Security-Policy" content="{csp};' in html


def test_the_diff_table_prints_guest_text_as_text() -> None:
    a = recorded("rpa", RUN_1)
    named = tuple(
        dataclasses.replace(d, names=("[bold]x[/]\x1b[2J",)) if d.names else d
        for d in a.destinations
    )
    console = Console(record=True, width=300, force_terminal=True, color_system="truecolor")
    console.print(reports.render_diff(reports.diff(a, dataclasses.replace(a, destinations=named))))
    console.print(reports.render_summary(dataclasses.replace(a, destinations=named)))
    shown = console.export_text(styles=True)
    assert "[bold]x[/]\\x1b[2J" in shown and "\x1b[2J" not in shown


def test_payload_fields_show_when_present() -> None:
    """Sinkhole and SNI recording (issue 16 items 1-2) fill these fields; the page shows them."""
    a = recorded("rpa", RUN_1)
    assert "No payload" in reports.render_html(a)
    first = dataclasses.replace(
        a.destinations[0],
        sni=("www.inet.test",),
        http=("GET /telemetry?id=<1> HTTP/1.1",),
        payloads=("16 03 01 02 00",),
    )
    page = reports.render_html(dataclasses.replace(a, destinations=(first, *a.destinations[1:])))
    text = "".join(parse(page).text)
    assert "GET /telemetry?id=<1> HTTP/1.1" in text and "16 03 01 02 00" in text
    assert "No payload" not in page


# ---- the browser ------------------------------------------------------------------------------


def browser() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def rendered_dom(page: Path) -> str:
    """The DOM chromium builds from the page (its scripts run, had it any)."""
    result = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_report_opens_in_a_real_browser(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(reports.render_html(hostile_report()))
    dom = parse(rendered_dom(page))
    text = "".join(dom.text)
    for key in ("tcp 203.0.113.7:80", "tcp 198.51.100.9:443", "tcp [2001:db8:1::9]:80"):
        assert key in text
    assert "gethostbyname() at audit.php:11" in text
    # The guest's tags stayed text in the browser's own DOM too.
    assert not {"script", "img", "iframe"} & set(dom.tags)
    assert "<script>alert(3)</script>" in text


# ---- naming a run across sandboxes, and the CLI ------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> lifecycle.Context:
    # As paths.Dirs.from_env() finds it with XDG_STATE_HOME=tmp_path/state (the CLI test).
    state = tmp_path / "state" / paths.APP
    dirs = paths.Dirs(data=tmp_path / "data", state=state, config=tmp_path / "cfg")
    for sandbox in ("rpa", "rpb"):
        shutil.copytree(DATA / sandbox, dirs.sandbox(sandbox))
    return lifecycle.Context(settings=Settings(), dirs=dirs)


def test_a_run_is_named_across_sandboxes(ctx: lifecycle.Context) -> None:
    name = lifecycle.RunName
    assert lifecycle.resolve_run(ctx, "last", "rpa") == name("rpa", RUN_2)
    assert lifecycle.resolve_run(ctx, RUN_1, "rpa") == name("rpa", RUN_1)
    # A destroyed sandbox's run, by its id alone or with its sandbox.
    assert lifecycle.resolve_run(ctx, RUN_B, "default") == name("rpb", RUN_B)
    assert lifecycle.resolve_run(ctx, f"rpb:{RUN_B}", "rpa") == name("rpb", RUN_B)
    assert lifecycle.resolve_run(ctx, "rpb:last", "rpa") == name("rpb", RUN_B)
    with pytest.raises(NotFoundError, match="has no run"):
        lifecycle.resolve_run(ctx, f"rpa:{RUN_B}", "default")
    with pytest.raises(NotFoundError, match="no sandbox's logs hold"):
        lifecycle.resolve_run(ctx, "20261205-000000-0000", "rpa")
    with pytest.raises(UsageError, match="not a run id"):
        lifecycle.resolve_run(ctx, "../../etc", "rpa")
    with pytest.raises(UsageError, match="invalid sandbox name"):
        lifecycle.resolve_run(ctx, f"../x:{RUN_1}", "rpa")
    with pytest.raises(NotFoundError, match="no logs"):
        lifecycle.resolve_run(ctx, "last", "nothere")
    # The same id in two sandboxes' logs: which one must be said.
    shutil.copytree(
        ctx.dirs.sandbox("rpb") / paths.LOGS_DIR / paths.RUNS_DIR / RUN_B,
        ctx.dirs.sandbox("rpa") / paths.LOGS_DIR / paths.RUNS_DIR / RUN_B,
    )
    with pytest.raises(UsageError, match="in the logs of sandboxes rpa, rpb") as raised:
        lifecycle.resolve_run(ctx, RUN_B, "default")
    assert raised.value.hint == f"say which: rpa:{RUN_B}"


def test_cli_report_and_diff(
    ctx: lifecycle.Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    html, data = tmp_path / "out" / "r.html", tmp_path / "out" / "r.json"
    code = cli.main(
        ["report", "--name", "rpa", "--run", RUN_1, "--html", str(html), "--json", str(data)]
    )
    assert code == 0, capsys.readouterr().err
    assert data.read_text() == reports.to_json(recorded("rpa", RUN_1))
    assert html.read_text() == reports.render_html(recorded("rpa", RUN_1))
    capsys.readouterr()
    assert cli.main(["report", "--name", "rpa", "--diff", RUN_1, RUN_B, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "sandbox-report-diff/1"
    assert out["a"] == {"sandbox": "rpa", "run": RUN_1}
    assert out["b"] == {"sandbox": "rpb", "run": RUN_B}
    assert cli.main(["report", "--name", "rpa", "--diff", RUN_1, "last"]) == 0
    table = capsys.readouterr().out
    assert "udp 198.51.100.9:5353" in table and "1 new, 1 gone, 0 changed" in table
    assert cli.main(["report", "--diff", RUN_1, RUN_B, "--html", str(html)]) == 2
    assert "--json FILE" in capsys.readouterr().err
    # A saved report against a run: the report file from above, after the logs are gone.
    shutil.rmtree(ctx.dirs.sandbox("rpa"))
    assert cli.main(["report", "--diff", str(data), RUN_B, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == out["changes"]
    assert cli.main(["report", "--diff", str(tmp_path / "gone.json"), RUN_B]) == 3

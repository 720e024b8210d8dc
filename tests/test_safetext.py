"""Guest text printed as data: control characters escaped, no markup, in every view."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from orchestrator import safetext
from orchestrator.capture import logview
from orchestrator.capture.records import Attempt, DnsQuery, Frame, Verdict

HOSTILE = "/tmp/\x1b[2J\x1b]0;pwned\x07x[/]\u202e[bold]\x9b31m\r\x08php"


def render(renderable: object) -> str:
    buffer = io.StringIO()
    # A real terminal's console: colours on, so rich itself emits ESC for styles. The guest's
    # own ESC must show as the four characters \x1b, not as ESC.
    console = Console(file=buffer, force_terminal=True, width=400, color_system="standard")
    console.print(renderable)
    return buffer.getvalue()


def guest_escs(output: str) -> list[str]:
    """ESC sequences in `output` that are not rich's own colour codes (ESC [ digits;... m)."""
    import re

    return re.findall(r"\x1b(?!\[[0-9;]*m)", output)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\rb\x08c\x07", "a\\x0db\\x08c\\x07"),
        ("\x9b2J", "\\x9b2J"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("tab\there", "tab\\x09here"),
        ("two\nlines", "two\\x0alines"),
        ("x[/] [bold]", "x[/] [bold]"),
        ("ünïcode ✓ 名前", "ünïcode ✓ 名前"),
    ],
)
def test_clean(raw: str, shown: str) -> None:
    assert safetext.clean(raw) == shown


def test_multiline_keeps_newlines_only() -> None:
    assert safetext.clean("a\nb\x1b", multiline=True) == "a\nb\\x1b"


def test_text_is_never_markup() -> None:
    out = render(safetext.labeled("error:", "bold red", "x[/] [bold]not bold[/bold]"))
    assert "x[/] [bold]not bold[/bold]" in out


def attempt(**changes: object) -> Attempt:
    base: dict[str, object] = dict(
        id="a1",
        time="2026-12-05T09:00:00.000Z",
        verdict=Verdict.BLOCKED,
        proto="tcp",
        family=4,
        dst="198.51.100.9",
        dport=80,
        pid=42,
        exe=HOSTILE,
        dns_name="evil\x1b[8m.example",
        stack=(Frame("fsock\x1bopen", "/srv/\x1b[1mx.php", 3),),
    )
    base.update(changes)
    return Attempt(**base)  # type: ignore[arg-type]


def test_logs_table_shows_hostile_text_as_text() -> None:
    out = render(logview.render_table([attempt()]))
    assert guest_escs(out) == []
    # The process column shows the executable's base name: after the last "/" (of "[/]").
    assert "]\\u202e[bold]\\x9b31m\\x0d\\x08php (42)" in out
    assert "evil\\x1b[8m.example" in out and "fsock\\x1bopen" in out


def test_dns_and_sockets_tables_too() -> None:
    query = DnsQuery(
        id="q1",
        time="2026-12-05T09:00:00.000Z",
        client="192.168.213.5",
        name="\x1b]0;title\x07x[/].example",
        qtype="A",
        result="REFUSED",
    )
    out = render(logview.render_dns_table([query]))
    assert guest_escs(out) == [] and "x[/].example" in out
    lsof = "p12\ncph\x1bp[/]\nL\x1b[1muser\nf3\ntIPv4\nPTCP\nn10.0.0.1:1->203.0.113.7:80\n"
    sockets = logview.parse_sockets(lsof)
    out = render(logview.render_sockets(sockets))
    assert guest_escs(out) == [] and "ph\\x1bp[/] (12)" in out


def test_forged_lsof_fields_do_not_break_the_listing() -> None:
    lsof = (
        "p²\ncx\nf3\nn1\np" + "9" * 5000 + "\ncy\nf3\nn1\np7\ncgood\nf4\ntIPv4\nPTCP\nn1.2.3.4:5\n"
    )
    assert [s.command for s in logview.parse_sockets(lsof)] == ["good"]

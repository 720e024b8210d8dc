"""`sandbox report` end to end on a real VM: a PHP script that makes an allowed and a blocked
connection, the report written as HTML and JSON, the HTML opened in a real headless browser, and
the report still made from the logs once the sandbox is destroyed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .e2e_support import Cli, leftovers
from .test_e2e_run import line_of, run_id_of
from .test_report import parse, rendered_dom

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "rpe"


def test_report_of_a_real_run(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "calls.php"
    script.write_text(
        "<?php\n"
        "$ok = @fsockopen('203.0.113.7', 80, $errno, $errstr, 5);\n"
        "$no = @fsockopen('198.51.100.9', 443, $errno, $errstr, 5);\n"
        'echo $ok ? "allowed " : "refused ", $no ? "allowed" : "refused", "\\n";\n'
    )
    cli.ok("up", "--name", NAME, "--allow", "203.0.113.7")
    try:
        ran = cli.ok("run", "--name", NAME, str(script))
        assert ran.stdout == "allowed refused\n", ran.stdout + ran.stderr
        run_id = run_id_of(ran.stderr)
        html, data = tmp_path / "report.html", tmp_path / "report.json"
        cli.ok("report", "--name", NAME, "--html", str(html), "--json", str(data))
    finally:
        cli.ok("destroy", "--name", NAME, timeout=300)
    assert leftovers(NAME, cli) == []

    report = json.loads(data.read_text())
    assert report["schema"] == "sandbox-report/1"
    assert report["run"]["id"] == run_id and report["run"]["exit_code"] == 0
    found = {
        d["key"]: (d["verdict"], d["php"]["line"] if d["php"] else None)
        for d in report["destinations"]
    }
    assert found == {
        "tcp 203.0.113.7:80": ("allowed", line_of(script, "203.0.113.7")),
        "tcp 198.51.100.9:443": ("blocked", line_of(script, "198.51.100.9")),
    }
    assert report["policy"]["allow"] == ["203.0.113.7"]

    # The page, as a real browser builds it, shows both destinations and the PHP lines.
    text = "".join(parse(rendered_dom(html)).text)
    assert "tcp 203.0.113.7:80" in text and "tcp 198.51.100.9:443" in text
    assert f"fsockopen() at calls.php:{line_of(script, '198.51.100.9')}" in text

    # The logs outlive the sandbox: the same report from them, by the run's id alone.
    again = cli.ok("report", "--run", run_id, "--json", "-").stdout
    assert json.loads(again) == report

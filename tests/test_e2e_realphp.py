"""Real PHP software from Debian's packages, end to end on a real VM: Composer (which restarts PHP
without xdebug through composer/xdebug-handler and downloads through curl_multi), Guzzle's async
requests and Symfony HttpClient's concurrent ones. Each attempt must name the package's own file
and line: the call that set the request's URL, as the guest's copy of the package has it, not
the polling loop.

Nothing here may reach a real host: Composer's only repository is a lab address, packagist.org
is disabled in composer.json, and COMPOSER_HOME and the cache are fresh directories."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator import paths
from orchestrator.run import xdebug
from orchestrator.vm.images import Image

from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "harealphp"
DATA = Path(__file__).parent / "data" / "xdebug"
CURL_DOWNLOADER = "/usr/share/php/Composer/Util/Http/CurlDownloader.php"
# The package's file and the text of its line that sets a request's URL, per client script in
# tests/data/xdebug/CLIENT/.
HTTP_CLIENTS = {
    "guzzle": (
        "/usr/share/php/GuzzleHttp/Handler/CurlFactory.php",
        "curl_setopt_array($easy->handle, $conf);",
    ),
    "symfony": (
        "/usr/share/php/Symfony/Component/HttpClient/CurlHttpClient.php",
        "!curl_setopt($ch, $opt, $value)",
    ),
}
COMPOSER_ENV = (
    "COMPOSER_HOME=/tmp/composer-home",
    "COMPOSER_CACHE_DIR=/tmp/composer-cache",
    "COMPOSER_NO_INTERACTION=1",
)


def composer_project(directory: Path, repository: str) -> Path:
    directory.mkdir()
    (directory / "composer.json").write_text(
        json.dumps(
            {
                "name": "sandbox/probe",
                "repositories": [
                    {"type": "composer", "url": repository},
                    {"packagist.org": False},
                ],
                "config": {"secure-http": False},
            }
        )
    )
    return directory


def guest_line(cli: Cli, path: str, text: str) -> int:
    """The line of the guest's `path` holding `text` (the only one): the package's own source."""
    out = cli.ok("exec", "--name", NAME, "--", "grep", "-nF", "--", text, path).stdout
    lines = out.splitlines()
    assert len(lines) == 1, f"{text!r} in {path}: {lines}"
    return int(lines[0].split(":", 1)[0])


def run_attempts(cli: Cli, run_id: str) -> list[dict[str, Any]]:
    out = cli.ok("logs", "--name", NAME, "--json", "--run", run_id).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def run_id_of(stderr: str) -> str:
    found = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{4}): exit", stderr)
    assert found, stderr
    return found.group(1)


def traces_of(cli: Cli, run_id: str) -> list[xdebug.Trace]:
    directory = cli.sandbox_dir(NAME) / paths.LOGS_DIR / paths.RUNS_DIR / run_id / paths.XDEBUG_DIR
    return [
        xdebug.parse_trace(p.read_bytes(), p.name)
        for p in sorted(directory.iterdir())
        if xdebug.is_trace_name(p.name)
    ]


def url_of(frame: dict[str, Any]) -> str:
    found = re.search(r"(?:10002 => |10002, )'([^']*)'", frame["args"] or "")
    assert found, frame
    return found.group(1)


def measured(package: str, attempts: list[dict[str, Any]], file: str) -> str:
    named = [a for a in attempts if a.get("stack") and a["stack"][0]["file"] == file]
    return f"{package}: {len(attempts)} attempts, {len(named)} attributed to {file}"


def test_real_php_packages(real_php_cli: Cli, real_php_image: Image, tmp_path: Path) -> None:
    cli = real_php_cli
    cli.ok(
        "up",
        "--name",
        NAME,
        "--image",
        real_php_image.name,
        "--allow",
        "203.0.113.7",
        "--allow",
        "www.inet.test",
    )
    url_line = guest_line(cli, CURL_DOWNLOADER, "curl_setopt($curlHandle, CURLOPT_URL, $url);")

    # Composer, blocked and allowed repositories: one run each (the first failure ends a run).
    for repository, verdict in (
        ("http://198.51.100.9/", "blocked"),
        ("http://203.0.113.7/", "allowed"),
    ):
        project = composer_project(tmp_path / verdict, repository)
        env = [arg for pair in COMPOSER_ENV for arg in ("--env", pair)]
        result = cli.run(
            "run", "--name", NAME, "--workdir", str(project), *env, "--timeout", "600",
            "--", "composer", "show", "--all", "--no-plugins", "acme/widget",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr  # the lab answers no packages.json
        run_id = run_id_of(result.stderr)
        attempts = run_attempts(cli, run_id)
        print(measured(f"composer ({verdict})", attempts, CURL_DOWNLOADER))
        assert attempts and all(a["verdict"] == verdict for a in attempts), attempts
        for attempt in attempts:
            # Made by the process xdebug-handler restarted, which loaded xdebug again.
            assert " -n -c " in attempt["cmdline"], attempt
            top = attempt["stack"][0]
            assert (top["function"], top["file"], top["line"]) == (
                "curl_setopt",
                CURL_DOWNLOADER,
                url_line,
            ), attempt["stack"]
            assert url_of(top) == f"{repository}packages.json"
            assert attempt["stack"][-2]["file"] == "/usr/bin/composer"
        # Two processes traced, no more: the handler restarted once and did not loop.
        parent, restarted = sorted(traces_of(cli, run_id), key=lambda t: t.start)
        assert {a["pid"] for a in attempts} == {restarted.pid}
        launch = [c for c in parent.calls if c.function == "proc_open"]
        assert len(launch) == 1 and "'-n'" in launch[0].args[0]
        print(f"  restart: the restarted PHP began {restarted.start - parent.start:.3f} s "
              f"after the first (proc_open at {launch[0].entry:.3f} s)")  # fmt: skip

    # Guzzle and Symfony HttpClient: three requests in flight together through curl_multi.
    for client, (library, source) in HTTP_CLIENTS.items():
        request_line = guest_line(cli, library, source)
        script = next((DATA / client).glob("*.php"))
        result = cli.ok("run", "--name", NAME, str(script), timeout=600)
        attempts = run_attempts(cli, run_id_of(result.stderr))
        print(measured(client, attempts, library))
        expected = {
            "203.0.113.7": f"http://203.0.113.7/{client}/allowed",
            "198.51.100.9": f"http://198.51.100.9/{client}/blocked",
            "2001:db8:1::9": f"http://www.inet.test/{client}/named",
        }
        named = expected["2001:db8:1::9"]
        connects = {a["dst"]: a for a in attempts if a["verdict"] != "dns"}
        assert set(connects) <= set(expected) and "198.51.100.9" in connects, attempts
        assert connects["198.51.100.9"]["verdict"] == "blocked"
        assert any(a["verdict"] == "dns" for a in attempts), attempts  # curl's resolver thread
        for attempt in attempts:
            top = attempt["stack"][0]
            assert (top["file"], top["line"]) == (library, request_line), attempt
            assert url_of(top) == (
                named if attempt["verdict"] == "dns" else expected[attempt["dst"]]
            )
            # Down to the script's line that made the request.
            lines = [n for n, text in enumerate(script.read_text().splitlines(), 1)
                     if url_of(top) in text or "->request(" in text]  # fmt: skip
            assert attempt["stack"][-2]["file"].endswith(script.name)
            assert attempt["stack"][-2]["line"] in lines

    # Another tool on xdebug-handler, under its own name (PHPMD_ALLOW_XDEBUG): restarted once,
    # and the restarted process, which does the work, is traced.
    project = tmp_path / "md"
    project.mkdir()
    (project / "code.php").write_text("<?php\nfunction f($a) { $unused = 1; return $a; }\n")
    result = cli.run(
        "run", "--name", NAME, "--workdir", str(project), "--timeout", "600",
        "--", "phpmd", "code.php", "text", "unusedcode",
    )  # fmt: skip
    assert result.returncode == 2 and "UnusedLocalVariable" in result.stdout, result.stderr
    parent, restarted = sorted(traces_of(cli, run_id_of(result.stderr)), key=lambda t: t.start)
    handler = [c for c in parent.calls if c.function.endswith("XdebugHandler->__construct")]
    assert [c.args for c in handler] == [("'PHPMD'",)]
    launch = [c for c in parent.calls if c.function == "proc_open"]
    assert len(launch) == 1 and "'-n'" in launch[0].args[0]
    assert any(c.file.startswith("/usr/share/php/PHPMD/") for c in restarted.calls)

    cli.ok("destroy", "--name", NAME)

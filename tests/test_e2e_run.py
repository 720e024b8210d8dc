"""`sandbox run` end to end on a real VM: exit codes, live output, the unprivileged user,
timeouts that kill the whole tree, xdebug only for runs, and each attempt of
examples/phone_home.php tied to the PHP line that made it."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import paths

from .dbgp import DbgpListener
from .e2e_support import Cli

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "rn"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "phone_home.php"


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the only line containing `text`: the tests follow edits of the file."""
    found = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(found) == 1, f"{text!r} is on lines {found} of {path}"
    return found[0]


def run_id_of(stderr: str) -> str:
    found = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{4}): exit", stderr)
    assert found, stderr
    return found.group(1)


def xdebug_files(cli: Cli, run_id: str) -> list[Path]:
    directory = cli.sandbox_dir(NAME) / paths.LOGS_DIR / paths.RUNS_DIR / run_id / paths.XDEBUG_DIR
    return sorted(directory.iterdir()) if directory.is_dir() else []


def background(cli: Cli, *args: str) -> subprocess.Popen[bytes]:
    """The CLI in the background, its output piped (to watch it stream)."""
    return subprocess.Popen(
        cli.argv(*args),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def run_logs(cli: Cli, *args: str) -> list[dict[str, Any]]:
    out = cli.ok("logs", "--name", NAME, "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def stepper_script(directory: Path) -> Path:
    stepper = directory / "stepper.php"
    stepper.write_text('<?php\n$a = 1;\n$b = $a + 1;\necho "sum ", $a + $b, "\\n";\n')
    return stepper


def test_run_before_up_says_so(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "x.php"
    script.write_text("<?php echo 1;")
    result = cli.run("run", "--name", "nothere", str(script))
    assert result.returncode == 3, result.stderr
    assert "does not exist" in result.stderr and "sandbox up" in result.stderr


def test_run(cli: Cli, tmp_path: Path) -> None:
    cli.ok("up", "--name", NAME, "--allow", "203.0.113.7")

    # Missing files and wrong usage are refused before anything runs.
    missing = cli.run("run", "--name", NAME, str(tmp_path / "missing.php"))
    assert missing.returncode == 3 and "no such PHP script" in missing.stderr
    not_php = cli.run("run", "--name", NAME, "ls")
    assert not_php.returncode == 2 and "sandbox run -- ls" in not_php.stderr

    # Exit code, stdout and stderr apart, arguments, --env, the unprivileged user, clean env.
    script = tmp_path / "codes.php"
    script.write_text(
        "<?php\n"
        'echo "uid=", posix_getuid(), " args=", implode(",", array_slice($argv, 1)), "\\n";\n'
        'echo "env=", getenv("GREETING"), " ssh=",'
        ' var_export(getenv("SSH_CONNECTION"), true), "\\n";\n'
        'fwrite(STDERR, "to stderr\\n");\n'
        "exit(7);\n"
    )
    result = cli.run("run", "--name", NAME, "--env", "GREETING=hi there", str(script), "a", "b c")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "uid=1000 args=a,b c\nenv=hi there ssh=false\n"
    assert "to stderr" in result.stderr and "to stderr" not in result.stdout
    as_root = cli.run("run", "--name", NAME, "--root", str(script))
    assert as_root.returncode == 7 and as_root.stdout.startswith("uid=0 ")

    # Output is streamed while the script runs, not delivered at its end.
    slow = tmp_path / "slow.php"
    slow.write_text('<?php\necho "first\\n"; flush();\nsleep(8);\necho "second\\n";\n')
    proc = background(cli, "run", "--name", NAME, str(slow))
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no output within 120 s"
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None, "the first line arrived only when the script had ended"
        rest, _ = proc.communicate(timeout=120)
        assert rest == b"second\n" and proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()

    # --timeout kills the whole tree, a daemonised grandchild included, and says so.
    hang = tmp_path / "hang.php"
    hang.write_text(
        "<?php\n"
        "exec(\"setsid sh -c 'sleep 900' > /dev/null 2>&1 &\");\n"
        'echo "started\\n";\n'
        "sleep(900);\n"
    )
    start = time.monotonic()
    timed = cli.run("run", "--name", NAME, "--timeout", "6", str(hang), timeout=300)
    assert timed.returncode == 124, timed.stderr
    assert "timed out" in timed.stderr and "killed" in timed.stderr
    assert timed.stdout == "started\n"
    assert time.monotonic() - start < 120
    left = cli.run("exec", "--name", NAME, "--", "pgrep", "-u", "sandbox")
    assert left.returncode == 1, f"processes of the run survived the timeout: {left.stdout}"

    # Ctrl-C on this side stops the run in the guest too.
    interrupted = background(cli, "run", "--name", NAME, str(hang))
    try:
        assert interrupted.stdout is not None
        ready, _, _ = select.select([interrupted.stdout], [], [], 120)
        assert ready and interrupted.stdout.readline() == b"started\n"
        interrupted.send_signal(signal.SIGINT)
        interrupted.communicate(timeout=120)
    finally:
        interrupted.kill()
        interrupted.wait()
    assert interrupted.returncode == 130
    left = cli.run("exec", "--name", NAME, "--", "pgrep", "-u", "sandbox")
    assert left.returncode == 1, f"processes of an interrupted run survived: {left.stdout}"

    # A command from the image, and an uploaded directory with a command inside it.
    assert cli.ok("run", "--name", NAME, "--", "id", "-un").stdout == "sandbox\n"
    app = tmp_path / "app"
    (app / "lib").mkdir(parents=True)
    (app / "lib" / "greet.php").write_text("<?php function greet() { return 'hello'; }\n")
    (app / "index.php").write_text(
        "<?php require __DIR__ . '/lib/greet.php'; echo greet(), ' ', getcwd() === __DIR__"
        " ? 'cwd' : 'elsewhere', \"\\n\";\n"
    )
    (app / "tool.sh").write_text('#!/bin/sh\necho tool "$@"\n')
    (app / "tool.sh").chmod(0o755)
    assert cli.ok("run", "--name", NAME, "--workdir", str(app), "index.php").stdout == "hello cwd\n"
    assert (
        cli.ok("run", "--name", NAME, "--workdir", str(app), "--", "./tool.sh", "x").stdout
        == "tool x\n"
    )

    # xdebug is loaded for `sandbox run` processes and for nothing else in the guest.
    probe = "echo extension_loaded('xdebug') ? 'xdebug' : 'none', ' ', ini_get('xdebug.mode');"
    assert cli.ok("run", "--name", NAME, "--", "php", "-r", probe).stdout == "xdebug trace"
    assert cli.ok("exec", "--name", NAME, "--", "php", "-r", probe).stdout == "none "
    other_user = cli.ok(
        "exec", "--name", NAME, "--", "su", "-s", "/bin/sh", "sandbox", "-c", f'php -r "{probe}"'
    )
    assert other_user.stdout == "none "
    off = cli.ok("run", "--name", NAME, "--xdebug", "off", "--", "php", "-r", probe)
    assert off.stdout == "none "

    # phone_home.php: every attempt, its verdict, and the PHP line behind it.
    home = cli.run("run", "--name", NAME, str(EXAMPLE))
    assert home.returncode == 0, home.stderr
    assert "fsockopen 203.0.113.7:80" in home.stdout and "sandbox-lab inet" in home.stdout
    run_id = run_id_of(home.stderr)
    # Right after `run`, without waiting: run waits out the capture's settle window itself.
    attempts = run_logs(cli, "--run", run_id)
    assert attempts == run_logs(cli, "--run", "last")

    def only(verdict: str, dst: str, dport: int) -> dict[str, Any]:
        found = [
            a for a in attempts if (a["verdict"], a["dst"], a["dport"]) == (verdict, dst, dport)
        ]
        assert len(found) == 1, (verdict, dst, dport, attempts)
        return found[0]

    def frames(attempt: dict[str, Any]) -> list[tuple[str, str, int]]:
        return [(f["function"], Path(f["file"]).name, f["line"]) for f in attempt["stack"]]

    allowed = only("allowed", "203.0.113.7", 80)
    assert frames(allowed) == [
        ("fsockopen", EXAMPLE.name, line_of(EXAMPLE, "$sock = @fsockopen($host, 80")),
        ("Telemetry->send", EXAMPLE.name, line_of(EXAMPLE, "(new Telemetry())->send")),
        ("{main}", "", 0),
    ]
    assert allowed["uid"] == 1000 and "php" in allowed["exe"]
    # The target's own command line, not that of the wrappers that started it.
    assert allowed["cmdline"] == f"php {EXAMPLE.name}", allowed
    blocked = only("blocked", "198.51.100.9", 80)
    assert frames(blocked)[:2] == [
        ("file_get_contents", EXAMPLE.name, line_of(EXAMPLE, "$body = @file_get_contents(")),
        ("check_licence", EXAMPLE.name, line_of(EXAMPLE, "check_licence($blocked);")),
    ]
    lookups = [a for a in attempts if a["verdict"] == "dns"]
    assert lookups, attempts
    for lookup in lookups:
        assert frames(lookup)[0] == (
            "gethostbyname",
            EXAMPLE.name,
            line_of(EXAMPLE, "$address = gethostbyname($name);"),
        )
    v6 = only("blocked", "2001:db8:1::9", 80)
    assert frames(v6)[0] == (
        "stream_socket_client",
        EXAMPLE.name,
        line_of(EXAMPLE, "$sock = @stream_socket_client("),
    )
    table = cli.ok("logs", "--name", NAME, "--run", run_id).stdout
    assert f"fsockopen() at {EXAMPLE.name}:" in table and "Telemetry->send()" in table
    traces = xdebug_files(cli, run_id)
    assert [p.name.startswith("trace.") for p in traces] == [True], traces
    assert "phone_home.php" in traces[0].read_text()

    # A long run's records reach the host while it is still going (collect_every), and are tied
    # to it and to their PHP lines once it ends.
    cli.config.write_text(cli.config.read_text() + "collect_every: 2\n")
    long_run = tmp_path / "long.php"
    long_run.write_text(
        "<?php\n"
        '@fsockopen("198.51.100.9", 81, $e, $s, 5);\n'
        "sleep(20);\n"
        '@fsockopen("198.51.100.9", 82, $e, $s, 5);\n'
    )
    stored = cli.sandbox_dir(NAME) / paths.LOGS_DIR / paths.CONNECTIONS_LOG

    def stored_ports() -> list[int]:
        lines = stored.read_text().splitlines() if stored.exists() else []
        return [a["dport"] for a in map(json.loads, lines) if a["dst"] == "198.51.100.9"]

    before = stored_ports()
    proc = background(cli, "run", "--name", NAME, str(long_run))
    try:
        deadline = time.monotonic() + 120
        while 81 not in stored_ports() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        early = 81 in stored_ports() and proc.poll() is None
        _, long_err = proc.communicate(timeout=180)
    finally:
        proc.kill()
        proc.wait()
    assert early, "the run's first attempt reached the host only at its end"
    assert proc.returncode == 0, long_err
    assert sorted(stored_ports()) == sorted([*before, 81, 82])  # each once
    long_attempts = run_logs(cli, "--run", run_id_of(long_err.decode()))
    assert sorted((a["dport"], frames(a)[0][2]) for a in long_attempts) == [(81, 2), (82, 4)]

    # Profiles and coverage are fetched to the host too.
    profiled = cli.ok("run", "--name", NAME, "--xdebug", "profile", str(stepper_script(tmp_path)))
    (profile,) = xdebug_files(cli, run_id_of(profiled.stderr))
    assert profile.name.startswith("cachegrind.out.") and "stepper.php" in profile.read_text()
    covered = cli.ok("run", "--name", NAME, "--xdebug", "coverage", str(stepper_script(tmp_path)))
    (coverage,) = xdebug_files(cli, run_id_of(covered.stderr))
    lines = next(
        v for k, v in json.loads(coverage.read_text()).items() if k.endswith("stepper.php")
    )
    assert [lines.get(n) for n in ("2", "3", "4")] == [1, 1, 1], lines  # 1: executed

    # Step debugging: the IDE (a DBGp client here) listens on this side; xdebug in the guest
    # reaches it through the reverse tunnel on the management SSH connection.
    stepper = stepper_script(tmp_path)
    with DbgpListener(netns=cli.lab.netns) as ide:
        proc = background(
            cli,
            "run",
            "--name",
            NAME,
            "--xdebug",
            "debug",
            "--debug-port",
            str(ide.port),
            str(stepper),
        )
        try:
            with ide.accept(timeout=120) as session:
                assert session.init.fileuri.endswith("/stepper.php"), session.init
                assert session.init.language == "PHP"
                assert session.step_into().lineno == 2
                assert session.step_into().lineno == 3
                # At the end of the script the engine waits in "stopping" for the IDE's word.
                assert session.run().status == "stopping"
                session.stop()
                session.wait_closed(timeout=60)
            out, errors = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errors
    assert out == b"sum 3\n"

    # Nobody listening: the script still runs, and the user is told why nothing stopped.
    unheard = cli.run("run", "--name", NAME, "--xdebug", "debug", "--debug-port", "1", str(stepper))
    assert unheard.returncode == 0 and unheard.stdout == "sum 3\n"
    assert "nothing is listening on 127.0.0.1:1" in unheard.stderr

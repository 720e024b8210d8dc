"""A hostile guest against the host, with one real VM in the lab (issue 12, items 1, 2, 5, 6, 8).

Each step is an attacker's move from inside the guest, as the target software (unprivileged) or
as guest root, and what the host must still do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .e2e_support import Cli, leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root]

NAME = "lhostile"
ALLOWED = "203.0.113.7"
BLOCKED = "198.51.100.9"

# The target, unprivileged: litters its xdebug output directory with a sparse terabyte named
# like a trace and a gzip bomb named like a compressed one, then exits 7.
LITTER_PHP = r"""<?php
$dir = ini_get('xdebug.output_dir');
$h = fopen("$dir/trace.4242.abcdef.xt", "w"); ftruncate($h, 1 << 40); fclose($h);
$g = gzopen("$dir/trace.4243.abcdef.xt.gz", "w9");
$zeros = str_repeat("\0", 1 << 20);
for ($i = 0; $i < 600; $i++) { gzwrite($g, $zeros); }
gzclose($g);
echo "littered ", filesize("$dir/trace.4243.abcdef.xt.gz"), "\n";
exit(7);
"""

# Guest root: the listing tool the run's bookkeeping uses lies about the names it finds.
FAKE_FIND = """#!/bin/sh
/usr/bin/find.real "$@"
printf '%s\\n' '../../escaped' '/etc/cron.d/sandbox-escape' 'trace.1.ab.xt/../../../x'
"""

CONNECT_PHP = r"""
$f = @fsockopen($argv[1], (int)$argv[2], $errno, $errstr, 5);
echo $f ? "connected\n" : "failed $errno\n";
"""


def as_root(cli: Cli, script: str, timeout: float = 120) -> str:
    return cli.ok("exec", "--name", NAME, "--", "sh", "-c", script, timeout=timeout).stdout


def records(cli: Cli) -> list[dict[str, object]]:
    out = cli.ok("logs", "--name", NAME, "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_hostile_guest_cannot_reach_into_the_host(cli: Cli, tmp_path: Path) -> None:
    config = cli.config.read_text() + "limits: {output_file_mib: 8, decompressed_mib: 16}\n"
    cli.config.write_text(config)
    cli.ok("up", "--name", NAME, "--allow", ALLOWED)
    sandbox_dir = cli.sandbox_dir(NAME)

    # 1 and 2: lying names, a sparse terabyte and a gzip bomb among the run's outputs.
    as_root(
        cli,
        "mv /usr/bin/find /usr/bin/find.real && cat > /usr/bin/find <<'EOF'\n"
        + FAKE_FIND
        + "EOF\nchmod 755 /usr/bin/find",
    )
    script = tmp_path / "litter.php"
    script.write_text(LITTER_PHP)
    started = time.monotonic()
    result = cli.run("run", "--name", NAME, str(script), timeout=600)
    print(result.stdout, result.stderr)
    assert result.returncode == 7, result.stderr
    assert time.monotonic() - started < 300
    flat = " ".join(result.stderr.split())
    assert "'../../escaped': not the name of a run's output file" in flat
    assert "'/etc/cron.d/sandbox-escape': not the name" in flat
    assert "trace.4242.abcdef.xt: " in flat and "more than the limit" in flat
    assert "output file(s) refused" in flat
    # Nothing outside the run's own directory, nothing of the terabyte on the host.
    assert not Path("/etc/cron.d/sandbox-escape").exists()
    assert not list(sandbox_dir.parent.rglob("escaped")) and not list(cli.state_home.rglob("x"))
    fetched = list((sandbox_dir / "logs").rglob("trace.4242.abcdef.xt"))
    assert fetched == []
    total = sum(p.stat().st_size for p in cli.state_home.rglob("*") if p.is_file())
    assert total < 64 << 20, total
    # The bomb (small compressed) was fetched; reading it stops at the limit, and the log view
    # that reads traces still works.
    assert list((sandbox_dir / "logs").rglob("trace.4243.abcdef.xt.gz"))
    cli.ok("logs", "--name", NAME)

    # 5: a process whose executable path holds terminal escapes and markup.
    hostile = "/tmp/\x1b[2J\x1b]0;pwned\x07x[/]\u202e[bold]php"
    copy = 'mkdir -p "$(dirname "$1")" && cp /usr/bin/php "$1"'
    cli.ok("exec", "--name", NAME, "--", "sh", "-c", copy, "sh", hostile)
    cli.ok("exec", "--name", NAME, "--", hostile, "-r", CONNECT_PHP, BLOCKED, "80")
    table = cli.ok("logs", "--name", NAME)
    assert (
        "\x1b" not in table.stdout and "\x07" not in table.stdout and "\u202e" not in table.stdout
    )
    assert "x[/]\\u202e[bold]php" in table.stdout or "\\u202e[bold]php" in table.stdout
    assert any(r.get("exe") == hostile and r.get("dst") == BLOCKED for r in records(cli)), (
        "the attempt of the oddly named process is not in the log"
    )

    # 8: guest root flushes its firewall; later attempts are still there, with the host's
    # verdict, and the change itself is a row.
    as_root(
        cli,
        "for t in iptables ip6tables; do $t -F; $t -X; $t -P OUTPUT ACCEPT; done",
    )
    for dst in (BLOCKED, ALLOWED):
        cli.ok("exec", "--name", NAME, "--", "php", "-r", CONNECT_PHP, dst, "80")
    # A connect with no firewall record waits a few seconds (the settle window) for one.
    wanted = {(BLOCKED, "host-blocked"), (ALLOWED, "unlogged")}
    rows = cli.records_when(
        NAME,
        lambda rows: wanted <= {(r["dst"], r["verdict"]) for r in rows if r.get("dport") == 80},
        "the attempts after the flush, with the host's verdicts",
    )
    verdicts = {(r["dst"], r["verdict"]) for r in rows if r.get("dport") == 80}
    print(sorted(map(str, verdicts)))
    assert (BLOCKED, "host-blocked") in verdicts
    assert (ALLOWED, "unlogged") in verdicts
    tamper = [r for r in rows if r["verdict"] == "tamper"]
    assert any("firewall no longer matches" in str(r["evidence"]) for r in tamper), tamper
    # And `run` refuses a guest whose firewall was changed: the target never starts.
    marker = tmp_path / "marker.php"
    marker.write_text("<?php touch('/tmp/sbx-marker'); echo 'ran';")
    refused = cli.run("run", "--name", NAME, str(marker))
    assert refused.returncode == 6, refused.stderr
    assert "no longer matches the sandbox's policy" in " ".join(refused.stderr.split())
    assert "ran" not in refused.stdout
    gone = cli.run("exec", "--name", NAME, "--", "test", "-e", "/tmp/sbx-marker")
    assert gone.returncode == 1, "the script ran although the firewall was changed"

    # 2: guest root floods the serial console: the host keeps a bounded log (virtlogd rotates
    # it: 2 MiB a file, a few kept), and destroy removes the rotated files too.
    as_root(cli, "head -c 6000000 /dev/zero | tr '\\0' x > /dev/ttyS0", timeout=300)
    pool = Path("/var/lib/libvirt/sandbox")
    console = sorted(pool.glob(f"sandbox-{NAME}-console.log*"))
    print("console files:", [(p.name, p.stat().st_size) for p in console])
    assert len(console) >= 2 and all(p.stat().st_size <= 2 << 20 for p in console)
    assert sum(p.stat().st_size for p in console) <= 8 << 20

    # 6: guest root breaks date, writes garbage where the capture keeps its events, stops the
    # copy of its records to the host, then makes its sshd unreachable; destroy still removes
    # everything, in bounded time, with a warning.
    as_root(
        cli,
        "systemctl stop sandbox-capture-stream; printf '#!/bin/sh\\necho garbage\\n'"
        " > /usr/local/bin/date; chmod 755 /usr/local/bin/date;"
        " for f in /var/lib/sandbox/capture/*.log; do"
        ' [ -f "$f" ] && printf \'c \\033[2J ² x\\nf 99999999999999999999999 y\\n\' >> "$f"; done;'
        " true",
    )
    garbage = cli.run("logs", "--name", NAME)
    assert garbage.returncode == 0, garbage.stderr
    as_root(
        cli,
        "nohup sh -c 'sleep 2; iptables -I INPUT -p tcp --dport 22 -j DROP' >/dev/null 2>&1 &",
    )
    time.sleep(4)
    started = time.monotonic()
    destroyed = cli.run("destroy", "--name", NAME, timeout=300)
    took = time.monotonic() - started
    print(f"destroy took {took:.1f} s:", destroyed.stderr)
    assert destroyed.returncode == 0, destroyed.stderr
    assert "could not collect the last connection records" in " ".join(destroyed.stderr.split())
    assert took < 90, took
    assert leftovers(NAME, cli) == []
    assert not list(pool.glob(f"sandbox-{NAME}-*")), "volumes of the sandbox left in the pool"
    # The logs stay readable after all that.
    assert cli.run("logs", "--name", NAME).returncode == 0

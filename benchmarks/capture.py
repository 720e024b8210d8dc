"""Capture completeness and overhead: our collector against `lsof` polling once a second.

A PHP program in the guest makes N short-lived attempts, a quarter each: TCP allowed, TCP blocked,
UDP allowed, UDP blocked. Printed from the same run: the share of attempts each method recorded,
and the program's run time with connection capture (auditd) on against off. Runs inside the
namespace lab (it re-executes itself there), as root.

    python benchmarks/capture.py [--counts 1000 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import monitor  # noqa: E402
from orchestrator.lab import inside, run_in_lab  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
NAME = "bench-capture"

PROGRAM = r"""
$n = (int)$argv[1];
$t = microtime(true);
for ($i = 0; $i < $n; $i++) {
    switch ($i % 4) {
    case 0: $f = @fsockopen("203.0.113.7", 80, $e, $s, 5); if ($f) fclose($f); break;
    case 1: @fsockopen("198.51.100.9", 80, $e, $s, 5); break;
    case 2: $u = @stream_socket_client("udp://203.0.113.7:5353", $e, $s, 2);
            if ($u) { @fwrite($u, "x"); fclose($u); } break;
    case 3: $u = @stream_socket_client("udp://198.51.100.9:5353", $e, $s, 2);
            if ($u) { @fwrite($u, "x"); fclose($u); } break;
    }
}
printf("%.6f\n", microtime(true) - $t);
"""

# The recipe's way: list the PHP process's sockets once a second while the program runs.
LSOF_LOOP = (
    "while :; do lsof -i -nP -a -c php -F pn 2>/dev/null; echo @@; sleep 1; done > /tmp/lsof.out"
)


def sandbox(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([SANDBOX, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sandbox {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def guest(env: dict[str, str], command: str) -> str:
    return sandbox(env, "exec", "--name", NAME, "--", "sh", "-c", command)


def run_program(env: dict[str, str], n: int) -> float:
    out = sandbox(env, "exec", "--name", NAME, "--", "php", "-r", PROGRAM, str(n))
    return float(out.strip())


def lsof_seen(text: str) -> int:
    """Distinct connections lsof listed: (pid, local-remote) pairs across all polls."""
    seen: set[tuple[str, str]] = set()
    pid = ""
    for line in text.splitlines():
        if line.startswith("p"):
            pid = line[1:]
        elif line.startswith("n") and "->" in line:
            seen.add((pid, line[1:]))
    return len(seen)


def recorded(env: dict[str, str], since: str) -> int:
    out = sandbox(env, "logs", "--name", NAME, "--json", "--since", since, "--process", "php")
    count = 0
    for line in out.splitlines():
        record = json.loads(line)
        if record["verdict"] in ("allowed", "blocked") and record["dst"] in (
            "203.0.113.7",
            "198.51.100.9",
        ):
            count += 1
    return count


def guest_now(env: dict[str, str]) -> str:
    return guest(env, "date -u +%Y-%m-%dT%H:%M:%S.%6N+00:00").strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs for the overhead")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        return run_in_lab([sys.executable, *sys.argv])

    env = {**os.environ, "XDG_STATE_HOME": tempfile.mkdtemp(prefix="sandbox-bench-")}
    sandbox(env, "up", "--name", NAME, "--allow", "203.0.113.7")
    try:
        print(f"{'N':>6}  {'ours':>8}  {'lsof 1 s':>8}")
        for n in args.counts:
            since = guest_now(env)
            guest(env, f"nohup sh -c '{LSOF_LOOP}' >/dev/null 2>&1 & echo $! > /tmp/lsof.pid")
            run_program(env, n)
            lsof_text = guest(env, "kill $(cat /tmp/lsof.pid); sleep 0.2; cat /tmp/lsof.out")
            # Records younger than the capture's settle window (monitor.SETTLE_SECONDS) wait for
            # the next collection; count after it, as the next `logs`, `exec` or `destroy` would.
            time.sleep(monitor.SETTLE_SECONDS + 1)
            ours = recorded(env, since)
            print(f"{n:>6}  {ours / n:>8.1%}  {lsof_seen(lsof_text) / n:>8.1%}", flush=True)

        # Overhead: the same program with the audit rules loaded and removed, alternating.
        n = max(args.counts)
        on: list[float] = []
        off: list[float] = []
        for round_no in range(args.rounds):
            for mode in ("on", "off") if round_no % 2 == 0 else ("off", "on"):
                if mode == "off":
                    guest(env, "auditctl -D >/dev/null")
                    off.append(run_program(env, n))
                else:
                    guest(env, "augenrules --load >/dev/null")
                    on.append(run_program(env, n))
        guest(env, "augenrules --load >/dev/null")
        ratio = statistics.median(on) / statistics.median(off)
        print(
            f"run time of {n} attempts: capture on {[round(x, 2) for x in on]} s, "
            f"off {[round(x, 2) for x in off]} s"
        )
        print(
            f"collector overhead: on / off = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %), "
            "target <= +5 %"
        )
    finally:
        sandbox(env, "destroy", "--name", NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Capture completeness and overhead: our collector against `lsof` polling once a second.

A PHP program in the guest makes N short-lived attempts, a quarter each: TCP allowed, TCP blocked,
UDP allowed, UDP blocked. Printed from the same run: the share of attempts each method recorded,
and the program's run time under each capture configuration against capture off. Runs inside the
namespace lab (it re-executes itself there), as root.

    python benchmarks/capture.py [--counts 1000 10000] [--rounds 2]
    python benchmarks/capture.py --counts --variants off on flush-none no-proctitle --rounds 4

Configurations (--variants) change the running guest's auditd.conf and audit rules, never the
image, and restart auditd before every timed run, the image's own configuration included:
- disabled: auditing off (`auditctl -e 0`): no audit work in any syscall, the true "capture off";
- off: no audit rules, auditd runs (syscalls still pass the kernel's audit entry and exit hooks);
- on: the image's configuration; inet-only: connect audited for inet and inet6 addresses only;
- flush-none, no-proctitle, no-eoe, lean (flush-none and no-proctitle), leanest (all of them and
  inet-only), no-boost (priority_boost 0), idle (auditd and kauditd SCHED_IDLE), lean-idle
  (leanest and idle), proposed (idle, no-eoe and inet-only: every field kept): candidates;
- no-write (auditd receives and does not write) and no-match (the connect rule is loaded but
  never matches) split what remains: the kernel's syscall path, the records, the daemon, the disk.
`--setup` runs a shell snippet in the guest once after `up` (e.g. firewall rules to try).
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

# The image's auditd configuration, kept aside once so that every variant starts from it.
_SAVED = "/root/sbx-bench"
_SAVE = (
    f"mkdir -p {_SAVED}; [ -e {_SAVED}/auditd.conf ] || "
    f"cp /etc/audit/auditd.conf /etc/audit/rules.d/audit.rules {_SAVED}/"
)
_CONF = "/etc/audit/auditd.conf"
_RULES = "/etc/audit/rules.d/audit.rules"
_EXCLUDE_PROCTITLE = f"echo '-a never,exclude -F msgtype=PROCTITLE' >> {_RULES}"
# The end-of-event marker the kernel sends after every multi-record event: auditd does not write
# it in RAW logs and ausearch groups records by serial without it.
_EXCLUDE_EOE = f"echo '-a never,exclude -F msgtype=EOE' >> {_RULES}"
_FLUSH_NONE = f"sed -i 's/^flush = .*/flush = NONE/' {_CONF}"
# Only inet and inet6 destinations (connects to AF_UNIX sockets, e.g. /dev/log, make four records
# each, a PATH among them, and are not attempts).
_INET_ONLY = (
    f"sed -i -e 's/-S connect -k/-S connect -F saddr_fam=2 -k/p' "
    f"-e 's/-S connect -F saddr_fam=2 -k/-S connect -F saddr_fam=10 -k/' {_RULES}"
)
VARIANTS = {
    "disabled": "",
    "off": "",
    "on": "",
    "inet-only": _INET_ONLY,
    "flush-none": _FLUSH_NONE,
    "no-proctitle": _EXCLUDE_PROCTITLE,
    "no-eoe": _EXCLUDE_EOE,
    "lean": f"{_FLUSH_NONE}; {_EXCLUDE_PROCTITLE}",
    "leanest": f"{_FLUSH_NONE}; {_EXCLUDE_PROCTITLE}; {_EXCLUDE_EOE}; {_INET_ONLY}",
    "no-boost": f"sed -i 's/^priority_boost = .*/priority_boost = 0/' {_CONF}",
    "idle": f"sed -i 's/^priority_boost = .*/priority_boost = 0/' {_CONF}",
    "lean-idle": f"sed -i 's/^priority_boost = .*/priority_boost = 0/' {_CONF}; "
    f"{_FLUSH_NONE}; {_EXCLUDE_PROCTITLE}; {_EXCLUDE_EOE}; {_INET_ONLY}",
    # What keeps every field of an attempt (PROCTITLE is the command line).
    "proposed": f"sed -i 's/^priority_boost = .*/priority_boost = 0/' {_CONF}; "
    f"{_EXCLUDE_EOE}; {_INET_ONLY}",
    "no-write": f"sed -i 's/^write_logs = .*/write_logs = no/' {_CONF}",
    "no-match": f"sed -i 's/ -k sbx-connect/ -F uid=4242 -k sbx-connect/' {_RULES}",
}


def variant_script(name: str) -> str:
    """Shell that puts the guest's auditd in configuration `name` (from the image's own)."""
    lines = [
        "set -e",
        _SAVE,
        f"cp {_SAVED}/auditd.conf {_CONF}",
        f"cp {_SAVED}/audit.rules {_RULES}",
        VARIANTS[name],
        # The unit's ExecStartPost loads rules.d; a restart also rereads auditd.conf.
        "systemctl restart auditd.service",
        "auditctl -D >/dev/null" if name == "off" else "auditctl -l | grep -q sbx-connect",
        "auditctl -e 0 >/dev/null" if name == "disabled" else "",
        # auditd and kauditd only on a CPU nothing else wants: the records wait in the kernel's
        # backlog (65536 records, ~16,000 connects) instead of taking the program's time.
        "chrt --idle -p 0 $(pidof auditd) && chrt --idle -p 0 $(pgrep -x kauditd)"
        if name in ("idle", "lean-idle", "proposed")
        else "",
        "sync",
    ]
    return "\n".join(line for line in lines if line)


class Sandbox:
    def __init__(self, env: dict[str, str], name: str) -> None:
        self.env, self.name = env, name

    def cli(self, *args: str, timeout: float = 1800) -> str:
        # A guest that dies under an OpenSSH session leaves it waiting for ever.
        result = subprocess.run(
            [SANDBOX, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise SystemExit(f"sandbox {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def exec(self, *argv: str) -> str:
        """A command in the guest; the capture is collected after it, as for any `exec`."""
        return self.cli("exec", "--name", self.name, "--", *argv)

    def ssh(self, command: str) -> str:
        """A shell command in the guest with no collection after it (timed runs)."""
        return self.cli("ssh", "--name", self.name, "--", command)

    def run_program(self, n: int, *, collect: bool) -> float:
        argv = ["php", "-r", PROGRAM, str(n)]
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
        out = self.exec(*argv) if collect else self.ssh(quoted)
        return float(out.strip())

    def recorded(self, since: str) -> int:
        out = self.cli("logs", "--name", self.name, "--json", "--since", since, "--process", "php")
        count = 0
        for line in out.splitlines():
            record = json.loads(line)
            if record["verdict"] in ("allowed", "blocked") and record["dst"] in (
                "203.0.113.7",
                "198.51.100.9",
            ):
                count += 1
        return count

    def now(self) -> str:
        return self.ssh("date -u +%Y-%m-%dT%H:%M:%S.%6N+00:00").strip()


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


def completeness(box: Sandbox, counts: list[int]) -> None:
    print(f"{'N':>6}  {'ours':>8}  {'lsof 1 s':>8}")
    for n in counts:
        since = box.now()
        box.ssh(f"nohup sh -c '{LSOF_LOOP}' >/dev/null 2>&1 & echo $! > /tmp/lsof.pid")
        box.run_program(n, collect=True)
        lsof_text = box.ssh("kill $(cat /tmp/lsof.pid); sleep 0.2; cat /tmp/lsof.out")
        # Records younger than the capture's settle window (monitor.SETTLE_SECONDS) wait for
        # the next collection; count after it, as the next `logs`, `exec` or `destroy` would.
        time.sleep(monitor.SETTLE_SECONDS + 1)
        ours = box.recorded(since)
        print(f"{n:>6}  {ours / n:>8.1%}  {lsof_seen(lsof_text) / n:>8.1%}", flush=True)


def overhead(box: Sandbox, n: int, variants: list[str], rounds: int) -> None:
    """Each round runs every variant once, in an order rotated by one per round (the machine's
    load drifts: neighbours in time share it), and compares medians with `off`."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_no in range(rounds):
        shift = round_no % len(variants)
        for name in variants[shift:] + variants[:shift]:
            box.ssh(variant_script(name))
            times[name].append(box.run_program(n, collect=False))
            print(f"  round {round_no + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    box.ssh(variant_script("on"))
    reference = "disabled" if "disabled" in times else "off"
    base = statistics.median(times[reference]) if reference in times else None
    print(f"run time of {n} attempts (median of {rounds}), against {reference}:")
    for name in variants:
        median = statistics.median(times[name])
        ratio = f"  {median / base:.3f} x ({(median / base - 1) * 100:+.1f} %)" if base else ""
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<13} {median:7.2f} s{ratio}   [{runs}]", flush=True)
    if base and "on" in times:
        print(f"target: on <= +5 % over {reference}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per variant")
    parser.add_argument("--variants", nargs="+", default=["on", "off"], choices=list(VARIANTS))
    parser.add_argument("--attempts", type=int, help="N of the timed runs (default: max count)")
    parser.add_argument("--name", default="bench-capture", help="the sandbox's name")
    parser.add_argument(
        "--existing",
        action="store_true",
        help="use the running sandbox --name (state from $XDG_STATE_HOME, allowing 203.0.113.7) "
        "instead of creating and destroying one",
    )
    parser.add_argument("--setup", help="shell run once in the guest after `up`")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        return run_in_lab([sys.executable, *sys.argv])

    env = dict(os.environ)
    if not args.existing:
        env["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="sandbox-bench-")
    box = Sandbox(env, args.name)
    if not args.existing:
        box.cli("up", "--name", args.name, "--allow", "203.0.113.7")
    try:
        if args.setup:
            box.ssh(args.setup)
        if args.counts:
            completeness(box, args.counts)
        n = args.attempts or max(args.counts or [10000])
        overhead(box, n, args.variants, args.rounds)
    finally:
        if not args.existing:
            box.cli("destroy", "--name", args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

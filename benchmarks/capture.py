"""Capture completeness and overhead: our collector against `lsof` polling once a second.

A PHP program in the guest makes N short-lived attempts, a quarter each: TCP allowed, TCP blocked,
UDP allowed, UDP blocked. Printed from the same run: the share of attempts each method recorded,
and the program's run time under each capture configuration against capture off. Runs inside the
namespace lab (it re-executes itself there), as root.

    python benchmarks/capture.py [--counts 1000 10000] [--rounds 3]
    python benchmarks/capture.py --counts --variants bare off on --rounds 5

Configurations (--variants) change the running guest, never the image:
- on: as the image boots: the firewall's NFLOG rules and the eBPF capture attached;
- off: the capture detached (`sbx-capture unload`), the NFLOG rules kept (nothing takes their
  packets then): what the capture's programs cost;
- bare: the capture detached and the firewall's NFLOG rules taken out (the recipe's plain
  accept/reject rules): no record of anything, the true "capture off";
- kmsg: as bare, but with every NFLOG rule a LOG rule to the kernel log, as in the recipe (and
  in this collector before the capture took the firewall's records), journald not reading it.
The capture is attached again (and the rules put back) after the timed runs.
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
from orchestrator.capture import monitor  # noqa: E402
from sandbox_lab import inside, run_in_lab  # noqa: E402

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

# The policy's rules as `up` loaded them, kept aside once so that every variant starts from them.
_SAVED = "/root/sbx-bench"
_SAVE = (
    f"mkdir -p {_SAVED}; [ -e {_SAVED}/v4.rules ] || "
    f"{{ iptables-save > {_SAVED}/v4.rules && ip6tables-save > {_SAVED}/v6.rules; }}"
)
_ATTACH = f"{monitor.CAPTURE_TOOL} load {monitor.CAPTURE_OBJECT}"
_DETACH = f"{monitor.CAPTURE_TOOL} unload"
_NO_LOG = (
    f"grep -v -- '-j NFLOG' {_SAVED}/v4.rules | iptables-restore && "
    f"grep -v -- '-j NFLOG' {_SAVED}/v6.rules | ip6tables-restore"
)
_TO_LOG = (
    r's/-j NFLOG --nflog-prefix \("[^"]*"\) --nflog-group [0-9]*/'
    r"-j LOG --log-prefix \1 --log-uid/"
)
_KMSG = (
    "mkdir -p /run/systemd/journald.conf.d && "
    "printf '[Journal]\\nReadKMsg=no\\n' > /run/systemd/journald.conf.d/zz-bench.conf && "
    "systemctl restart systemd-journald && "
    f"sed -e '{_TO_LOG}' {_SAVED}/v4.rules | iptables-restore && "
    f"sed -e '{_TO_LOG}' {_SAVED}/v6.rules | ip6tables-restore && "
    "iptables-save | grep -q -- '-j LOG'"
)
VARIANTS = {
    "on": _ATTACH,
    "off": _DETACH,
    "bare": f"{_DETACH}; {_NO_LOG}",
    "kmsg": f"{_DETACH}; {_KMSG}",
}


def variant_script(name: str) -> str:
    """Shell that puts the guest in configuration `name` (from the policy's own rules), with
    nothing left of the previous run: its TIME_WAIT sockets would make connect()'s search for a
    free port slower (none are kept: tcp_max_tw_buckets 0), its flows would fill conntrack."""
    return "\n".join(
        [
            "set -e",
            _SAVE,
            f"iptables-restore < {_SAVED}/v4.rules",
            f"ip6tables-restore < {_SAVED}/v6.rules",
            VARIANTS[name],
            "sysctl -qw net.ipv4.tcp_max_tw_buckets=0",
            "conntrack -F 2>/dev/null || true",
            "sync",
        ]
    )


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
    load drifts: neighbours in time share it), and compares medians with `bare` (or `off`)."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_no in range(rounds):
        shift = round_no % len(variants)
        for name in variants[shift:] + variants[:shift]:
            box.ssh(variant_script(name))
            times[name].append(box.run_program(n, collect=False))
            print(f"  round {round_no + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    box.ssh(variant_script("on"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = "bare" if "bare" in times else "off"
    base = medians.get(reference)
    print(f"run time of {n} attempts (median of {rounds}), against {reference}:")
    for name in variants:
        ratio = ""
        if base:
            ratio = f"  {medians[name] / base:.3f} x ({(medians[name] / base - 1) * 100:+.1f} %)"
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<5} {medians[name]:7.2f} s{ratio}   [{runs}]", flush=True)
    # Each round's variants ran next to each other: their ratios share that round's load.
    for name, against in (("on", reference), ("on", "off"), ("off", "bare")):
        if name in times and against in times and name != against:
            paired = statistics.median(
                a / b for a, b in zip(times[name], times[against], strict=True)
            )
            print(
                f"  {name} against {against}, median of the rounds' ratios: {paired:.3f} x "
                f"({(paired - 1) * 100:+.1f} %)"
            )
    if base and "on" in medians:
        print(f"target: on <= +5 % over {reference}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per variant")
    parser.add_argument(
        "--variants", nargs="+", default=["bare", "off", "on"], choices=list(VARIANTS)
    )
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

"""What a wildcard entry (`--allow '*.cdn.inet.test:80'`) costs a lookup, side by side in one run
with a name allowed at `up` (`--allow www.inet.test:80`), measured inside the guest with PHP's
gethostbyname (A only) in one sandbox per round:

- `static`: a name the network's dnsmasq answers itself (after one unmeasured lookup);
- `first wildcard`: the first name under the wildcard: dnsmasq forwards it to the sandbox's own
  resolver, which asks the lab's DNS server, logs in to the guest over SSH (its first push) and
  adds the address to both layers before it answers;
- `next wildcard`: another name under it, to another address: one push on the open session;
- `cached wildcard`: the first name again: dnsmasq answers from its cache, nothing is pushed.

Ratios are against `static` in the same round. Runs inside the namespace lab (it re-executes
itself there), as root; the lab must be up (`sandbox-lab up`), whose DNS server
(sandbox_lab/dns.py) is the resolvers' upstream.

With `--remote`, each round also runs the same on the lab's remote libvirt host (brought up and
down by the benchmark, sandbox_lab/remote.py), alternating which goes first, and the table adds
remote / local per case: there the query goes from the host's dnsmasq through the relay and an
SSH channel to the resolver on this machine, and the push to the guest goes through the host.

    python benchmarks/wildcards.py [--rounds N] [--remote]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sandbox_lab import inside, run_in_lab  # noqa: E402
from sandbox_lab.dns import DNS_SERVER  # noqa: E402
from sandbox_lab.remote import client_env, run_with_remote  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
CASES = (
    ("static", "www.inet.test"),
    ("first wildcard", "a.cdn.inet.test"),
    ("next wildcard", "b.cdn.inet.test"),
    ("cached wildcard", "a.cdn.inet.test"),
)
# The first lookup of a process loads the resolver's libraries and reads its files: done once
# before the measured ones, so that `static` is the cost of a query, not of a process's first.
SCRIPT = (
    "<?php\n$out = [];\ngethostbyname('www.inet.test');\n"
    + "".join(
        f"$t = hrtime(true); $a = gethostbyname('{host}'); "
        f"$out[] = ['{case}', (hrtime(true) - $t) / 1e9, $a];\n"
        for case, host in CASES
    )
    + 'echo json_encode($out), "\\n";\n'
)


def sandbox(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([SANDBOX, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sandbox {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def wait_removed(state_dir: Path, seconds: float = 120.0) -> None:
    """destroy returns before its removal ends (it goes on in the background)."""
    end = time.monotonic() + seconds
    while (state_dir / "state.json").exists() and time.monotonic() < end:
        time.sleep(0.2)


def one_round(env: dict[str, str], name: str, script: Path) -> dict[str, float]:
    sandbox(env, "up", "--cold", "--name", name, "--allow", "www.inet.test:80",
            "--allow", "*.cdn.inet.test:80")  # fmt: skip
    try:
        printed = sandbox(env, "run", "--name", name, str(script))
    finally:
        sandbox(env, "destroy", "--name", name)
        wait_removed(Path(env["XDG_STATE_HOME"]) / "sandbox" / name)
    rows = json.loads(printed.splitlines()[0])
    for case, _seconds, address in rows:
        if address.endswith("inet.test"):
            raise SystemExit(f"{case}: the name did not resolve ({address})")
    return {case: float(seconds) for case, seconds, _address in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--remote", action="store_true", help="side by side with a remote host")
    parser.add_argument("--uri", help=argparse.SUPPRESS)  # given by the outer run to the inner
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        run = run_with_remote if args.remote else run_in_lab
        return run([sys.executable, *sys.argv])
    if args.remote and not (args.uri and args.home):
        print("run it from the root namespace: it brings the lab's remote host up", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-wild-") as tmp:
        work = Path(tmp)
        config = work / "config.yaml"
        config.write_text(f"boot_timeout: 900\nnetwork:\n  resolvers: [{DNS_SERVER}]\n")
        script = work / "lookups.php"
        script.write_text(SCRIPT)
        envs = {
            "local": {**os.environ, "XDG_STATE_HOME": str(work / "local"),
                      "SANDBOX_CONFIG": str(config)},
        }  # fmt: skip
        if args.remote:
            remote_state = {**envs["local"], "XDG_STATE_HOME": str(work / "remote")}
            envs["remote"] = client_env(remote_state, args.uri, args.home)
        tag = secrets.token_hex(2)  # names of this run's own: another's may still be going away
        rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in envs}
        for i in range(args.rounds):
            order = list(envs) if i % 2 == 0 else list(reversed(envs))
            for kind in order:
                rounds[kind].append(one_round(envs[kind], f"bw{tag}{kind[0]}{i}", script))
    print(f"lookup time inside the guest, {args.rounds} round(s), one fresh sandbox each")
    header = f"{'case':<16} {'median s':>9} {'x static':>9}"
    if args.remote:
        header += f" {'remote s':>9} {'x static':>9} {'remote/local':>13}"
    print(header + "   per round (local)")
    for case, _host in CASES:
        line = ""
        medians = {}
        for kind in rounds:
            seconds = [r[case] for r in rounds[kind]]
            ratios = [r[case] / r["static"] for r in rounds[kind]]
            medians[kind] = statistics.median(seconds)
            line += f" {medians[kind]:>9.3f} {statistics.median(ratios):>9.1f}"
        if args.remote:
            line += f" {medians['remote'] / medians['local']:>13.2f}"
        each = ", ".join(f"{r[case]:.3f}" for r in rounds["local"])
        print(f"{case:<16}{line}   {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

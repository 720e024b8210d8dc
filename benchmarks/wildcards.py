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

    python benchmarks/wildcards.py [--rounds N]
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
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        return run_in_lab([sys.executable, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-wild-") as tmp:
        work = Path(tmp)
        config = work / "config.yaml"
        config.write_text(f"boot_timeout: 900\nnetwork:\n  resolvers: [{DNS_SERVER}]\n")
        script = work / "lookups.php"
        script.write_text(SCRIPT)
        env = {**os.environ, "XDG_STATE_HOME": str(work / "state"), "SANDBOX_CONFIG": str(config)}
        tag = secrets.token_hex(2)  # names of this run's own: another's may still be going away
        rounds = [one_round(env, f"bw{tag}{i}", script) for i in range(args.rounds)]
    print(f"lookup time inside the guest, {args.rounds} round(s), one fresh sandbox each")
    print(f"{'case':<16} {'median s':>9} {'x static':>9}   per round")
    for case, _host in CASES:
        seconds = [r[case] for r in rounds]
        ratios = [r[case] / r["static"] for r in rounds]
        each = ", ".join(f"{s:.3f}" for s in seconds)
        print(
            f"{case:<16} {statistics.median(seconds):>9.3f} {statistics.median(ratios):>9.1f}"
            f"   {each}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

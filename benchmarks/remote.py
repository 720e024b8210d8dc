"""A sandbox on a remote libvirt host against one on this machine, side by side in one run: `up`,
a `run` of one PHP script, `logs` (a collection: over SSH and SFTP for the remote host) and
`destroy`, and what the client's state directory holds per sandbox.

The remote host is the lab's (sandbox_lab/remote.py: libvirtd and sshd in namespaces of their own,
on this same machine, reached over SSH through a veth): the figures are what SSH and the jump add,
not a real network's latency. Runs inside the namespace lab (it re-executes itself there), as
root; the lab must be up (`sandbox-lab up`); the remote host is brought up and down here.

    python benchmarks/remote.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sandbox_lab import inside  # noqa: E402
from sandbox_lab.remote import client_env, run_with_remote  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
SCRIPT = """<?php
$a = @fsockopen("203.0.113.7", 80, $errno, $errstr, 5);
$b = @fsockopen("198.51.100.9", 80, $errno, $errstr, 5);
echo gethostbyname("www.inet.test"), "\\n";
"""


def timed(env: dict[str, str], *args: str) -> float:
    start = time.monotonic()
    subprocess.run([SANDBOX, *args], env=env, check=True, capture_output=True, text=True)
    return time.monotonic() - start


def wait_removed(state_dir: Path, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while (state_dir / "state.json").exists() and time.monotonic() < end:
        time.sleep(0.2)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_round(env: dict[str, str], name: str, script: Path) -> dict[str, float]:
    took = {"up": timed(env, "up", "--cold", "--name", name, "--allow", "203.0.113.7")}
    took["run"] = timed(env, "run", "--name", name, str(script))
    took["logs"] = timed(env, "logs", "--name", name)
    took["destroy"] = timed(env, "destroy", "--name", name)
    state_dir = Path(env["XDG_STATE_HOME"]) / "sandbox" / name
    wait_removed(state_dir)
    took["state KiB"] = du(state_dir) / 1024
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.parse_args()  # --help, and the check of --rounds
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        return run_with_remote([sys.executable, *sys.argv])
    print("run it from the root namespace: it brings the lab's remote host up", file=sys.stderr)
    return 2


def measure(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sandbox-bench-remote-"))
    script = work / "bench.php"
    script.write_text(SCRIPT)
    local = {**os.environ, "XDG_STATE_HOME": str(work / "local"), "COLUMNS": "500"}
    remote = client_env({**local, "XDG_STATE_HOME": str(work / "remote")}, args.uri, args.home)
    results: dict[str, dict[str, list[float]]] = {"local": {}, "remote": {}}
    for round_no in range(args.rounds):
        order = ("local", "remote") if round_no % 2 == 0 else ("remote", "local")
        for kind in order:
            env = local if kind == "local" else remote
            for key, value in one_round(env, f"bench-{kind}", script).items():
                results[kind].setdefault(key, []).append(value)
            print(f"round {round_no + 1}: {kind}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in results[kind].items()), flush=True)  # fmt: skip
    print("\nmedians             local    remote   remote / local")
    for key in results["local"]:
        here, there = (statistics.median(results[k][key]) for k in ("local", "remote"))
        print(f"  {key:14s} {here:8.2f}  {there:8.2f}   {there / here:6.2f}")
    return 0


if __name__ == "__main__":
    if "--uri" in sys.argv:
        sys.exit(measure(sys.argv[1:]))
    sys.exit(main())

"""`sandbox up` against a bare `virsh create` of the same image, `sandbox destroy`, a warm
`up` (from a warm VM), a one-shot `sandbox run --allow ... script.php`, and N sandboxes at once.

Runs inside the namespace lab (it re-executes itself there), as root. Rounds alternate the two
boots so that drift on a shared machine hits both alike; the figures that matter are the ratios
printed at the end, measured side by side in this one run.

    python benchmarks/up_destroy.py [--rounds N] [--warm-rounds N] [--concurrency 1,2,4,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator import lifecycle, paths  # noqa: E402
from orchestrator.config import Settings  # noqa: E402
from orchestrator.egress.policy import build_policy  # noqa: E402
from orchestrator.errors import SandboxError  # noqa: E402
from orchestrator.lifecycle import build  # noqa: E402
from orchestrator.run.xdebug import XdebugMode  # noqa: E402
from orchestrator.vm import hypervisor as hv  # noqa: E402
from orchestrator.vm.guest import wait_for_banner  # noqa: E402
from orchestrator.vm.images import Image, ImageRecipe, build_image  # noqa: E402
from sandbox_lab import inside, run_in_lab  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
BOOT_TIMEOUT = 600.0


def time_up(env: dict[str, str]) -> float:
    start = time.monotonic()
    done = subprocess.run(
        [SANDBOX, "up", "--cold", "--name", "bench"],
        env={**env, "COLUMNS": "500"},  # one progress line per step (up_steps), not wrapped
        check=True,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - start
    UP_STEPS.append(up_steps(done.stderr))
    return took


def time_destroy(env: dict[str, str], name: str = "bench") -> float:
    start = time.monotonic()
    subprocess.run([SANDBOX, "destroy", "--name", name], env=env, check=True, capture_output=True)
    took = time.monotonic() - start
    wait_removed(env, name)  # its child's removal, not timed: the next `up` would wait for it
    return took


# ---- where `up`'s and `destroy`'s seconds go (issue 15 items 3 and 4) -------------------------

# Each `sandbox up`'s steps as its progress lines say them ("✓ STEP (N s)").
UP_STEPS: list[dict[str, float]] = []
_STEP = re.compile(r"^✓ (.*) \(([0-9.]+) s\)$")


def up_steps(stderr: str) -> dict[str, float]:
    steps: dict[str, float] = {}
    for line in stderr.splitlines():
        found = _STEP.match(line.strip())
        if found:
            # A step names its VM, network or tap: one row for every round.
            what = re.sub(r"sandbox-bench|sbx[0-9a-f]{10}|[0-9]+\.[0-9.]+", "…", found.group(1))
            steps[what] = steps.get(what, 0.0) + float(found.group(2))
    return steps


def print_up_steps() -> None:
    """The median of each step of the timed `up`s; what is not a step is the CLI's own."""
    timed = UP_STEPS[1:]  # the first is the warm-up's (it uploads the base image)
    print("sandbox up, median per step:")
    for what in timed[0] if timed else []:
        values = [steps.get(what, 0.0) for steps in timed]
        print(f"  {statistics.median(values):6.2f} s  {what}")


def wait_removed(env: dict[str, str], name: str = "bench", seconds: float = 120.0) -> float:
    """Wait for the removal a `destroy` left to its child (the state file goes last); how long."""
    state_file = Path(env["XDG_STATE_HOME"]) / paths.APP / name / paths.STATE_FILE
    start = time.monotonic()
    while state_file.exists() and time.monotonic() - start < seconds:
        time.sleep(0.02)
    return time.monotonic() - start


def destroy_breakdown(ctx: lifecycle.Context, env: dict[str, str]) -> None:
    """One more `up`, then its `destroy` in this process with each part timed, and the CLI's
    own start-up (a destroy of a sandbox that does not exist)."""
    from types import ModuleType

    from orchestrator.lifecycle import collection, teardown

    time_up(env)
    spent: dict[str, float] = {}

    def timed(name: str, what: str, module: ModuleType = teardown) -> None:
        inner = getattr(module, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[what] = spent.get(what, 0.0) + time.monotonic() - start

        setattr(module, name, wrapper)

    timed("_caught_up", "waiting for the guest's copy to catch up (two rounds)")
    timed("_pause", "pausing the VM")
    # teardown imports it when it collects: the collection module's own name is the one used.
    timed(
        "collect_locked",
        "final collection (host's copy: read, parse, join, store)",
        collection,
    )
    timed("_detach", "starting the removal's child")
    start = time.monotonic()
    report = teardown.destroy(ctx, "bench", detach=True)
    visible = time.monotonic() - start
    background = wait_removed(env)
    floor = time.monotonic()
    subprocess.run([SANDBOX, "destroy", "--name", "nothing"], env=env, capture_output=True)
    floor = time.monotonic() - floor
    print("sandbox destroy, where the time goes:")
    for what, seconds in spent.items():
        print(f"  {seconds:6.3f} s  {what}")
    print(f"  {visible:6.3f} s  in all, until `destroy` returns (in process)")
    print(f"  {floor:6.3f} s  the CLI's own start-up and exit (destroy of no sandbox)")
    print(f"  {background:6.3f} s  then, in its child: VM, filter, volumes, network, state")
    print(f"  ({'; '.join(report.removed)})")


ONE_SHOT_SCRIPT = """<?php
$f = @fsockopen('198.51.100.9', 80, $errno, $errstr, 3);
$g = @fsockopen('203.0.113.7', 80, $errno, $errstr, 3);
echo $f ? "reached\\n" : "blocked\\n";
"""


def sandbox(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SANDBOX, *args], env=env, check=True, capture_output=True, text=True)


def time_warm(env: dict[str, str], rounds: int, script: Path) -> dict[str, list[float]]:
    """Each round: one warm VM booted (not timed), then `up` from it; destroy; then another warm
    VM and a one-shot run from it (up, run, collect, summary, destroy: the whole command)."""
    found: dict[str, list[float]] = {"warm up": [], "warm destroy": [], "one-shot run": []}
    for round_no in range(rounds):
        sandbox(env, "warm", "fill", "--count", "1")
        start = time.monotonic()
        made = sandbox(env, "up", "--name", "bench-warm", "--allow", "203.0.113.7")
        found["warm up"].append(time.monotonic() - start)
        assert "warm VM" in made.stderr, made.stderr
        found["warm destroy"].append(time_destroy(env, "bench-warm"))
        sandbox(env, "warm", "fill", "--count", "1")
        start = time.monotonic()
        ran = sandbox(env, "run", "--allow", "203.0.113.7", str(script))
        found["one-shot run"].append(time.monotonic() - start)
        assert "blocked" in ran.stdout, ran.stdout
        print(
            f"warm round {round_no + 1}: "
            + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in found.items()),
            flush=True,
        )
    return found


def qemu_rss_mib(domains: list[str]) -> float:
    """The resident memory of the QEMU processes running these domains, MiB."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if not any(f"guest={d},".encode() in arg for arg in cmdline for d in domains):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def time_concurrent(env: dict[str, str], count: int, warm: bool) -> tuple[list[float], float]:
    """`count` sandboxes brought up at once (from warm VMs booted beforehand, untimed, when
    `warm`): each one's up time, and the resident memory of its QEMU process (the base image
    is one read-only backing file for all of them, in the host's page cache once)."""
    if warm:
        sandbox(env, "warm", "fill", "--count", str(count))
    names = [f"bench-c{count}-{i}" for i in range(count)]
    started = [
        (
            time.monotonic(),
            subprocess.Popen(
                [SANDBOX, "up", "--name", n, *([] if warm else ["--cold"])],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for n in names
    ]
    times = []
    for start, proc in started:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"up failed: {err}")
        times.append(time.monotonic() - start)
    domains = []
    for n in names:
        state = (Path(env["XDG_STATE_HOME"]) / paths.APP / n / paths.STATE_FILE).read_text()
        domains.append(json.loads(state)["domain"])
    rss = qemu_rss_mib(domains) / count
    for n in names:
        time_destroy(env, n)
    return times, rss


def time_bare(ctx: lifecycle.Context, image: Image) -> float:
    """What a hand-rolled script does: an overlay, a seed, a domain started, the lease, the SSH
    banner. Built by `up`'s own steps, minus what makes it a sandbox (no host filter, guard,
    host-side records, policy push or capture); only the boot is timed."""
    with hv.connection(ctx.settings.connect) as conn, ExitStack() as rollback:
        policy = build_policy([])
        state = build.new_state(ctx, conn, "bench-bare", image, policy, XdebugMode.OFF)
        # The rollback removes everything the steps made when this block ends.
        steps = build.Build(ctx, conn, image, policy, rollback, state)
        steps.record_intent()
        steps.make_keys()
        with ctx.store.global_lock():
            steps.prepare_storage()
            steps.start_network()
            steps.make_disks()
        start = time.monotonic()
        steps.start_vm(host_filter=False)
        try:
            ip = hv.wait_for_lease(steps.dom, steps.state.mac, steps.boot)
            wait_for_banner(ip, 22, steps.boot)
        except SandboxError:
            # The rollback removes the console log with the volumes: its tail first.
            console = hv.console_text(conn, steps.pool, steps.vols.console)
            print("--- the bare boot's console ---", *console.splitlines()[-40:], sep="\n")
            raise
        return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", default="1,2,4,8", help="numbers of sandboxes at once ('' for none)"
    )
    parser.add_argument(
        "--warm-concurrency", default="1,2,4", help="the same, from warm VMs ('' for none)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab needs network namespaces)", file=sys.stderr)
        return 2
    if not inside():
        return run_in_lab([sys.executable, *sys.argv])

    dirs = paths.Dirs.from_env()
    image = build_image(ImageRecipe(), dirs.images)
    state_home = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    env = {**os.environ, "XDG_STATE_HOME": str(state_home)}
    # The bare boots' state lives beside the sandboxes' (XDG_STATE_HOME of this run only).
    ctx = lifecycle.Context(
        settings=Settings(boot_timeout=BOOT_TIMEOUT),
        dirs=dataclasses.replace(dirs, state=state_home / paths.APP),
    )

    # Warm-up (not measured): the image goes into the pool once per image version.
    time_up(env)
    time_destroy(env)

    ups: list[float] = []
    bares: list[float] = []
    destroys: list[float] = []
    for round_no in range(args.rounds):
        order = ("up", "bare") if round_no % 2 == 0 else ("bare", "up")
        for kind in order:
            if kind == "up":
                ups.append(time_up(env))
                destroys.append(time_destroy(env))
            else:
                bares.append(time_bare(ctx, image))
            print(
                f"round {round_no + 1}: {kind} {(ups if kind == 'up' else bares)[-1]:.1f} s",
                flush=True,
            )
    up_m, bare_m, destroy_m = (statistics.median(x) for x in (ups, bares, destroys))

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    ratio = up_m / bare_m
    print(f"sandbox up to ready (login done): median {up_m:6.1f} s  [{runs(ups)}]")
    print(f"bare boot + SSH banner:           median {bare_m:6.1f} s  [{runs(bares)}]")
    print(f"sandbox destroy (CLI, wall):      median {destroy_m:6.2f} s  [{runs(destroys)}]")
    print(f"overhead: up / bare = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %), target <= +10 %")
    print(f"destroy: {destroy_m:.2f} s, target < 1 s")
    print_up_steps()
    destroy_breakdown(ctx, env)

    script = state_home / "one-shot.php"
    script.write_text(ONE_SHOT_SCRIPT)
    if args.warm_rounds:
        warm = time_warm(env, args.warm_rounds, script)
        warm_m = {k: statistics.median(v) for k, v in warm.items()}
        for key, values in warm.items():
            print(f"{key + ':':33} median {warm_m[key]:6.2f} s  [{runs(values)}]")
        print(
            f"warm: up {warm_m['warm up']:.2f} s (target <= 4 s), "
            f"{warm_m['warm up'] / up_m:.2f} of a cold up; one-shot run "
            f"{warm_m['one-shot run']:.2f} s (target <= 10 s)"
        )

    rows = [(int(n), False) for n in args.concurrency.split(",") if n.strip()]
    rows += [(int(n), True) for n in args.warm_concurrency.split(",") if n.strip()]
    if rows:
        print(f"N sandboxes at once ({os.cpu_count()} CPUs, {available_mib():.0f} MiB available):")
        print(
            "| start | N | up median (s) | up max (s) | up median / cold up "
            "| QEMU RSS per sandbox (MiB) |"
        )
        print("|---|---|---|---|---|---|")
        for count, warm_start in rows:
            times, rss = time_concurrent(env, count, warm_start)
            median = statistics.median(times)
            print(
                f"| {'warm' if warm_start else 'cold'} | {count} | {median:.1f} | "
                f"{max(times):.1f} | {median / up_m:.2f} | {rss:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

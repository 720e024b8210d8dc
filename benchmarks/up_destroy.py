"""`sandbox up` against a bare `virsh create` of the same image, and `sandbox destroy`.

Runs inside the namespace lab (it re-executes itself there), as root. Rounds alternate the two
boots so that drift on a shared machine hits both alike; the figures that matter are the ratios
printed at the end, measured side by side in this one run.

    python benchmarks/up_destroy.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator import lifecycle, paths  # noqa: E402
from orchestrator.config import Settings  # noqa: E402
from orchestrator.vm import hypervisor as hv  # noqa: E402
from orchestrator.vm.cloudinit import SeedSpec, build_seed_iso  # noqa: E402
from orchestrator.vm.domain import DomainSpec, NetworkSpec, render_domain  # noqa: E402
from orchestrator.vm.guest import generate_ed25519, wait_for_banner  # noqa: E402
from orchestrator.vm.images import KERNEL_CMDLINE, ImageRecipe, build_image  # noqa: E402
from orchestrator.waits import Deadline  # noqa: E402
from sandbox_lab import inside, run_in_lab  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
BOOT_TIMEOUT = 600.0


def time_up(env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run([SANDBOX, "up", "--name", "bench"], env=env, check=True, capture_output=True)
    return time.monotonic() - start


def time_destroy(env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(
        [SANDBOX, "destroy", "--name", "bench"], env=env, check=True, capture_output=True
    )
    return time.monotonic() - start


def time_bare(ctx: lifecycle.Context, xml_path: Path, mac: str, overlay: str, base: str) -> float:
    """What a hand-rolled script does: qemu-img overlay, virsh create, lease, SSH banner."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay],
        check=True,
    )
    start = time.monotonic()
    subprocess.run(["virsh", "-q", "create", str(xml_path)], check=True, capture_output=True)
    deadline = Deadline(BOOT_TIMEOUT, "the bare VM to boot")
    with hv.connection(ctx.settings.connect) as conn:
        dom = conn.lookupByName("bench-bare")
        ip = hv.wait_for_lease(dom, mac, deadline)
        wait_for_banner(ip, 22, deadline)
        took = time.monotonic() - start
        dom.destroy()
    os.unlink(overlay)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
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
    ctx = lifecycle.Context(settings=Settings(), dirs=dirs)

    # Warm-up (not measured): the image goes into the pool once per image version.
    time_up(env)
    time_destroy(env)

    with hv.connection(ctx.settings.connect) as conn:
        pool = hv.ensure_pool(conn, ctx.pool_spec())
        base = hv.ensure_base_volumes(
            conn,
            pool,
            image_name=image.name,
            image_hash=image.manifest.recipe_hash,
            disk=image.disk,
            kernel=image.kernel,
            initrd=image.initrd,
        )
        pool_dir = hv.pool_path(pool)
        # The bare boot's own network, like a sandbox's, made once (not timed, as before).
        _net, net = hv.create_network(
            conn,
            lambda subnet, subnet6: NetworkSpec(
                "bench-bare", "sbrbenchbare", subnet, subnet6, guest_mac="52:54:00:be:0c:01"
            ),
            ctx.settings.network.subnets,
            ctx.settings.network.subnets6,
        )
        host = generate_ed25519("bench-host")
        client = generate_ed25519("bench-client")
        seed_path = Path(pool_dir) / "bench-bare-seed.iso"
        seed_path.write_bytes(
            build_seed_iso(
                SeedSpec(
                    "bench-bare",
                    "bench-bare",
                    host.private_openssh,
                    host.public_line,
                    client.public_line,
                    str(net.gateway),
                )
            )
        )
        mac = net.guest_mac or ""
        overlay = f"{pool_dir}/bench-bare.qcow2"
        spec = DomainSpec(
            name="bench-bare",
            uuid=str(uuid.uuid4()),
            accel=hv.resolve_accel(conn, ctx.settings.accel),
            memory_mib=ctx.settings.memory_mib,
            vcpus=ctx.settings.vcpus,
            kernel=hv.volume_path(pool, base.kernel),
            initrd=hv.volume_path(pool, base.initrd),
            cmdline=KERNEL_CMDLINE,
            disk=overlay,
            seed=str(seed_path),
            network=net.name,
            mac=mac,
            console_log=f"{pool_dir}/bench-bare-console.log",
            sandbox="bench-bare",
            image=image.name,
        )
        xml_path = state_home / "bare.xml"
        xml_path.write_text(render_domain(spec))
        base_path = hv.volume_path(pool, base.disk)

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
                bares.append(time_bare(ctx, xml_path, mac, overlay, base_path))
            print(
                f"round {round_no + 1}: {kind} {(ups if kind == 'up' else bares)[-1]:.1f} s",
                flush=True,
            )
    with hv.connection(ctx.settings.connect) as conn:
        hv.remove_network_if_unused(conn, net.name)
    for leftover in (seed_path, Path(f"{pool_dir}/bench-bare-console.log")):
        leftover.unlink(missing_ok=True)

    up_m, bare_m, destroy_m = (statistics.median(x) for x in (ups, bares, destroys))

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    ratio = up_m / bare_m
    print(f"sandbox up to ready (login done): median {up_m:6.1f} s  [{runs(ups)}]")
    print(f"bare virsh create + SSH banner:   median {bare_m:6.1f} s  [{runs(bares)}]")
    print(f"sandbox destroy (CLI, wall):      median {destroy_m:6.2f} s  [{runs(destroys)}]")
    print(f"overhead: up / bare = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %), target <= +10 %")
    print(f"destroy: {destroy_m:.2f} s, target < 1 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lifecycle logic on libvirt's test driver: rollback of a failed `up`, idempotent `destroy`
from half-built states, orphans. test:///default keeps its state for the whole process (a
test:///FILE driver is new on every connection, so it cannot stand in for a daemon): the fixture
removes whatever a test added. The real boot is in test_e2e.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from orchestrator import hostfilter, lifecycle, paths
from orchestrator import hypervisor as hv
from orchestrator.config import Settings
from orchestrator.domain import Accel, NetworkSpec, VolumeSpec, render_domain, render_volume
from orchestrator.errors import ConflictError, NotFoundError, TimeoutExpired, UsageError
from orchestrator.images import Image, ImageManifest
from orchestrator.state import Phase, SandboxState
from orchestrator.waits import Deadline

from .test_renderers import domain_spec

TEST_URI = "test:///default"


def _inventory(conn: libvirt.virConnect) -> set[str]:
    return (
        {f"dom:{d.name()}" for d in conn.listAllDomains(0)}
        | {f"net:{n.name()}" for n in conn.listAllNetworks(0)}
        | {f"pool:{p.name()}" for p in conn.listAllStoragePools(0)}
    )


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[lifecycle.Context]:
    settings = dataclasses.replace(Settings(), connect=TEST_URI, boot_timeout=1.0)
    dirs = paths.Dirs(data=tmp_path / "data", state=tmp_path / "state", config=tmp_path / "cfg")
    conn = libvirt.open(TEST_URI)
    baseline = _inventory(conn)
    yield lifecycle.Context(settings=settings, dirs=dirs)
    for item in _inventory(conn) - baseline:
        kind, name = item.split(":", 1)
        if kind == "dom":
            hv.destroy_domain(conn, name)
        elif kind == "net":
            net = conn.networkLookupByName(name)
            if net.isActive():
                net.destroy()
            net.undefine()
        else:
            pool = conn.storagePoolLookupByName(name)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
            pool.undefine()
    conn.close()


def fake_image(tmp_path: Path) -> Image:
    manifest = ImageManifest(
        name="default",
        recipe_hash="ab" * 32,
        created="2026-11-23T00:00:00+00:00",
        suite="bookworm",
        kernel_version="6.1.0-test-cloud-amd64",
    )
    for f in ("base.qcow2", "vmlinuz", "initrd.img"):
        (tmp_path / f).write_bytes(b"x")
    return Image.at(tmp_path, manifest)


@pytest.fixture(autouse=True)
def test_driver_edges(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test driver cannot stream volumes, has no x86_64 guests, no DHCP and no nwfilter:
    stand in for exactly those calls, and let every other libvirt call run for real."""

    def upload(conn: object, pool: libvirt.virStoragePool, name: str, **_: object) -> object:
        hv.delete_volume(pool, name)
        return pool.createXML(render_volume(VolumeSpec(name, 1 << 20, "raw")), 0)

    def lease(dom: object, mac: str, deadline: Deadline) -> str:
        raise deadline.error("no DHCP on the test driver")

    monkeypatch.setattr(hv, "upload", upload)
    monkeypatch.setattr(hv, "resolve_accel", lambda conn, requested: Accel.TCG)
    monkeypatch.setattr(hv, "wait_for_lease", lease)
    monkeypatch.setattr(lifecycle, "load_image", lambda name, d: fake_image(tmp_path))
    filters: set[str] = set()
    monkeypatch.setattr(hostfilter, "define_filter", lambda conn, xml: filters.add(xml))

    def remove_filter(conn: object, name: str) -> bool:
        had = bool(filters)
        filters.clear()
        return had

    monkeypatch.setattr(hostfilter, "remove_filter", remove_filter)
    monkeypatch.setattr(hostfilter, "ensure_shared_filters", lambda conn: None)


def leftovers(ctx: lifecycle.Context, name: str) -> list[str]:
    found: list[str] = []
    with hv.connection(ctx.settings.connect) as conn:
        found += [d.name() for d in conn.listAllDomains(0) if d.name().startswith("sandbox-")]
        found += [n.name() for n in conn.listAllNetworks(0) if n.name() == "sandbox"]
        for pool in conn.listAllStoragePools(0):
            found += [v for v in pool.listVolumes() if name in v]
    sdir = ctx.dirs.state / name
    found += [f for f in (*paths.SECRET_FILES, paths.STATE_FILE) if (sdir / f).exists()]
    return found


def test_failed_up_rolls_back_everything(ctx: lifecycle.Context) -> None:
    with pytest.raises(TimeoutExpired, match="DHCP"):
        lifecycle.up(ctx, "rb")
    # The base volumes are a shared cache and stay; everything of the sandbox is gone.
    assert leftovers(ctx, "sandbox-rb") == []
    with hv.connection(ctx.settings.connect) as conn:
        vols = conn.storagePoolLookupByName("sandbox").listVolumes()
    assert any(v.startswith("base-default-") for v in vols)
    # A new up after the failure starts clean (and fails the same way, not with a conflict).
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, "rb")


def test_up_refuses_existing_and_bad_input(ctx: lifecycle.Context) -> None:
    with pytest.raises(UsageError):
        lifecycle.up(ctx, "Bad_Name")
    with pytest.raises(UsageError, match="neither an IP address"):
        lifecycle.make_policy(ctx, ["203.0.113.999"])
    state = SandboxState(
        name="taken",
        phase=Phase.READY,
        created="x",
        uri=ctx.settings.connect,
        domain="sandbox-taken",
        pool="sandbox",
        network="sandbox",
        volumes=(),
        image="default",
        image_hash="",
        accel="tcg",
        mac="52:54:00:00:00:01",
    )
    ctx.store.save(state)
    with pytest.raises(ConflictError, match="exists"):
        lifecycle.up(ctx, "taken")


def half_built(ctx: lifecycle.Context, name: str) -> None:
    """What a SIGKILLed `up` leaves: a CREATING state, keys, volumes, a running domain, a net."""
    with hv.connection(ctx.settings.connect) as conn:
        pool = hv.ensure_pool(conn, ctx.pool_spec())
        for vol in hv.SandboxVolumes.for_sandbox(name).all():
            pool.createXML(render_volume(VolumeSpec(vol, 1 << 20, "raw")), 0)
        hv.ensure_network(conn, ctx.network_spec())
        spec = dataclasses.replace(
            domain_spec(Accel.TCG), name=hv.domain_name(name), sandbox=name, uuid=str(uuid.uuid4())
        )
        conn.createXML(render_domain(spec), 0)
    state = SandboxState(
        name=name,
        phase=Phase.CREATING,
        created="x",
        uri=ctx.settings.connect,
        domain=hv.domain_name(name),
        pool="sandbox",
        network="sandbox",
        volumes=(),
        image="default",
        image_hash="",
        accel="tcg",
        mac="52:54:00:00:00:02",
    )
    ctx.store.save(state)
    ctx.store.write_secret(name, paths.CLIENT_KEY, "secret")


def test_destroy_cleans_half_built_and_is_idempotent(ctx: lifecycle.Context) -> None:
    half_built(ctx, "half")
    assert leftovers(ctx, "sandbox-half")
    st = lifecycle.inspect(ctx, "half")
    assert st.summary == "creating"
    report = lifecycle.destroy(ctx, "half")
    assert "domain sandbox-half" in report.removed
    assert "network sandbox" in report.removed
    assert leftovers(ctx, "sandbox-half") == []
    again = lifecycle.destroy(ctx, "half")
    assert not again.existed


def test_destroy_keeps_network_while_another_sandbox_uses_it(ctx: lifecycle.Context) -> None:
    half_built(ctx, "one")
    half_built(ctx, "two")
    first = lifecycle.destroy(ctx, "one")
    assert "network sandbox" not in first.removed
    second = lifecycle.destroy(ctx, "two")
    assert "network sandbox" in second.removed


def test_orphan_domain_is_listed_and_destroyed(ctx: lifecycle.Context) -> None:
    half_built(ctx, "orphan")
    ctx.store.remove_secrets("orphan")  # state gone, the VM is still there
    statuses = {s.name: s.summary for s in lifecycle.list_status(ctx)}
    assert statuses.get("orphan") == "orphan"
    reports = lifecycle.destroy_all(ctx)
    assert "orphan" in [r.name for r in reports if r.existed]
    assert leftovers(ctx, "sandbox-orphan") == []


def test_guest_access_needs_a_ready_sandbox(ctx: lifecycle.Context) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        lifecycle.ready_state(ctx, "nope")
    half_built(ctx, "early")
    with pytest.raises(Exception, match="not ready"):
        lifecycle.ssh_argv(ctx, "early", [])


def test_run_needs_an_applied_policy_and_local_files_first(
    ctx: lifecycle.Context, tmp_path: Path
) -> None:
    from orchestrator import run as runs
    from orchestrator.errors import GuestError

    script = tmp_path / "x.php"
    script.write_text("<?php")

    def run(name: str, argv: tuple[str, ...]) -> None:
        lifecycle.run_target(
            ctx,
            name,
            runs.RunRequest(argv=argv, php=True),
            stdout=print,
            stderr=print,
            on_warning=print,
        )

    with pytest.raises(NotFoundError, match="does not exist"):
        run("nope", (str(script),))
    half_built(ctx, "early")
    with pytest.raises(GuestError, match="policy is not applied yet"):
        run("early", (str(script),))
    # A missing script is reported before the sandbox is even looked at.
    with pytest.raises(NotFoundError, match="no such PHP script"):
        run("early", (str(tmp_path / "missing.php"),))


def test_lock_excludes_concurrent_work(ctx: lifecycle.Context) -> None:
    with ctx.store.lock("busy"), pytest.raises(ConflictError, match="busy"):
        lifecycle.destroy(ctx, "busy")


def test_old_base_versions_are_pruned_unless_in_use(ctx: lifecycle.Context) -> None:
    with hv.connection(ctx.settings.connect) as conn:
        pool = hv.ensure_pool(conn, ctx.pool_spec())
        for version in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"):
            for ext in ("qcow2", "vmlinuz", "initrd", "complete"):
                pool.createXML(
                    render_volume(VolumeSpec(f"base-default-{version}.{ext}", 1 << 20, "raw")), 0
                )
        hv.create_overlay(pool, "sandbox-busy.qcow2", "base-default-bbbbbbbbbbbb.qcow2")
        removed = hv.prune_base_volumes(pool, "default", "c" * 64)
        left = sorted(pool.listVolumes())
    assert removed[0] == "base-default-aaaaaaaaaaaa.complete"
    assert sorted(removed) == sorted(
        f"base-default-aaaaaaaaaaaa.{ext}" for ext in ("qcow2", "vmlinuz", "initrd", "complete")
    )
    assert not any("aaaa" in v for v in left)
    assert sum("bbbb" in v for v in left) == 4 and sum("cccc" in v for v in left) == 4


@pytest.mark.parametrize(
    "value", ["192.168.213.0/24", "192.168.213.7", "0.0.0.0/0", "[2001:db8:213::5]:80"]
)
def test_allow_may_not_overlap_the_sandbox_network(ctx: lifecycle.Context, value: str) -> None:
    with pytest.raises(UsageError, match="overlaps the sandbox network"):
        lifecycle.make_policy(ctx, [value])


def test_policy_from_config_file_and_flags(ctx: lifecycle.Context, tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("allow: [198.51.100.0/24]\ndns: false\nblocked: drop\n")
    ctx.settings = dataclasses.replace(ctx.settings, allow=("203.0.113.7",))
    policy = lifecycle.make_policy(ctx, ["udp:203.0.113.9:53"], policy_file=policy_file, dns=True)
    assert [a.describe() for a in policy.allow] == [
        "198.51.100.0/24",
        "203.0.113.7",
        "udp:203.0.113.9:53",
    ]
    assert policy.dns is True  # the flag wins over the file
    assert policy.blocked.value == "drop"


def test_guest_address6_mirrors_the_ipv4_host_number_above_the_dynamic_range() -> None:
    net = NetworkSpec(
        name="sandbox",
        bridge="virbr-sandbox",
        subnet=ipaddress.IPv4Network("192.168.213.0/24"),
        subnet6=ipaddress.IPv6Network("2001:db8:213::/64"),
    )
    got = lifecycle.guest_address6(net, ipaddress.IPv4Address("192.168.213.77"))
    assert str(got) == "2001:db8:213::1:4d"
    # Outside the network's dynamic DHCPv6 range (base + 0x100 .. base + 0x1ff), inside its /64.
    assert net.subnet6 is not None and got in net.subnet6
    assert int(got) - int(net.subnet6.network_address) > 0x1FF


@pytest.mark.root
def test_sandbox_ssh_ignores_the_users_ssh_config(ctx: lifecycle.Context, tmp_path: Path) -> None:
    """The argv `sandbox ssh` runs, evaluated by OpenSSH itself (`ssh -G`) with a hostile
    ~/.ssh/config in place (a private mount namespace puts a home of ours over the real one:
    ssh finds its home in the password database, not in $HOME): none of it applies."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    half_built(ctx, "sshcfg")
    state = ctx.store.load("sshcfg")
    assert state is not None
    ctx.store.save(dataclasses.replace(state, phase=Phase.READY, ip="192.0.2.10"))
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host *\n  ForwardAgent yes\n  ForwardX11 yes\n  LocalCommand touch /tmp/pwned\n"
        "  PermitLocalCommand yes\n  ProxyCommand nc %h %p\n  RemoteForward 2222 localhost:22\n"
        "  ControlMaster auto\n  ControlPath /tmp/cm-%r\n  User someone\n"
    )
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)

    def effective(argv: list[str]) -> dict[str, str]:
        script = f"mount --bind {shlex.quote(str(home))} {shlex.quote(str(real_home))} && "
        script += shlex.join([argv[0], "-G", *argv[1:]])
        out = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    # The hostile config is really read by a plain ssh here...
    plain = effective(["ssh", "x@192.0.2.10"])
    assert plain["forwardagent"] == "yes" and "proxycommand" in plain
    # ...and not by the one `sandbox ssh` runs.
    options = effective(lifecycle.ssh_argv(ctx, "sshcfg", []))
    assert options["forwardagent"] == "no" and options["forwardx11"] == "no"
    assert options["permitlocalcommand"] == "no" and "localcommand" not in options
    assert "proxycommand" not in options and "remoteforward" not in options
    assert options["controlmaster"] == "false" and options.get("controlpath", "none") == "none"
    assert options["user"] == state.user and options["stricthostkeychecking"] == "true"
    assert options["identityagent"] == "none"


def test_within_bounds_a_hung_or_failing_step() -> None:
    import threading as th

    release = th.Event()
    result, why = lifecycle._within(0.2, lambda: release.wait(30))
    assert result is None and "did not finish within 0.2 s" in why
    release.set()

    def garbage() -> int:
        raise ValueError("not a number: '\x1b[2J'")

    assert lifecycle._within(5, garbage) == (None, "ValueError: not a number: '\x1b[2J'")
    assert lifecycle._within(5, lambda: 42) == (42, "")


def test_the_firewall_read_back_state_ignores_counters() -> None:
    """The read-back's state is of what differs from the policy: the same change is one state
    (one row) whatever its chain counters have counted since; another change is another."""
    golden = Path(__file__).parent / "golden"
    expected = {v: (golden / f"firewall-v{v}.rules").read_text() for v in (4, 6)}

    def printed(v4: str) -> str:
        return v4 + "----- sandbox: end of IPv4 rules -----\n" + expected[6]

    assert lifecycle.readback_state(expected, printed(expected[4])) == ("intact", {})
    flushed = expected[4].replace("-A OUTPUT -j SBX-BLOCK\n", "")
    state, diff = lifecycle.readback_state(expected, printed(flushed))
    assert state.startswith("changed ") and diff == {4: ["missing: -A OUTPUT -j SBX-BLOCK"]}
    counted = flushed.replace(":OUTPUT DROP [0:0]", ":OUTPUT DROP [17:1020]")
    assert lifecycle.readback_state(expected, printed(counted))[0] == state
    other = expected[4].replace("-A OUTPUT -j SBX-BLOCK\n", "-A OUTPUT -j ACCEPT\n")
    assert lifecycle.readback_state(expected, printed(other))[0] not in (state, "intact")

"""Lifecycle logic on libvirt's test driver: rollback of a failed `up`, idempotent `destroy`
from half-built states, orphans. test:///default keeps its state for the whole process (a
test:///FILE driver is new on every connection, so it cannot stand in for a daemon): the fixture
removes whatever a test added. The real boot is in test_e2e.py."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import pwd
import shlex
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from orchestrator import lifecycle, names, paths
from orchestrator.config import Settings
from orchestrator.egress import guestfw, hostfilter
from orchestrator.errors import (
    ConflictError,
    HypervisorError,
    ImageError,
    NotFoundError,
    SandboxError,
    TimeoutExpired,
    UsageError,
)
from orchestrator.lifecycle import build, resources, teardown, warm
from orchestrator.state import Phase, SandboxState
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import (
    Accel,
    NetworkSpec,
    VolumeSpec,
    render_domain,
    render_network,
    render_volume,
)
from orchestrator.vm.images import Image, ImageManifest
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
    files = {}
    for f in ("base.qcow2", "vmlinuz", "initrd.img"):
        (tmp_path / f).write_bytes(b"x")
        files[f] = hashlib.sha256(b"x").hexdigest()
    manifest = ImageManifest(
        name="default",
        recipe_hash="ab" * 32,
        created="2026-11-23T00:00:00+00:00",
        suite="bookworm",
        kernel_version="6.1.0-test-cloud-amd64",
        files=files,
    )
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
    monkeypatch.setattr(build, "load_image", lambda name, d: fake_image(tmp_path))
    filters: set[str] = set()
    monkeypatch.setattr(hostfilter, "define_filter", lambda conn, xml: filters.add(xml))

    def remove_filter(conn: object, name: str) -> bool:
        had = bool(filters)
        filters.clear()
        return had

    monkeypatch.setattr(hostfilter, "remove_filter", remove_filter)
    monkeypatch.setattr(hostfilter, "ensure_shared_filters", lambda conn: None)
    # Nor changes a running VM's devices (the filter and link `up` adds after the start).
    monkeypatch.setattr(hv, "update_device", lambda dom, xml, what: None)


def leftovers(ctx: lifecycle.Context, name: str) -> list[str]:
    found: list[str] = []
    with hv.connection(ctx.settings.connect) as conn:
        found += [d.name() for d in conn.listAllDomains(0) if d.name().startswith("sandbox-")]
        found += [n.name() for n in conn.listAllNetworks(0) if n.name().startswith("sandbox")]
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


def test_a_damaged_image_is_refused_before_it_becomes_a_base(
    ctx: lifecycle.Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def damaged(name: str, images_dir: Path) -> Image:
        image = fake_image(tmp_path)
        (tmp_path / "base.qcow2").write_bytes(b"bit rot")
        # A version of its own, so no earlier test's upload of the base volumes counts.
        manifest = dataclasses.replace(image.manifest, recipe_hash="cd" * 32)
        return Image.at(tmp_path, manifest)

    monkeypatch.setattr(build, "load_image", damaged)
    with pytest.raises(ImageError, match=r"base\.qcow2 has sha256"):
        lifecycle.up(ctx, "rot")
    assert leftovers(ctx, "sandbox-rot") == []
    with hv.connection(ctx.settings.connect) as conn:
        vols = conn.storagePoolLookupByName("sandbox").listVolumes()
    assert not any(v.startswith("base-default-cdcd") for v in vols)


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
        accel=Accel.TCG,
        mac="52:54:00:00:00:01",
    )
    ctx.store.save(state)
    with pytest.raises(ConflictError, match="exists"):
        lifecycle.up(ctx, "taken")


def half_built(ctx: lifecycle.Context, name: str) -> None:
    """What a SIGKILLed `up` leaves: a CREATING state, keys, volumes, a running domain, a net."""
    with hv.connection(ctx.settings.connect) as conn:
        pool = hv.ensure_pool(conn, ctx.pool_spec())
        for vol in names.SandboxVolumes.for_sandbox(name).all():
            pool.createXML(render_volume(VolumeSpec(vol, 1 << 20, "raw")), 0)
        hv.create_network(
            conn,
            lambda subnet, subnet6: NetworkSpec(
                names.network(name), names.bridge(name), subnet, subnet6
            ),
            ctx.settings.network.subnets,
            ctx.settings.network.subnets6,
        )
        spec = dataclasses.replace(
            domain_spec(Accel.TCG), name=names.domain(name), sandbox=name, uuid=str(uuid.uuid4())
        )
        conn.createXML(render_domain(spec), 0)
    state = SandboxState(
        name=name,
        phase=Phase.CREATING,
        created="x",
        uri=ctx.settings.connect,
        domain=names.domain(name),
        pool="sandbox",
        network=names.network(name),
        volumes=(),
        image="default",
        image_hash="",
        accel=Accel.TCG,
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
    assert "network sandbox-half" in report.removed
    assert leftovers(ctx, "sandbox-half") == []
    again = lifecycle.destroy(ctx, "half")
    assert not again.existed


def _destroying(ctx: lifecycle.Context, name: str) -> SandboxState:
    """What a detached `destroy` whose child was killed leaves: the state says destroying, the
    rest is all there."""
    half_built(ctx, name)
    built = ctx.store.load(name)
    assert built is not None
    state = dataclasses.replace(built, phase=Phase.DESTROYING)
    ctx.store.save(state)
    return state


def test_a_removal_cut_short_is_finished_by_the_next_destroy(ctx: lifecycle.Context) -> None:
    state = _destroying(ctx, "cut")
    dirs = [str(ctx.dirs.data), str(ctx.dirs.state), str(ctx.dirs.config)]
    # A child of an earlier destroy of another sandbox of that name leaves this one alone.
    assert teardown.finish_detached(["cut", "another time", *dirs]) == 0
    assert leftovers(ctx, "sandbox-cut")
    assert lifecycle.inspect(ctx, "cut").summary == "destroying"
    report = lifecycle.destroy(ctx, "cut")
    # No final collection: the first destroy made it.
    assert not any("collected" in r for r in report.removed)
    assert "domain sandbox-cut" in report.removed and leftovers(ctx, "sandbox-cut") == []
    # The child that was meant to do it finds nothing left to do.
    assert teardown.finish_detached(["cut", state.created, *dirs]) == 0


def test_the_detached_child_removes_what_its_destroy_left(ctx: lifecycle.Context) -> None:
    state = _destroying(ctx, "child")
    dirs = [str(ctx.dirs.data), str(ctx.dirs.state), str(ctx.dirs.config)]
    assert teardown.finish_detached(["child", state.created, *dirs]) == 0
    assert leftovers(ctx, "sandbox-child") == []


def test_up_of_a_name_whose_removal_was_cut_short_finishes_it_first(
    ctx: lifecycle.Context,
) -> None:
    _destroying(ctx, "again")
    # Not refused as an existing sandbox: the old one is removed, the new one built (here it
    # fails at the lease, the test driver has no DHCP, and is rolled back).
    with pytest.raises(SandboxError, match="DHCP") as failed:
        lifecycle.up(ctx, "again")
    assert not isinstance(failed.value, ConflictError)
    assert leftovers(ctx, "sandbox-again") == []


def test_destroy_removes_its_own_network_only(ctx: lifecycle.Context) -> None:
    half_built(ctx, "one")
    half_built(ctx, "two")
    first = lifecycle.destroy(ctx, "one")
    assert "network sandbox-one" in first.removed
    with hv.connection(ctx.settings.connect) as conn:
        assert hv.lookup_network(conn, "sandbox-two") is not None
    second = lifecycle.destroy(ctx, "two")
    assert "network sandbox-two" in second.removed


def test_orphan_domain_is_listed_and_destroyed(ctx: lifecycle.Context) -> None:
    half_built(ctx, "orphan")
    ctx.store.remove_secrets("orphan")  # state gone, the VM is still there
    statuses = {s.name: s.summary for s in lifecycle.list_status(ctx).sandboxes}
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
    from orchestrator.errors import GuestError
    from orchestrator.run import target as runs

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


def test_guest_addresses_are_fixed_in_the_sandboxs_own_network() -> None:
    net = NetworkSpec(
        name="sandbox-a",
        bridge="sbr0",
        subnet=ipaddress.IPv4Network("192.168.208.16/28"),
        subnet6=ipaddress.IPv6Network("2001:db8:213:1::/64"),
        guest_mac="52:54:00:AA:BB:CC",
    )
    assert (str(net.gateway), str(net.guest_ip)) == ("192.168.208.17", "192.168.208.18")
    assert str(net.guest_ip6) == "2001:db8:213:1::1:2"
    # Outside the network's dynamic DHCPv6 range (base + 0x100 .. base + 0x1ff), inside its /64.
    assert net.subnet6 is not None and net.guest_ip6 in net.subnet6
    assert net.guest_ip6 is not None
    assert int(net.guest_ip6) - int(net.subnet6.network_address) > 0x1FF
    root = ET.fromstring(render_network(net))
    hosts = [h.attrib for h in root.iter("host") if h.get("mac") or h.get("id")]
    assert hosts == [
        {"mac": "52:54:00:aa:bb:cc", "ip": "192.168.208.18"},
        {"id": "00:03:00:01:52:54:00:aa:bb:cc", "ip": "2001:db8:213:1::1:2"},
    ]


def test_network_pieces_pair_the_nth_28_with_the_nth_64_and_skip_taken_ones() -> None:
    v4 = ipaddress.IPv4Network("10.0.0.0/26")  # four /28s
    v6 = ipaddress.IPv6Network("2001:db8:5::/48")
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.IPv4Network("10.0.0.0/28"),  # piece 0
        ipaddress.IPv6Network("2001:db8:5:2::/64"),  # piece 2's /64
        ipaddress.IPv4Network("192.0.2.0/24"),  # elsewhere: no effect
    ]
    got = [(str(a), str(b)) for a, b in hv.network_pieces(v4, v6, taken)]
    assert got == [
        ("10.0.0.16/28", "2001:db8:5:1::/64"),
        ("10.0.0.48/28", "2001:db8:5:3::/64"),
    ]
    # IPv4 only, and a range as large as one piece.
    only = list(hv.network_pieces(ipaddress.IPv4Network("10.0.0.32/28"), None, taken))
    assert only == [(ipaddress.IPv4Network("10.0.0.32/28"), None)]
    # The smaller range bounds the count: a /63 holds two /64s.
    few = list(hv.network_pieces(v4, ipaddress.IPv6Network("2001:db8:5::/63"), []))
    assert len(few) == 2


def test_each_sandbox_gets_a_network_of_its_own(ctx: lifecycle.Context) -> None:
    """Two networks made one after the other take different pieces; destroying one leaves the
    other (the test:/// driver keeps networks like a real libvirtd)."""
    made = []
    with hv.connection(ctx.settings.connect) as conn:
        for name in ("one", "two"):
            _net, spec = hv.create_network(
                conn,
                lambda subnet, subnet6, name=name: NetworkSpec(  # type: ignore[misc]
                    names.network(name), names.bridge(name), subnet, subnet6
                ),
                ctx.settings.network.subnets,
                ctx.settings.network.subnets6,
            )
            made.append(spec)
        assert made[0].subnet != made[1].subnet and made[0].subnet6 != made[1].subnet6
        assert {n.name() for n in conn.listAllNetworks(0)} >= {"sandbox-one", "sandbox-two"}
        assert hv.remove_network_if_unused(conn, "sandbox-one")
        assert [n.name() for n in conn.listAllNetworks(0) if n.name().startswith("sandbox")] == [
            "sandbox-two"
        ]


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
    result, why = teardown._within(0.2, lambda: release.wait(30))
    assert result is None and "did not finish within 0.2 s" in why
    release.set()

    def garbage() -> int:
        raise ValueError("not a number: '\x1b[2J'")

    assert teardown._within(5, garbage) == (None, "ValueError: not a number: '\x1b[2J'")
    assert teardown._within(5, lambda: 42) == (42, "")


def test_the_firewall_read_back_state_ignores_counters() -> None:
    """The read-back's state is of what differs from the policy: the same change is one state
    (one row) whatever its chain counters have counted since; another change is another."""
    golden = Path(__file__).parent / "golden"
    expected = {v: (golden / f"firewall-v{v}.rules").read_text() for v in (4, 6)}

    def printed(v4: str) -> str:
        return v4 + "----- sandbox: end of IPv4 rules -----\n" + expected[6]

    assert guestfw.readback_state(expected, printed(expected[4])) == ("intact", {})
    flushed = expected[4].replace("-A OUTPUT -j SBX-BLOCK\n", "")
    state, diff = guestfw.readback_state(expected, printed(flushed))
    assert state.startswith("changed ") and diff == {4: ["missing: -A OUTPUT -j SBX-BLOCK"]}
    counted = flushed.replace(":OUTPUT DROP [0:0]", ":OUTPUT DROP [17:1020]")
    assert guestfw.readback_state(expected, printed(counted))[0] == state
    other = expected[4].replace("-A OUTPUT -j SBX-BLOCK\n", "-A OUTPUT -j ACCEPT\n")
    assert guestfw.readback_state(expected, printed(other))[0] not in (state, "intact")


# ---- warm VMs (lifecycle/warm.py) ----------------------------------------------------------


@pytest.fixture
def warm_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Image:
    image = fake_image(tmp_path)
    monkeypatch.setattr(warm, "load_image", lambda name, d: image)
    return image


def _warm_inventory(ctx: lifecycle.Context) -> tuple[set[str], set[str], set[str]]:
    """(warm domains in libvirt, their volumes, warm records on disk)."""
    with hv.connection(ctx.settings.connect) as conn:
        domains = set(hv.warm_domains(conn).values())
        volumes = {
            v
            for pool in conn.listAllStoragePools(0)
            for v in pool.listVolumes()
            if v.startswith(names.WARM_PREFIX)
        }
    return domains, volumes, {vm.domain for vm in warm.records(ctx)}


def test_warm_fill_keeps_the_count_replaces_unfit_vms_and_drain_removes_all(
    ctx: lifecycle.Context, warm_image: Image
) -> None:
    report = lifecycle.warm_fill(ctx, 2, wait=False)
    assert len(report.started) == 2 and report.kept == 0
    domains, volumes, recorded = _warm_inventory(ctx)
    assert domains == recorded == set(report.started)
    assert len(volumes) == 4  # disk and seed each (QEMU makes the console log, not this driver)
    with hv.connection(ctx.settings.connect) as conn:
        # Not sandboxes (yet): `list` and `destroy --all` do not see them.
        assert not set(hv.sandbox_domains(conn).values()) & domains
    # The keys to log in are the warm VM's own, kept where only the owner can read them.
    for vm in warm.records(ctx):
        key = ctx.dirs.warm / vm.id / paths.CLIENT_KEY
        assert key.stat().st_mode & 0o777 == 0o600
        assert vm.host_key.startswith("ssh-ed25519 ") and vm.client_key.startswith("ssh-ed25519 ")
    assert lifecycle.warm_fill(ctx, 2, wait=False).started == ()

    # Other settings (or a rebuilt image): the old ones no longer fit and are replaced.
    bigger = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, memory_mib=1024))
    report = lifecycle.warm_fill(bigger, 1, wait=False)
    assert set(report.removed) == domains and len(report.started) == 1
    assert _warm_inventory(ctx)[0] == set(report.started)

    assert lifecycle.warm_drain(ctx) == list(report.started)
    assert _warm_inventory(ctx) == (set(), set(), set())


def test_drain_removes_a_warm_domain_left_without_its_record(
    ctx: lifecycle.Context, warm_image: Image
) -> None:
    started = lifecycle.warm_fill(ctx, 1, wait=False).started
    shutil.rmtree(ctx.dirs.warm / warm.records(ctx)[0].id)  # a fill killed half-way
    assert lifecycle.warm_drain(ctx) == list(started)
    assert _warm_inventory(ctx) == (set(), set(), set())


def test_up_takes_a_fitting_warm_vm_once_and_rolls_it_back(
    ctx: lifecycle.Context, warm_image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle.warm_fill(ctx, 1, wait=False)
    vm = warm.records(ctx)[0]
    plugged: list[str] = []
    monkeypatch.setattr(hv, "attach_device", lambda dom, xml, what: plugged.append(xml))
    monkeypatch.setattr(hv, "update_device", lambda dom, xml, what: plugged.append(xml))
    seen: list[SandboxState | None] = []

    def lease(dom: libvirt.virDomain, mac: str, deadline: Deadline) -> str:
        seen.append(ctx.store.load("hw"))
        with hv.connection(ctx.settings.connect) as conn:
            seen_names.update(hv.sandbox_domains(conn))
        raise deadline.error("no DHCP on the test driver")

    seen_names: dict[str, str] = {}
    monkeypatch.setattr(hv, "wait_for_lease", lease)
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, "hw")
    state = seen[0]
    assert state is not None and (state.domain, state.warm_id) == (vm.domain, vm.id)
    assert state.volumes == names.SandboxVolumes.for_domain(vm.domain).all()
    assert state.host_key == vm.host_key
    # Its metadata names the sandbox now: `destroy --all` would find it.
    assert seen_names == {"hw": vm.domain}
    # Plugged in with its link down and no filter; filtered while the link is still down; then
    # up: never on the network unfiltered.
    first, filtered, iface = (ET.fromstring(xml) for xml in plugged)
    assert first.find("filterref") is None and first.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert filtered.find("filterref") is not None
    assert filtered.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert iface.find("link") is None
    # The sandbox's fresh MAC, network, filter and addresses.
    assert iface.find("mac").get("address") == state.mac  # type: ignore[union-attr]
    assert iface.find("source").get("network") == names.network("hw")  # type: ignore[union-attr]
    assert iface.find("filterref").get("filter") == names.nwfilter("hw")  # type: ignore[union-attr]
    assert iface.find("target").get("dev") == names.target_dev("hw")  # type: ignore[union-attr]
    # Rolled back: the warm VM is gone with the sandbox, never offered again.
    assert _warm_inventory(ctx) == (set(), set(), set())
    assert leftovers(ctx, "hw") == []


def test_up_boots_cold_when_no_warm_vm_fits(
    ctx: lifecycle.Context, warm_image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, memory_mib=256))
    started = set(lifecycle.warm_fill(small, 1, wait=False).started)
    plugged: list[str] = []
    monkeypatch.setattr(hv, "attach_device", lambda dom, xml, what: plugged.append(xml))
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, "hc")
    assert plugged == []
    assert _warm_inventory(ctx)[0] == started  # still there for an `up` it fits
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, "hc", warm_start=False)
    lifecycle.warm_drain(ctx)


def test_warm_records_are_checked() -> None:
    vm = warm.WarmVM(
        id="0123abcd",
        domain=names.warm_domain("0123abcd"),
        created="2026-12-05T00:00:00+00:00",
        uri="qemu:///system",
        pool="sandbox",
        image="default",
        image_hash="ab" * 32,
        accel=Accel.TCG,
        memory_mib=512,
        vcpus=2,
        host_key="ssh-ed25519 AAAA host",
        client_key="ssh-ed25519 AAAA client",
    )
    assert warm.WarmVM.from_json(vm.to_json()) == vm
    for bad in (
        dataclasses.replace(vm, id="../../etc"),
        dataclasses.replace(vm, domain="sandbox-victim"),
    ):
        with pytest.raises(ValueError):
            warm.WarmVM.from_json(bad.to_json())


def test_files_script_writes_exact_contents_with_two_programs(tmp_path: Path) -> None:
    """The guest's `sh` (dash) runs it: the contents byte for byte, mode 0644, whatever they
    hold; only mkdir and chmod are programs (the rest is the shell's own printf)."""
    odd = "a 'quoted' \"x\" $HOME `id` \\n %s %% \\\n\nzwei\n\u00e9\t end"
    files = {
        str(tmp_path / "etc/a.ini"): odd,
        str(tmp_path / "etc/b.ini"): "",
        str(tmp_path / "other dir/c.php"): "<?php echo 1;\n",
    }
    script = guestfw.files_script(files)
    subprocess.run(["sh", "-c", "umask 077\n" + "\n".join(script)], check=True)
    for path, text in files.items():
        assert Path(path).read_text() == text
        assert Path(path).stat().st_mode & 0o777 == 0o644
    programs = [line.split()[0] for line in script if not line.startswith("printf ")]
    assert programs == ["mkdir", "chmod"]
    assert guestfw.files_script({}) == []


def test_a_cold_vm_starts_unfiltered_with_its_link_down_then_is_filtered(
    ctx: lifecycle.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter (~1 s for libvirt to instantiate) is added while the kernel boots, not before
    QEMU starts; the link comes up only once it is in place."""
    started: list[str] = []
    updates: list[str] = []
    start = hv.start_domain

    def recording(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
        started.append(xml)
        return start(conn, xml)

    monkeypatch.setattr(hv, "start_domain", recording)
    monkeypatch.setattr(hv, "update_device", lambda dom, xml, what: updates.append(xml))
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, "cf", warm_start=False)
    iface = ET.fromstring(started[0]).find("devices/interface")
    assert iface is not None and iface.find("filterref") is None
    assert iface.find("link").get("state") == "down"  # type: ignore[union-attr]
    filtered, up = (ET.fromstring(xml) for xml in updates)
    assert filtered.find("filterref").get("filter") == names.nwfilter("cf")  # type: ignore[union-attr]
    assert filtered.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert up.find("filterref") is not None and up.find("link") is None
    assert leftovers(ctx, "cf") == []


def test_an_up_that_fails_right_after_taking_a_warm_vm_leaves_none_of_it(
    ctx: lifecycle.Context, warm_image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle.warm_fill(ctx, 1, wait=False)

    def no_pool(*args: object) -> object:
        raise HypervisorError("the pool is gone", "")

    monkeypatch.setattr(resources, "prepare_storage", no_pool)
    with pytest.raises(HypervisorError):
        lifecycle.up(ctx, "hf")
    assert _warm_inventory(ctx) == (set(), set(), set())
    assert leftovers(ctx, "hf") == []

"""Several libvirt hosts (issue 17, item 2): the choice of a host (pure), and up, list, status
and destroy across hosts on libvirt's test driver.

Each "host" is a test:///FILE driver with a <node> file of its own. Such a driver starts afresh
on every connection (it cannot stand in for a daemon by itself), so the `hosts` fixture keeps
one connection per file open for the test, as a daemon keeps its state; a URI whose file does
not exist is a host that cannot be reached, through the real libvirt error."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import libvirt
import pytest
from rich.console import Console

from orchestrator import cli, lifecycle, names, paths
from orchestrator.config import Settings
from orchestrator.errors import ConflictError, HypervisorError, TimeoutExpired, UsageError
from orchestrator.lifecycle import hosts as placement
from orchestrator.lifecycle import warm
from orchestrator.lifecycle.hosts import HostProbe
from orchestrator.state import SandboxState
from orchestrator.vm import hypervisor as hv
from orchestrator.waits import Deadline

from .test_lifecycle import ctx, half_built, test_driver_edges, warm_image

__all__ = ["ctx", "test_driver_edges", "warm_image"]

GIB = 1 << 30
NODE = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
       <active>2</active><mhz>2000</mhz><model>i686</model></cpu>
  <memory>{kib}</memory>
</node>
"""


# ---- the choice (pure) ---------------------------------------------------------------------


def test_the_host_with_the_most_free_memory_is_chosen() -> None:
    probes = [HostProbe("qemu:///a", free=2 * GIB), HostProbe("qemu+ssh://b/system", free=5 * GIB)]
    assert placement.choose(probes) == "qemu+ssh://b/system"
    assert placement.choose(probes[:1]) == "qemu:///a"


def test_unreachable_and_silent_hosts_rank_as_they_should() -> None:
    down = HostProbe("qemu+ssh://down/system", error="Connection refused")
    silent = HostProbe("test:///silent.xml", free=None)  # answers, cannot tell its memory
    little = HostProbe("qemu:///little", free=1)
    # A host that cannot be reached is never chosen, even listed first.
    assert placement.choose([down, silent]) == "test:///silent.xml"
    # One that cannot tell its free memory comes after every one that can.
    assert placement.choose([silent, little]) == "qemu:///little"
    # A tie goes to the host listed first.
    same = [HostProbe("qemu:///x", free=GIB), HostProbe("qemu:///y", free=GIB)]
    assert placement.choose(same) == "qemu:///x"
    assert placement.choose(same[::-1]) == "qemu:///y"


def test_a_host_with_a_warm_vm_that_fits_is_preferred_if_it_answers() -> None:
    probes = [HostProbe("qemu:///a", free=GIB), HostProbe("qemu:///b", free=8 * GIB)]
    assert placement.choose(probes, prefer={"qemu:///a"}) == "qemu:///a"
    down = [HostProbe("qemu:///a", error="gone"), probes[1]]
    assert placement.choose(down, prefer={"qemu:///a"}) == "qemu:///b"


def test_no_reachable_host_names_each_with_its_error() -> None:
    probes = [
        HostProbe("qemu+ssh://a.example/system", error="Connection refused"),
        HostProbe("qemu+ssh://b.example/system", error="No route to host"),
    ]
    with pytest.raises(HypervisorError) as failed:
        placement.choose(probes)
    message = failed.value.message
    assert "qemu+ssh://a.example/system: Connection refused" in message
    assert "qemu+ssh://b.example/system: No route to host" in message
    assert failed.value.hint and "--connect" in failed.value.hint


# ---- on the test driver --------------------------------------------------------------------


@dataclasses.dataclass
class Hosts:
    a: str
    b: str
    down: str
    daemons: dict[str, libvirt.virConnect]

    def domains(self, uri: str) -> set[str]:
        return {str(d.name()) for d in self.daemons[uri].listAllDomains(0)}


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    files = {}
    for host, gib in (("a", 4), ("b", 8)):
        files[host] = tmp_path / f"host-{host}.xml"
        files[host].write_text(NODE.format(kib=gib << 20))
    daemons: dict[str, libvirt.virConnect] = {}
    real = hv.connection

    @contextlib.contextmanager
    def connection(uri: str) -> Iterator[libvirt.virConnect]:
        if uri == "test:///default" or not uri.startswith("test:///"):
            with real(uri) as conn:
                yield conn
            return
        if uri not in daemons:
            daemons[uri] = hv.open_connection(uri)  # a missing file: libvirt's own error
        yield daemons[uri]

    monkeypatch.setattr(hv, "connection", connection)
    yield Hosts(
        a=f"test://{files['a']}",
        b=f"test://{files['b']}",
        down=f"test://{tmp_path / 'no-such-host.xml'}",
        daemons=daemons,
    )
    for conn in daemons.values():
        conn.close()


def on(ctx: lifecycle.Context, *uris: str) -> lifecycle.Context:
    """The context with these hosts configured (the first one is `connect`)."""
    settings = dataclasses.replace(ctx.settings, connect=uris[0], hosts=uris)
    return dataclasses.replace(ctx, settings=settings)


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, what: str) -> AbstractContextManager[None]:
        self.lines.append(what)
        return contextlib.nullcontext()

    def info(self, message: str) -> None:
        self.lines.append(message)


def placed_on(ctx: lifecycle.Context, name: str, monkeypatch: pytest.MonkeyPatch) -> SandboxState:
    """`up` NAME as far as the test driver goes (its lease: no DHCP here, then rolled back): its
    state as it was when the VM had started."""
    seen: list[SandboxState | None] = []

    def lease(dom: libvirt.virDomain, mac: str, deadline: Deadline) -> str:
        state = ctx.store.load(name)
        seen.append(state)
        # The domain was made through the connection of the host the state names.
        assert state is not None and str(dom.connect().getURI()) == state.uri
        raise deadline.error("no DHCP on the test driver")

    monkeypatch.setattr(hv, "wait_for_lease", lease)
    with pytest.raises(TimeoutExpired):
        lifecycle.up(ctx, name)
    assert seen and seen[0] is not None
    return seen[0]


def test_free_memory_as_the_driver_reports_it(hosts: Hosts) -> None:
    with hv.connection("test:///default") as conn:
        assert hv.free_memory(conn) == conn.getFreeMemory() > 0
    # A test:///FILE host has no NUMA cells to sum: libvirt answers 0, its error value.
    with hv.connection(hosts.a) as conn:
        assert hv.free_memory(conn) is None
    probe = placement.probe([hosts.a, "test:///default", hosts.down])
    assert [p.uri for p in probe] == [hosts.a, "test:///default", hosts.down]
    assert probe[0].reachable and probe[0].free is None
    assert probe[1].free and probe[1].free > 0
    assert probe[2].error and "no-such-host.xml" in probe[2].error


def test_up_goes_to_the_host_that_reports_free_memory_and_skips_one_down(
    ctx: lifecycle.Context, hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = Recorder()
    several = dataclasses.replace(on(ctx, hosts.down, hosts.a, "test:///default"), reporter=report)
    state = placed_on(several, "p1", monkeypatch)
    assert state.uri == "test:///default"
    warnings = [line for line in report.lines if line.startswith("warning:")]
    assert len(warnings) == 1 and hosts.down in warnings[0]
    assert any(line.startswith("sandbox p1 goes on test:///default") for line in report.lines)
    # Rolled back on that host; nothing was ever made on the other.
    assert not {d for d in hosts.domains(hosts.a) if d.startswith(names.PREFIX)}


def test_up_goes_to_the_host_with_more_free_memory(
    ctx: lifecycle.Context, hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {hosts.a: 6 * GIB, hosts.b: 2 * GIB}
    monkeypatch.setattr(hv, "free_memory", lambda conn: free[str(conn.getURI())])
    several = on(ctx, hosts.b, hosts.a, hosts.down)
    assert placed_on(several, "p2", monkeypatch).uri == hosts.a
    free[hosts.b] = 7 * GIB
    assert placed_on(several, "p2", monkeypatch).uri == hosts.b
    # --connect (or SANDBOX_CONNECT): exactly that host, not the config's choice.
    one = dataclasses.replace(several, settings=several.settings.on_host(hosts.a))
    assert placed_on(one, "p2", monkeypatch).uri == hosts.a


def test_up_with_no_host_reachable_names_each_and_leaves_nothing(
    ctx: lifecycle.Context, hosts: Hosts, tmp_path: Path
) -> None:
    other = f"test://{tmp_path / 'also-missing.xml'}"
    with pytest.raises(HypervisorError) as failed:
        lifecycle.up(on(ctx, hosts.down, other), "p3")
    assert hosts.down in failed.value.message and other in failed.value.message
    assert failed.value.hint
    assert ctx.store.load("p3") is None


def test_up_refuses_a_name_whose_vm_is_on_another_host(
    ctx: lifecycle.Context, hosts: Hosts
) -> None:
    half_built(on(ctx, hosts.b), "dup")
    ctx.store.remove_secrets("dup")  # its state lost: only the VM on B says it exists
    with pytest.raises(ConflictError, match=f"without sandbox state on {hosts.b}"):
        lifecycle.up(on(ctx, hosts.a, hosts.b), "dup")


def test_list_shows_every_hosts_sandboxes_and_the_host_that_is_down(
    ctx: lifecycle.Context, hosts: Hosts
) -> None:
    half_built(on(ctx, hosts.a), "one")
    half_built(on(ctx, hosts.b), "two")
    half_built(on(ctx, hosts.b), "three")
    ctx.store.remove_secrets("three")  # an orphan on B
    half_built(on(ctx, hosts.a), "four")
    four = ctx.store.load("four")
    assert four is not None
    ctx.store.save(dataclasses.replace(four, uri=hosts.down))  # on a host that is down now
    listing = lifecycle.list_status(on(ctx, hosts.a, hosts.b, hosts.down))
    found = {st.name: (st.host, st.summary) for st in listing.sandboxes}
    assert found == {
        "one": (hosts.a, "creating"),
        "two": (hosts.b, "creating"),
        "three": (hosts.b, "orphan"),
        "four": (hosts.down, "broken"),
    }
    four_status = next(st for st in listing.sandboxes if st.name == "four")
    assert four_status.domain == "unknown"
    assert any("did not answer" in p for p in four_status.problems)
    assert [d.uri for d in listing.down] == [hosts.down]
    assert "no-such-host.xml" in listing.down[0].error
    # `status` of the orphan finds it on its host.
    st = lifecycle.inspect(on(ctx, hosts.a, hosts.b, hosts.down), "three")
    assert (st.host, st.summary, st.domain) == (hosts.b, "orphan", "running")
    assert any(hosts.down in p for p in st.problems)  # the host it could not search


def test_list_with_every_host_down_is_an_error_naming_each(
    ctx: lifecycle.Context, hosts: Hosts, tmp_path: Path
) -> None:
    other = f"test://{tmp_path / 'also-missing.xml'}"
    with pytest.raises(HypervisorError) as failed:
        lifecycle.list_status(on(ctx, hosts.down, other))
    assert hosts.down in failed.value.message and other in failed.value.message
    # One host answering with nothing on it: an empty list and the host that is down.
    listing = lifecycle.list_status(on(ctx, hosts.a, hosts.down))
    assert listing.sandboxes == () and [d.uri for d in listing.down] == [hosts.down]


def test_destroy_finds_a_sandbox_and_an_orphan_wherever_they_are(
    ctx: lifecycle.Context, hosts: Hosts
) -> None:
    half_built(on(ctx, hosts.b), "far")
    half_built(on(ctx, hosts.b), "lost")
    ctx.store.remove_secrets("lost")
    half_built(on(ctx, hosts.a), "near")
    several = on(ctx, hosts.a, hosts.b, hosts.down)
    # With state: on its state's host, whatever `connect` says.
    report = lifecycle.destroy(several, "far")
    assert "domain sandbox-far" in report.removed
    assert "sandbox-far" not in hosts.domains(hosts.b)
    # Without state: searched for on every host; the one that is down is a warning.
    report = lifecycle.destroy(several, "lost")
    assert f"domain sandbox-lost (on {hosts.b})" in report.removed
    assert "sandbox-lost" not in hosts.domains(hosts.b)
    assert len(report.warnings) == 1 and hosts.down in report.warnings[0]
    assert "sandbox-near" in hosts.domains(hosts.a)  # the other host's sandbox stays
    assert lifecycle.known_names(several) == ["near"]
    reports = lifecycle.destroy_all(several)
    assert [r.name for r in reports if r.existed] == ["near"]
    assert not {d for d in hosts.domains(hosts.a) if d.startswith(names.PREFIX)}


def test_up_takes_a_warm_vm_on_the_host_that_holds_it(
    ctx: lifecycle.Context,
    hosts: Hosts,
    warm_image: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lifecycle.warm_fill(on(ctx, hosts.a), 1, wait=False)
    vm = warm.records(ctx)[0]
    assert vm.uri == hosts.a
    free = {hosts.a: GIB, hosts.b: 8 * GIB}  # B has more free memory, A has the warm VM
    monkeypatch.setattr(hv, "free_memory", lambda conn: free[str(conn.getURI())])
    monkeypatch.setattr(hv, "attach_device", lambda dom, xml, what: None)
    state = placed_on(on(ctx, hosts.b, hosts.a), "hw", monkeypatch)
    assert (state.uri, state.warm_id) == (hosts.a, vm.id)
    # Cold (--cold): most free memory decides.
    cold = on(ctx, hosts.b, hosts.a)
    seen: list[SandboxState | None] = []

    def lease(dom: libvirt.virDomain, mac: str, deadline: Deadline) -> str:
        seen.append(ctx.store.load("hc"))
        raise deadline.error("no DHCP on the test driver")

    monkeypatch.setattr(hv, "wait_for_lease", lease)
    with pytest.raises(TimeoutExpired):
        lifecycle.up(cold, "hc", warm_start=False)
    assert seen[0] is not None and seen[0].uri == hosts.b


def test_cli_list_has_a_host_column_and_a_row_for_a_host_down(
    hosts: Hosts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var, sub in (("XDG_STATE_HOME", "st"), ("XDG_CONFIG_HOME", "cf"), ("XDG_DATA_HOME", "d")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("SANDBOX_CONNECT", raising=False)
    monkeypatch.delenv("SANDBOX_CONFIG", raising=False)
    dirs = paths.Dirs.from_env()
    dirs.config.mkdir(parents=True)
    dirs.config_file.write_text(json.dumps({"hosts": [hosts.a, hosts.down]}))  # JSON is YAML
    ctx = lifecycle.Context(settings=Settings(connect=hosts.a, hosts=(hosts.a,)), dirs=dirs)
    half_built(on(ctx, hosts.a), "cli")
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"], r["host"]) for r in rows] == [
        ("cli", "creating", hosts.a),
        (None, "host down", hosts.down),
    ]
    monkeypatch.setattr(cli, "out", Console(width=400, highlight=False))  # no URI folded
    assert cli.main(["list"]) == 0
    table = capsys.readouterr().out
    assert "host" in table.splitlines()[1] and "host down" in table and hosts.down in table
    # --connect: that one host only; the one down is not asked.
    assert cli.main(["--connect", hosts.a, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["host"]) for r in rows] == [("cli", hosts.a)]


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("qemu:///system", True),
        ("test:///default", True),
        ("qemu+ssh://root@host.example/system", True),
        ("qemu+tcp://host.example/system", False),
        ("qemu+tls://host.example/system", False),
    ],
)
def test_pcap_goes_wherever_a_login_runs_tcpdump(uri: str, allowed: bool) -> None:
    if allowed:
        placement.require_capture(uri)
        return
    with pytest.raises(UsageError) as caught:
        placement.require_capture(uri)
    assert "qemu+ssh://root@HOST/system" in (caught.value.hint or "")


def test_sinkhole_mode_and_wildcards_are_placed_where_they_can_run(tmp_path: Path) -> None:
    from orchestrator.egress.policy import build_policy
    from orchestrator.lifecycle import build
    from orchestrator.lifecycle.context import is_local

    tcp, ssh = "qemu+tcp://a.example/system", "qemu+ssh://root@b.example/system"
    dirs = paths.Dirs(data=tmp_path / "d", state=tmp_path / "s", config=tmp_path / "c")
    context = lifecycle.Context(settings=Settings(connect=tcp, hosts=(tcp, ssh)), dirs=dirs)
    # The sinkhole runs on an SSH-reached host, not on one without a login: the one host left is
    # taken without asking any host anything (neither exists).
    sinkhole = build._fits(build_policy([], sinkhole=True))
    assert sinkhole is placement.runs_host_services
    assert placement.place(context, "x", fits=sinkhole) == ssh
    assert build._fits(build_policy([])) is None
    local = dataclasses.replace(
        context, settings=Settings(connect=ssh, hosts=(ssh, "qemu:///system"))
    )
    assert placement.place(local, "x", fits=is_local) == "qemu:///system"

"""Config parsing, state files and locks, and the CLI's error boundary."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator import cli, paths
from orchestrator.config import DEFAULT_URI, load_settings, parse_settings
from orchestrator.egress.policy import build_policy
from orchestrator.errors import ConflictError, TimeoutExpired, UsageError
from orchestrator.files import atomic_write, file_lock
from orchestrator.state import (
    Phase,
    SandboxState,
    StateStore,
    validate_name,
)
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import Accel


def test_defaults_and_full_config(tmp_path: Path) -> None:
    assert load_settings(None, tmp_path / "absent.yaml", env={}).connect == DEFAULT_URI
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "connect: qemu+ssh://root@hv/system\naccel: tcg\nmemory: 384\nvcpus: 1\n"
        "network: {subnets: 10.99.0.0/24, subnets6: none}\npool: {path: /srv/sbx}\n"
        "image: {name: web, packages: [php-mysql]}\nallow: [203.0.113.7]\ncollect_every: 2.5\n"
    )
    assert load_settings(None, tmp_path / "absent.yaml", env={}).collect_every == 10.0
    s = load_settings(cfg, tmp_path / "unused", env={})
    assert s.connect == "qemu+ssh://root@hv/system"
    assert s.accel is Accel.TCG and s.memory_mib == 384 and s.vcpus == 1
    assert s.network.subnets == ipaddress.IPv4Network("10.99.0.0/24")
    assert s.network.subnets6 is None
    assert s.pool.path == "/srv/sbx"
    assert s.image.name == "web" and s.image.packages == ("php-mysql",)
    assert s.allow == ("203.0.113.7",)
    assert s.collect_every == 2.5


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("connect: qemu:///session\n")
    s = load_settings(None, cfg, env={"SANDBOX_CONNECT": "test:///default"})
    assert s.connect == "test:///default"
    s = load_settings(None, tmp_path / "x", env={"SANDBOX_CONFIG": str(cfg)})
    assert s.connect == "qemu:///session"


def test_hosts_and_connect(tmp_path: Path) -> None:
    one = parse_settings({"connect": "qemu:///session"}, "c.yaml")
    assert one.hosts == () and one.all_hosts == ("qemu:///session",)
    remote = "qemu+ssh://root@hv.example/system"
    several = parse_settings({"hosts": [" qemu:///system", remote]}, "c.yaml")
    # connect absent: the first host (the one `warm` works on).
    assert several.connect == "qemu:///system"
    assert several.all_hosts == ("qemu:///system", remote)
    both = parse_settings({"connect": remote, "hosts": ["qemu:///system", remote]}, "c.yaml")
    assert both.connect == remote and both.all_hosts == ("qemu:///system", remote)
    # Given explicitly (environment or --connect), one URI is that one host alone.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"hosts: [qemu:///system, '{remote}']\n")
    s = load_settings(cfg, tmp_path / "d", env={"SANDBOX_CONNECT": "test:///default"})
    assert (s.connect, s.all_hosts) == ("test:///default", ("test:///default",))
    assert several.on_host(remote).all_hosts == (remote,)


def test_cli_connect_means_that_one_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hosts: [qemu:///system, 'qemu+ssh://root@hv.example/system']\n")
    monkeypatch.delenv("SANDBOX_CONNECT", raising=False)
    monkeypatch.setattr(cli, "OPTIONS", cli.Options(config=cfg))
    assert len(cli._context().settings.all_hosts) == 2
    monkeypatch.setattr(cli, "OPTIONS", cli.Options(config=cfg, connect="test:///default"))
    assert cli._context().settings.all_hosts == ("test:///default",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"conect": "x"}, "unknown setting conect"),
        ({"accel": "hvf"}, "unknown acceleration"),
        ({"memory": "lots"}, "memory must be a int"),
        ({"memory": 64}, "memory \\(MiB\\) must be between 128 and"),
        ({"memory": 1 << 30}, "memory \\(MiB\\) must be between 128 and"),
        ({"memory": True}, "memory must be a int"),
        ({"vcpus": 0}, "vcpus must be between 1 and 64"),
        ({"vcpus": -2}, "vcpus must be between 1 and 64"),
        ({"boot_timeout": -5}, "boot_timeout \\(s\\) must be between 1"),
        ({"boot_timeout": 0}, "boot_timeout \\(s\\) must be between 1"),
        ({"limits": {"output_file_mib": 0}}, "limits.output_file_mib must be between 1"),
        ({"limits": {"bytes": 1}}, "unknown setting limits.bytes"),
        ({"limits": {"run_outputs_mib": "1G"}}, "limits.run_outputs_mib must be a int"),
        ({"network": {"subnets": "10.0.0.0/33"}}, "network.subnets"),
        ({"network": {"subnets": "10.0.0.0/29"}}, "smaller than one sandbox's /28"),
        ({"network": {"subnets6": "2001:db8::/80"}}, "smaller than one sandbox's /64"),
        ({"network": {"subnets6": "junk"}}, "network.subnets6"),
        ({"network": {"subnet": "10.0.0.0/24"}}, "every sandbox now has a network of its own"),
        ({"network": {"bridge": "virbr-sandbox"}}, "network.bridge is no longer a setting"),
        ({"network": {"mask": 1}}, "unknown setting network.mask"),
        ({"image": {"packages": "php-mysql"}}, "image.packages must be a list"),
        ({"collect_every": -1}, "collect_every must be 0"),
        ({"collect_every": "often"}, "collect_every must be a int or float"),
        ({"connect": "hv.example"}, "connect 'hv.example' is not a libvirt URI"),
        ({"hosts": "qemu:///system"}, "hosts must be a list"),
        ({"hosts": []}, "hosts is empty"),
        ({"hosts": ["qemu:///system", 7]}, "hosts\\[1\\] must be a str"),
        ({"hosts": ["qemu:///system", "hv b"]}, "hosts\\[1\\] 'hv b' is not a libvirt URI"),
        ({"hosts": ["qemu:///system", "qemu:///system"]}, "lists qemu:///system more than once"),
        (
            {"connect": "qemu:///session", "hosts": ["qemu:///system"]},
            "connect qemu:///session is not one of hosts",
        ),
    ],
)
def test_bad_config_is_a_usage_error(data: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_settings(data, "c.yaml")


def test_explicit_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", tmp_path / "d", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("connect: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_settings(bad, tmp_path / "d", env={})


@pytest.mark.parametrize("name", ["default", "a", "web-1", "x" * 31])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


def test_limits_from_the_config_file() -> None:
    s = parse_settings({"limits": {"output_file_mib": 4, "decompressed_mib": 8}}, "c.yaml")
    assert s.limits.output_file == 4 << 20 and s.limits.decompressed == 8 << 20
    assert s.limits.run_outputs == 512 << 20  # the default stays


@pytest.mark.parametrize(
    "name", ["", "Web", "1st", "a_b", "a/b", "x" * 32, "../etc", "default\n", "a\n"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_name(name)


def sample_state(name: str = "s1") -> SandboxState:
    return SandboxState(
        name=name,
        phase=Phase.READY,
        created="2026-11-23T10:00:00+00:00",
        uri="qemu:///system",
        domain=f"sandbox-{name}",
        pool="sandbox",
        network="sandbox",
        volumes=("a.qcow2", "b.iso"),
        image="default",
        image_hash="00" * 32,
        accel=Accel.TCG,
        mac="52:54:00:aa:bb:cc",
        ip="192.168.213.5",
        policy=build_policy(["203.0.113.7"]).to_dict(),
    )


def test_state_round_trip_and_permissions(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(sample_state())
    assert store.load("s1") == sample_state()
    assert store.names() == ["s1"]
    stored = json.loads(store.file("s1", paths.STATE_FILE).read_text())
    assert (stored["accel"], stored["xdebug"], stored["phase"]) == ("tcg", "trace", "ready")
    mode = os.stat(store.file("s1", paths.STATE_FILE)).st_mode & 0o777
    assert mode == 0o600
    store.write_secret("s1", paths.CLIENT_KEY, "k")
    store.remove_secrets("s1")
    assert store.load("s1") is None
    assert not store.file("s1", paths.CLIENT_KEY).exists()


def test_damaged_state_says_what_to_do(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.dir("s1").mkdir(parents=True)
    for damage in ("{not json", sample_state().to_json().replace('"tcg"', '"hvf"')):
        store.file("s1", paths.STATE_FILE).write_text(damage)
        with pytest.raises(Exception, match="damaged") as info:
            store.load("s1")
        assert "sandbox destroy --name s1" in (info.value.hint or "")  # type: ignore[attr-defined]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, "one")
    atomic_write(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _hold_lock(root: str, ready: multiprocessing.synchronize.Event) -> None:
    with StateStore(Path(root)).lock("s1"):
        ready.set()
        time.sleep(60)


def test_lock_is_released_when_holder_is_killed(tmp_path: Path) -> None:
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(10)
    store = StateStore(tmp_path)
    with pytest.raises(ConflictError, match=f"pid {proc.pid}"), store.lock("s1"):
        pass
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with store.lock("s1"):
        pass


def test_cli_error_boundary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert cli.main(["up", "--name", "Bad"]) == 2
    captured = capsys.readouterr()
    assert "error: invalid sandbox name 'Bad'" in captured.err
    assert "hint:" in captured.err
    assert "Traceback" not in captured.err
    # An unreachable libvirt: a clear error with a hint, exit code 5.
    code = cli.main(["--connect", "qemu+unix:///system?socket=/nonexistent", "status"])
    captured = capsys.readouterr()
    assert code == 5, captured.err
    assert "cannot connect to libvirt" in captured.err and "hint:" in captured.err
    # A sandbox that does not exist.
    code = cli.main(["--connect", "test:///default", "exec", "--name", "ghost", "--", "true"])
    assert code == 3
    assert "does not exist" in capsys.readouterr().err
    # A missing image, with a hint to build it.
    code = cli.main(["--connect", "test:///default", "up", "--image", "nosuch"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "sandbox image build" in captured.err
    # Conflicting options.
    assert cli.main(["destroy", "--name", "a", "--all"]) == 2
    # Unknown command: typer's own usage error.
    assert cli.main(["frobnicate"]) == 2


def test_cli_debug_shows_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert cli.main(["--debug", "up", "--name", "Bad"]) == 2
    assert "Traceback" in capsys.readouterr().err
    cli.OPTIONS.debug = False


def test_lock_wait_is_bounded_and_names_the_holder(tmp_path: Path) -> None:
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(10)
        lock = tmp_path / "s1" / paths.LOCK_FILE
        started = time.monotonic()
        with (
            pytest.raises(TimeoutExpired, match=f"held by pid {proc.pid}"),
            file_lock(lock, "the test lock", timeout=0.5),
        ):
            pass
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    with file_lock(tmp_path / "s1" / paths.LOCK_FILE, "the test lock", timeout=5):
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="provokes EPERM in sysfs, which needs root")
def test_cli_permission_problem_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even root may not create directories in sysfs: a state dir there fails like a foreign one.
    monkeypatch.setenv("XDG_STATE_HOME", "/sys/kernel/sandbox-test-state")
    assert cli.main(["--connect", "test:///default", "destroy", "--name", "x"]) == 9
    captured = capsys.readouterr()
    assert "permission denied" in captured.err and "hint:" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # What libvirt says to a user outside the libvirt group (qemu:///system, Debian's socket).
        (
            "Failed to connect socket to '/var/run/libvirt/libvirt-sock': Permission denied",
            "'libvirt' group",
        ),
        (
            "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory",
            "start libvirtd",
        ),
        (
            "Failed to connect socket to '/run/libvirt/libvirt-sock': Connection refused",
            "start libvirtd",
        ),
        ("unsupported configuration: unknown driver", "check the URI"),
    ],
)
def test_connection_errors_get_hints(error: str, expected: str) -> None:
    assert expected in hv.connection_hint(error, 0)

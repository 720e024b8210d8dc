"""This machine's helper processes of one sandbox, found by their command lines
(orchestrator/hostprocs.py): the matching (pure), and a stateless `destroy` on libvirt's test
driver that stops the real helpers of its sandbox and leaves another sandbox's alone."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePath

import pytest

from orchestrator import hostprocs, lifecycle, paths
from orchestrator.capture import hostflows, pcap
from orchestrator.config import Settings
from orchestrator.egress import hostfilter, sinkhole, wildcards
from orchestrator.egress.policy import Proto, Wildcard
from orchestrator.hostprocs import Kind
from orchestrator.lifecycle.context import logs_dir

LOGS = PurePath("/var/lib/sandbox/a/logs")
PY = "/opt/sandbox/.venv/bin/python"


def _tcpdump(args: list[str]) -> list[str]:
    return ["/usr/bin/tcpdump", *args]


def _python(module: str, *args: str) -> list[str]:
    return [PY, "-m", module, *args]


def test_the_modules_are_the_helpers_own() -> None:
    assert hostprocs.MODULES == {
        Kind.SINKHOLE: sinkhole._MODULE,
        Kind.WILDCARDS: wildcards._MODULE,
    }


@pytest.mark.parametrize(
    ("comm", "argv", "kind"),
    [
        # What `up` starts for sandbox `a`, as its builders write the arguments.
        ("tcpdump", _tcpdump(pcap.pcap_args("vnet0", LOGS / paths.PCAP_FILE)), Kind.TCPDUMP),
        (
            "tcpdump",
            _tcpdump(
                hostflows.tcpdump_args("vnet0", LOGS / hostflows.FILE_PREFIX, file_mib=8, files=4)
            ),
            Kind.TCPDUMP,
        ),
        (
            "python3",
            _python(sinkhole._MODULE, "--listen-fd", "3", "--log-fd", "4", "--logs", str(LOGS)),
            Kind.SINKHOLE,
        ),
        (
            "python",
            _python(wildcards._MODULE, "--fd", "3", "--config", f"{LOGS}/x", "--logs", f"{LOGS}/"),
            Kind.WILDCARDS,
        ),
        # Sandbox `ab`'s (a name that `a` prefixes), and files below `a`'s logs.
        ("tcpdump", _tcpdump(["-i", "v", "-w", "/var/lib/sandbox/ab/logs/sandbox.pcap"]), None),
        ("tcpdump", _tcpdump(["-i", "v", "-w", f"{LOGS}x/sandbox.pcap"]), None),
        ("tcpdump", _tcpdump(["-i", "v", "-w", f"{LOGS}/sub/sandbox.pcap"]), None),
        ("tcpdump", _tcpdump(["-i", "v", "-w", "sandbox.pcap"]), None),
        ("python3", _python(sinkhole._MODULE, "--logs", "/var/lib/sandbox/ab/logs"), None),
        ("python3", _python(wildcards._MODULE, "--logs", "/var/lib/sandbox/a"), None),
        # The last `--logs` or `-w` is the one the program uses.
        ("python3", _python(wildcards._MODULE, "--logs", str(LOGS), "--logs", "/tmp"), None),
        ("tcpdump", _tcpdump(["-w", f"{LOGS}/p", "-w", "/tmp/p"]), None),
        # Not the program its command line claims, or not run as that module.
        ("sleep", _tcpdump(["-w", f"{LOGS}/sandbox.pcap"]), None),
        ("tcpdump", ["/usr/bin/tshark", "-w", f"{LOGS}/sandbox.pcap"], None),
        ("bash", _python(sinkhole._MODULE, "--logs", str(LOGS)), None),
        ("python3", [PY, "-c", "pass", "-m", sinkhole._MODULE, "--logs", str(LOGS)], None),
        ("vim", ["vim", f"{LOGS}/sinkhole.log"], None),
        # A sinkhole from before `--logs`: only by its recorded pid (unnamed_sinkhole).
        ("python3", _python(sinkhole._MODULE, "--listen-fd", "3", "--log-fd", "4"), None),
        ("python3", [], None),
    ],
)
def test_a_process_is_the_sandboxs_helper_only_by_its_program_and_logs_dir(
    comm: str, argv: list[str], kind: Kind | None
) -> None:
    assert hostprocs.kind_of(comm, argv, LOGS) is kind


def test_an_unnamed_sinkhole_is_one_without_logs() -> None:
    old = _python(sinkhole._MODULE, "--listen-fd", "3", "--log-fd", "4")
    assert hostprocs.unnamed_sinkhole("python3", old)
    assert not hostprocs.unnamed_sinkhole("python3", [*old, "--logs", str(LOGS)])
    assert not hostprocs.unnamed_sinkhole("python3", _python(wildcards._MODULE, "--fd", "3"))
    assert not hostprocs.unnamed_sinkhole("bash", old)


# ---- the real helpers, stopped by a stateless `destroy` -----------------------------------------


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _resolver(logs: Path) -> int:
    # Its guest is unreachable: it would log in only at a query or SIGUSR1, neither sent here.
    config = wildcards.Config(
        bridge="sbx-none",
        wildcards=(Wildcard("cdn.example.org", Proto.TCP, 443),),
        upstream=("127.0.0.1",),
        guest=wildcards.Guest(
            host="192.0.2.1", port=22, user="nobody", client_key=str(logs / "k"), host_key=""
        ),
    )
    return wildcards.start(wildcards.bind(), config, logs)


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids to stop whatever the test did."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running, and still our child
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


@pytest.mark.root
def test_a_stateless_destroy_stops_its_sandboxs_helpers_only(
    tmp_path: Path, started: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        pytest.skip("needs root and tcpdump (a capture on lo)")
    # The test driver has no nwfilter (test_lifecycle.test_driver_edges); this sandbox has none.
    monkeypatch.setattr(hostfilter, "remove_filter", lambda conn, name: False)
    settings = dataclasses.replace(Settings(), connect="test:///default")
    dirs = paths.Dirs(data=tmp_path / "data", state=tmp_path / "state", config=tmp_path / "cfg")
    ctx = lifecycle.Context(settings=settings, dirs=dirs)
    ours, theirs = logs_dir(ctx, "a"), logs_dir(ctx, "ab")
    loopback = ipaddress.IPv4Address("127.0.0.1")
    mine = {
        sinkhole.start(loopback, ours).pid: Kind.SINKHOLE,
        _resolver(ours): Kind.WILDCARDS,
        pcap.start_pcap("lo", ours / paths.PCAP_FILE): Kind.TCPDUMP,
        hostflows.start("lo", ours): Kind.TCPDUMP,
    }
    started += mine
    others = [
        sinkhole.start(loopback, theirs).pid,
        pcap.start_pcap("lo", theirs / paths.PCAP_FILE),
        # Not a tcpdump, whatever its argv[0] says.
        subprocess.Popen(
            ["tcpdump", "-c", "import time; time.sleep(60)", "-w", str(ours / "x.pcap")],
            executable=sys.executable,
        ).pid,
    ]
    started += others
    found = hostprocs.find(ours)
    assert {h.pid: h.kind for h in found} == mine

    report = lifecycle.destroy(ctx, "a")  # no state: `destroy --name a` after a killed `up`

    assert sorted(report.removed) == sorted(h.describe() for h in found)
    assert not [pid for pid in mine if _alive(pid)]
    assert all(_alive(pid) for pid in others)
    # tcpdump flushed and closed its capture on SIGTERM: the file is there, and readable.
    assert pcap.ring_files(ours / paths.PCAP_FILE)
    assert hostprocs.find(ours) == []
    # A recorded pid that is another sandbox's sinkhole by now is not this one's.
    assert hostprocs.find(ours, sinkhole_pid=others[0]) == []
    assert [h.pid for h in hostprocs.find(theirs)] == others[:2]

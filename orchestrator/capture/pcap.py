"""Packet capture of one sandbox's interface (`sandbox up --pcap`): tcpdump, detached.

The capture outlives the command that started it (`up` starts it, `destroy` stops it), so tcpdump
runs in its own session and its pid goes into the sandbox's state. It runs in the current network
namespace, where the guest's host-side interface (lifecycle.target_dev) lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePath

from orchestrator.errors import SandboxError
from orchestrator.waits import Deadline, wait_for

STDERR_SUFFIX = ".tcpdump.log"  # beside the capture: tcpdump's own messages, kept for a failure


class CaptureError(SandboxError):
    """The packet capture could not be started or stopped."""


def _alive_tcpdump(pid: int) -> bool:
    # A pid from an old state file may belong to something else by now: only ever signal tcpdump.
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return comm == "tcpdump" and status != "Z"


def _reap(pid: int) -> None:
    # Only our own child can be reaped; after `up` exited, init reaps it instead.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# The capture is a ring of files (tcpdump -C/-W): at most RING_FILES of RING_FILE_MIB each, the
# oldest overwritten, so a guest sending without end cannot fill the host's disk.
RING_FILE_MIB = 64
RING_FILES = 4


def ring_files(path: str | Path) -> list[Path]:
    """The capture's files (PATH0, PATH1, ...), oldest first."""
    base = Path(path)
    found = [p for p in base.parent.glob(base.name + "*") if p.name[len(base.name) :].isdigit()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def start_pcap(
    interface: str,
    path: str | Path,
    *,
    timeout: float = 10.0,
    file_mib: int = RING_FILE_MIB,
    files: int = RING_FILES,
) -> int:
    """Start capturing every packet on `interface` into a ring of pcap files PATH0, PATH1, ...
    (flushed per packet, so a capture cut short stays readable); return tcpdump's pid for
    stop_pcap.

    Call from `up` once the domain runs (its interface exists then), in the namespace of the
    domain's bridge, with path = <state>/<name>/logs/<paths.PCAP_FILE>; keep the pid in the
    sandbox's state. Returns only once tcpdump said it is listening and the file exists.
    """
    capture = Path(path)
    args = pcap_args(interface, capture, file_mib=file_mib, files=files)
    first = capture.with_name(capture.name + "0")
    return start_tcpdump(interface, args, first, timeout=timeout, hint="drop --pcap")


def pcap_args(
    interface: str,
    path: PurePath,
    *,
    file_mib: int = RING_FILE_MIB,
    files: int = RING_FILES,
) -> list[str]:
    """tcpdump's arguments (without the program) for `--pcap` on `interface`. Pure."""
    # -U writes each packet as it is dumped; --immediate-mode makes libpcap hand it over at
    # once: without it the packets still in the kernel ring at SIGTERM are lost (measured:
    # a capture stopped right after an `exec` held 23 of 52 packets, none of the exec's).
    # -Z root: tcpdump drops to its own user after the first file, and could not open the
    # ring's next ones in the sandbox's logs directory.
    return [
        "-i", interface, "-w", str(path), "-U", "--immediate-mode", "-n",
        "-C", str(file_mib), "-W", str(files), "-Z", "root",
    ]  # fmt: skip


def start_tcpdump(
    interface: str,
    args: Sequence[str],
    first_file: Path,
    *,
    timeout: float = 10.0,
    hint: str = "",
) -> int:
    """Start `tcpdump ARGS` detached (its own session, it outlives this process); return its pid
    once it said it is listening and `first_file` exists. Its messages go to a file beside
    `first_file`, kept for a failure."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise CaptureError(
            "tcpdump is not installed",
            "install it (scripts/install.sh)" + (f" or {hint}" if hint else ""),
        )
    first_file.parent.mkdir(parents=True, exist_ok=True)
    errors_file = first_file.with_name(first_file.name + STDERR_SUFFIX)
    with errors_file.open("wb") as stderr:
        proc = subprocess.Popen(
            [tcpdump, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )

    def started() -> bool | None:
        if proc.poll() is not None:
            detail = errors_file.read_text(errors="replace").strip()
            raise CaptureError(
                f"tcpdump could not capture on {interface}: {detail or f'exit {proc.returncode}'}",
                "check that the sandbox's interface exists in this network namespace "
                "(ip link show)",
            )
        listening = "listening on" in errors_file.read_text(errors="replace")
        return True if listening and first_file.exists() else None

    deadline = Deadline(
        timeout,
        f"tcpdump to listen on {interface}",
        "the host may be overloaded" + (f"; {hint}" if hint else ""),
    )
    try:
        wait_for(started, deadline, interval=0.05, max_interval=0.5)
    except BaseException:
        stop_pcap(proc.pid)
        raise
    return proc.pid


def stop_pcap(pid: int, *, timeout: float = 10.0) -> bool:
    """Stop a capture started by start_pcap; tcpdump flushes and closes the file on SIGTERM.

    Call from `destroy` with the pid kept in the state, before the logs are collected. Returns
    False if no such tcpdump runs any more (already stopped, host rebooted): not an error.
    """
    if not _alive_tcpdump(pid):
        _reap(pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool | None:
        _reap(pid)
        return None if _alive_tcpdump(pid) else True

    try:
        wait_for(gone, Deadline(timeout, f"tcpdump (pid {pid}) to exit"), interval=0.05)
    except SandboxError:
        # Stuck writing to a dead disk or similar: the capture is lost either way.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(gone, Deadline(timeout, f"tcpdump (pid {pid}) to die after SIGKILL"))
    return True

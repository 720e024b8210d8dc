"""A packet capture in the lab's fake internet that proves what it says.

"Nothing reached the internet" is only as good as the capture behind it: a tcpdump that listens in
the wrong namespace, or that has not yet written what the kernel handed it when it is stopped,
sees nothing and proves nothing (one CI run found a capture empty although the run it watched had
reached the lab's server). So the capture is entered by the servers' own network namespace and
checked to be in it, it runs in immediate mode, and it is bracketed by barriers: a datagram sent
inside that namespace which must show up in the file, once before the watched run (the capture is
live) and once after it (everything the run sent before it was written)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from orchestrator.waits import Deadline, wait_for
from sandbox_lab import LAB_SERVERS_PID, Lab

_SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(b'sandbox-capture-barrier', ('127.0.0.1', int(sys.argv[1])))\n"
)


class InetCapture:
    """tcpdump (`-n`, TCP and UDP) in the fake internet, as a context manager; `packets()` gives
    its lines without the barriers' own datagrams."""

    def __init__(self, lab: Lab, path: Path) -> None:
        servers = int(lab.file(LAB_SERVERS_PID).read_text().strip())
        self.namespace = f"/proc/{servers}/ns/net"
        self.path = path
        self._ports: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> InetCapture:
        log = self.path.with_suffix(".log")
        argv = ["nsenter", f"--net={self.namespace}", "tcpdump", "-i", "any", "-n", "-U"]
        argv += ["--immediate-mode", "-w", str(self.path), "tcp or udp"]
        with log.open("wb") as err:
            self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(
            lambda: True if "listening on" in log.read_text(errors="replace") else None,
            Deadline(20, "tcpdump in the fake internet to listen"),
            interval=0.1,
        )
        assert os.readlink(f"/proc/{self._proc.pid}/ns/net") == os.readlink(self.namespace)
        self.barrier()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.barrier()
        finally:
            assert self._proc is not None
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def barrier(self) -> None:
        """Sends a datagram inside the servers' namespace and waits until the capture file holds
        it: every packet the kernel gave tcpdump before it is in the file too."""
        port = 20000 + secrets.randbelow(20000)
        self._ports.append(port)
        subprocess.run(
            ["nsenter", f"--net={self.namespace}", sys.executable, "-c", _SEND, str(port)],
            check=True,
            timeout=20,
        )
        mark = f"127.0.0.1.{port}:"
        wait_for(
            lambda: True if any(mark in line for line in self._lines()) else None,
            Deadline(20, f"the capture in the fake internet to record its barrier (port {port})"),
            interval=0.1,
        )

    def packets(self, keep: Callable[[str], bool] = lambda _: True) -> list[str]:
        marks = tuple(f"127.0.0.1.{port}:" for port in self._ports)
        return [line for line in self._lines() if keep(line) and not any(m in line for m in marks)]

    def _lines(self) -> list[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []  # -U writes the file header with the first packet
        out = subprocess.run(
            ["tcpdump", "-r", str(self.path), "-n"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        return out.stdout.splitlines()

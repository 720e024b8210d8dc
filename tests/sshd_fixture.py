"""A real OpenSSH sshd for tests of the SSH edge (needs root and openssh-server): on 127.0.0.1,
or on an address inside a network namespace the test made.

Keys are made with ssh-keygen, not with the code under test, so the tests compare our key
handling with OpenSSH's own.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.vm.guest import Endpoint

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path, comment: str = "test") -> str:
    """An ed25519 key pair at `path` (+ .pub); returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    workdir: Path
    port: int
    host_key: str  # public line of the key sshd serves
    client_key: Path  # a private key sshd accepts
    user: str = field(default_factory=getpass.getuser)
    address: str = "127.0.0.1"
    netns: str | None = None  # run inside this network namespace (`ip netns exec`)
    sftp_options: str = ""  # appended to the sftp-server command (-R: read-only, -P: denied)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "sshd.log"

    def endpoint(self, **changes: object) -> Endpoint:
        fields: dict[str, object] = {
            "host": self.address,
            "port": self.port,
            "user": self.user,
            "client_key": self.client_key,
            "host_key": self.host_key,
        }
        fields.update(changes)
        return Endpoint(**fields)  # type: ignore[arg-type]

    def start(self, wait: bool = True) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}",
                    f"Port {self.port}",
                    f"HostKey {self.workdir / 'host_key'}",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "PidFile none",
                    f"Subsystem sftp {SFTP_SERVER} {self.sftp_options}".rstrip(),
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        # `ip netns exec` execs sshd itself: the pid is sshd's either way.
        enter = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*enter, str(SSHD), "-D", "-e", "-f", str(config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self._wait_listening()

    def _wait_listening(self) -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()}")
            if self.netns is not None:
                # Out of this process's reach: sshd's own word that it listens.
                if "Server listening" in self.log.read_text():
                    return
                time.sleep(0.02)
                continue
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"sshd did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)

    def connections(self) -> list[str]:
        """The TCP connections sshd accepted, from its log: `Connection from A port P ...`."""
        return [line for line in self.log.read_text().splitlines() if "Connection from" in line]


SshdFactory = Callable[..., Sshd]


def make_sshd(
    workdir: Path, *, port: int | None = None, address: str = "127.0.0.1", netns: str | None = None
) -> Sshd:
    """A configured, not yet started sshd with a fresh host key and one authorized client key."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_key", "host")
    client_key = workdir / "client_key"
    (workdir / "authorized_keys").write_text(keygen(client_key, "client") + "\n")
    os.chmod(workdir / "host_key", 0o600)
    return Sshd(
        workdir=workdir,
        port=port or free_port(),
        host_key=host_key,
        client_key=client_key,
        address=address,
        netns=netns,
    )


@pytest.fixture
def sshd_factory(tmp_path: Path) -> Iterator[SshdFactory]:
    """Makes unstarted sshds; stops every one at teardown."""
    made: list[Sshd] = []

    def factory(**kwargs: object) -> Sshd:
        server = make_sshd(tmp_path / f"sshd{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One running sshd shared by a test module."""
    server = make_sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()

"""What the end-to-end tests share: the real CLI driven inside the lab, the base image, and a
check that nothing of a sandbox is left. Fixtures are registered once, in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from orchestrator import names, paths
from orchestrator.egress import dnslog, hostfilter
from orchestrator.vm import hypervisor as hv
from orchestrator.vm.domain import dns_log_path
from orchestrator.vm.images import Image, ImageRecipe, build_image
from orchestrator.waits import Deadline, wait_for
from sandbox_lab import Lab, in_lab

SANDBOX = str(Path(sys.executable).parent / "sandbox")


@pytest.fixture(scope="session")
def image() -> Image:
    # Shared with the user's own cache: a second run reuses the image while the recipe is the same.
    return build_image(ImageRecipe(), paths.Dirs.from_env().images, progress=print)


# Real PHP software from Debian for tests/test_e2e_realphp.py: tools using composer/xdebug-handler
# (composer, which downloads through curl_multi, and phpmd), and two HTTP clients with async
# requests.
REAL_PHP_PACKAGES = ("composer", "php-guzzlehttp-guzzle", "php-symfony-http-client", "phpmd")


@pytest.fixture(scope="session")
def real_php_image() -> Image:
    # Named like `sandbox image build --package ...` names it: the same cached image.
    return build_image(
        ImageRecipe.create(REAL_PHP_PACKAGES), paths.Dirs.from_env().images, progress=print
    )


@dataclass
class Cli:
    lab: Lab
    state_home: Path
    config: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "XDG_STATE_HOME": str(self.state_home),
            "SANDBOX_CONFIG": str(self.config),
        }

    def argv(self, *args: str) -> list[str]:
        return in_lab(self.lab, [SANDBOX, *args])

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"sandbox {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def sandbox_dir(self, name: str) -> Path:
        return self.state_home / "sandbox" / name

    def records(self, name: str, *args: str) -> list[dict[str, Any]]:
        """`sandbox logs --json` (which collects first), parsed."""
        out = self.ok("logs", "--name", name, "--json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def records_when(
        self,
        name: str,
        ready: Callable[[list[dict[str, Any]]], bool],
        what: str,
        *args: str,
        timeout: float = 60,
    ) -> list[dict[str, Any]]:
        """The records once `ready` holds for them: a connect's record may wait a few seconds
        for its firewall half (the capture's settle window), so a test waits for the rows it
        expects instead of sleeping for a guess at that window."""
        deadline = Deadline(timeout, f"sandbox {name!r}'s logs to show {what}")
        seen: list[list[dict[str, Any]]] = []

        def attempt() -> bool | None:
            seen.append(self.records(name, *args))
            return True if ready(seen[-1]) else None

        wait_for(attempt, deadline, interval=1.0)
        return seen[-1]


@pytest.fixture
def cli(lab: Lab, image: Image, tmp_path: Path) -> Iterator[Cli]:
    yield from _cli(lab, tmp_path)


@pytest.fixture
def real_php_cli(lab: Lab, real_php_image: Image, tmp_path: Path) -> Iterator[Cli]:
    """The CLI with the image of REAL_PHP_PACKAGES built (not the default one)."""
    yield from _cli(lab, tmp_path)


def _cli(lab: Lab, tmp_path: Path) -> Iterator[Cli]:
    config = tmp_path / "config.yaml"
    config.write_text("boot_timeout: 600\n")
    c = Cli(lab=lab, state_home=tmp_path / "state", config=config)
    yield c
    # Whatever a failing test left, remove it so the next test starts clean: by name, the
    # sandboxes of this test's own state only. `destroy --all` would also take the VMs of other
    # sessions sharing the lab (it counts every sandbox domain it finds as its own).
    for state in sorted((c.state_home / "sandbox").glob(f"*/{paths.STATE_FILE}")):
        c.run("destroy", "--name", state.parent.name, timeout=120)
    if (c.state_home / "sandbox" / paths.WARM_DIR).exists():
        c.run("warm", "drain", timeout=120)


def wait_removed(name: str, cli: Cli, seconds: float = 120.0) -> None:
    """Wait for the removal a `destroy` left to its child process (the state says destroying
    until it is done)."""
    state_file = cli.sandbox_dir(name) / paths.STATE_FILE

    def done() -> bool | None:
        try:
            phase = json.loads(state_file.read_text()).get("phase")
        except (FileNotFoundError, ValueError):
            return True
        return None if phase == "destroying" else True

    wait_for(done, Deadline(seconds, f"the removal of sandbox {name!r} after its destroy"))


def leftovers(name: str, cli: Cli) -> list[str]:
    """What is left of sandbox `name` after its destroy (once its removal is done): its domain,
    network, volumes, the input guard of its bridge, its resolver's query log, its state and
    keys; and the filters all sandboxes share, once no sandbox is left."""
    wait_removed(name, cli)
    found: list[str] = []
    conn = libvirt.open("qemu:///system")
    try:
        found += [d.name() for d in conn.listAllDomains(0) if d.name() == f"sandbox-{name}"]
        # A warm VM it took keeps its own domain name; its metadata names the sandbox.
        found += [d for n, d in hv.sandbox_domains(conn).items() if n == name]
        found += [
            f"net:{n.name()}" for n in conn.listAllNetworks(0) if n.name() == f"sandbox-{name}"
        ]
        for pool in conn.listAllStoragePools(0):
            pool.refresh(0)
            found += [v for v in pool.listVolumes() if v.startswith(f"sandbox-{name}")]
        if not hv.sandbox_domains(conn):
            found += [
                f"nwfilter:{f.name()}"
                for f in conn.listAllNWFilters(0)
                if f.name() in hostfilter.SHARED_FILTERS
            ]
    finally:
        conn.close()
    tables = subprocess.run(
        in_lab(cli.lab, ["nft", "list", "tables"]), capture_output=True, text=True, check=True
    ).stdout
    guard = names.guard_table(names.bridge(name))
    found += [f"nft:{t}" for t in tables.split() if t == guard]
    log = Path(dns_log_path(names.network(name)))
    found += [str(p) for p in (log, dnslog.rotated_copy(log)) if p.exists()]
    sdir = cli.sandbox_dir(name)
    found += [f for f in (*paths.SECRET_FILES, paths.STATE_FILE) if (sdir / f).exists()]
    return found

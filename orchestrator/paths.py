"""Every file and directory name the orchestrator uses, in one place (after Lima's filenames.go)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP = "sandbox"


def project_dir(name: str) -> Path:
    """A top-level directory of the project the code reads at run time (images/, cloud-init/):
    bundled inside the package by a wheel install (setup.py), else beside the package in the
    checkout an editable install runs from."""
    package = Path(__file__).resolve().parent
    bundled = package / "bundled" / name
    return bundled if bundled.is_dir() else package.parent / name


# Per-image files, under <data>/images/<image name>/
IMAGE_DISK = "base.qcow2"
IMAGE_KERNEL = "vmlinuz"
IMAGE_INITRD = "initrd.img"
IMAGE_MANIFEST = "manifest.json"
# Beside the image directories, under <data>/images/, per image name (str.format(name=...)):
IMAGE_BUILD_LOCK = ".{name}.lock"
IMAGE_BUILD_DIR_PREFIX = ".{name}.build-"  # temporary build directory, renamed into place
IMAGE_BUILD_LOG = ".{name}.build.log"  # mmdebstrap's output of the last failed build

# Per-sandbox files, under <state>/<sandbox name>/
STATE_FILE = "state.json"
LOCK_FILE = "lock"
CLIENT_KEY = "id_ed25519"
CLIENT_KEY_PUB = "id_ed25519.pub"
HOST_KEY_PUB = "ssh_host_ed25519_key.pub"
KNOWN_HOSTS = "known_hosts"
SEED_ISO = "seed.iso"
CONSOLE_LOG = "console.log"
LOGS_DIR = "logs"
# Under <state>/<sandbox name>/logs/ (records.py shapes, one JSON object a line, appended):
CONNECTIONS_LOG = "connections.jsonl"
DNS_LOG = "dns.jsonl"
PCAP_FILE = "capture.pcap"
CAPTURE_CURSOR = "capture-cursor.json"  # monitor.Cursor: how far the guest's logs were collected
DNS_CURSOR = "dns-cursor.json"  # logs/: how far the network's DNS log was read (dnslog.LogCursor)
# logs/: why the network's DNS log could not be read at all (a remote host without SSH)
DNS_UNREAD = "dns-unread.txt"
NETWORK_RECORD = "network.json"  # logs/: the sandbox network's subnets, kept past destroy
LEARN_RECORD = "learn.json"  # logs/: these logs hold records of a learn-mode sandbox, and its mode
FIREWALL_STATE = "firewall.state"  # logs/: what the last collection found the guest firewall
WILDCARD_LOADS_SEEN = "wildcards.seen"  # logs/: the wildcard resolver's guest loads taken
COLLECT_LOCK = ".collect.lock"  # collections of one sandbox take turns
RUNS_DIR = "runs"  # one directory per `sandbox run`, named by its run id:
RUN_FILE = "run.json"  # run.RunRecord: what ran, when, how it ended
XDEBUG_DIR = "xdebug"  # the run's xdebug traces, profiles and coverage, fetched from the guest

# Files the orchestrator removes at destroy; everything else in the state dir (logs) is kept.
SECRET_FILES = (CLIENT_KEY, CLIENT_KEY_PUB, HOST_KEY_PUB, KNOWN_HOSTS, SEED_ISO)

# In the guest: one directory per run, the run user's working directory (run/target.py).
GUEST_RUNS_DIR = "/var/lib/sandbox/runs"

# Warm VMs (lifecycle/warm.py), under <state>/.warm/ (a name no sandbox can have), one directory
# per warm VM named by its id, holding its record and the key to log in with:
WARM_DIR = ".warm"
WARM_FILE = "warm.json"
WARM_LOCK = "lock"  # fills and takes of warm VMs take turns
WARM_REFILL_LOG = "refill.log"  # what the last background refill printed

CONFIG_FILE = "config.yaml"
GLOBAL_LOCK = "global.lock"


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    # The XDG spec says relative paths are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / default


@dataclass(frozen=True)
class Dirs:
    data: Path
    state: Path
    config: Path

    @classmethod
    def from_env(cls) -> Dirs:
        return cls(
            data=_xdg("XDG_DATA_HOME", ".local/share") / APP,
            state=_xdg("XDG_STATE_HOME", ".local/state") / APP,
            config=_xdg("XDG_CONFIG_HOME", ".config") / APP,
        )

    @property
    def images(self) -> Path:
        return self.data / "images"

    def image(self, name: str) -> Path:
        return self.images / name

    def sandbox(self, name: str) -> Path:
        return self.state / name

    @property
    def warm(self) -> Path:
        return self.state / WARM_DIR

    @property
    def config_file(self) -> Path:
        return self.config / CONFIG_FILE

    @property
    def global_lock(self) -> Path:
        return self.state / GLOBAL_LOCK


# Where the system keeps named network namespaces and libvirtd its socket.
NETNS_DIR = Path("/run/netns")
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")

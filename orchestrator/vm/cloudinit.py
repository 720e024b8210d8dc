"""NoCloud seed for a sandbox: user-data and meta-data rendered with yaml.safe_dump, packed into
an ISO9660 image (volume label `cidata`) with pycdlib, in memory.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import pycdlib
import yaml

from orchestrator import paths
from orchestrator.errors import SandboxError

SEED_TEMPLATE = paths.project_dir("cloud-init") / "user-data.yaml"
VOLUME_LABEL = "cidata"


@dataclass(frozen=True)
class SeedSpec:
    instance_id: str
    hostname: str
    host_key_private: str
    host_key_public: str
    authorized_key: str
    nameserver: str | None = None
    # Files on the seed beside user-data, for the image's own boot units to read before
    # cloud-init runs (name -> text): the egress policy of a cold boot (POLICY_FILES).
    files: tuple[tuple[str, str], ...] = ()
    # Files cloud-init writes into the guest (path -> text, mode 0644) before sshd starts: a
    # cold boot's xdebug configuration, which `up` would otherwise write over SSH.
    guest_files: tuple[tuple[str, str], ...] = ()


# The guest's egress policy on the seed, per IP version: images/rootfs/usr/lib/sandbox/seed-policy
# loads them at boot (sandbox-seed-policy.service), so that `up` finds them in place and only
# reads them back instead of loading them over SSH.
POLICY_FILES = {4: "sandbox-v4.rules", 6: "sandbox-v6.rules"}
_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


def _template() -> dict[str, Any]:
    try:
        data = yaml.safe_load(SEED_TEMPLATE.read_text())
    except OSError as exc:
        raise SandboxError(
            f"cannot read the cloud-init template {SEED_TEMPLATE}: {exc.strerror}",
            "reinstall sandbox from a complete checkout (pip install -e .)",
        ) from exc
    if not isinstance(data, dict):
        raise SandboxError(f"{SEED_TEMPLATE} is not a YAML mapping", "restore it from git")
    return data


def resolv_conf(nameserver: str) -> str:
    """The guest's /etc/resolv.conf: the sandbox network's resolver, the only one it knows."""
    return f"nameserver {nameserver}\noptions timeout:2 attempts:2\n"


def user_data(spec: SeedSpec) -> dict[str, Any]:
    data = _template()
    data["hostname"] = spec.hostname
    data["fqdn"] = spec.hostname
    data["ssh_keys"] = {
        "ed25519_private": spec.host_key_private,
        "ed25519_public": spec.host_key_public,
    }
    data["ssh_authorized_keys"] = [spec.authorized_key]
    written = []
    if spec.nameserver:
        # Written by write_files, which runs in cloud-init's init stage: the only resolver the
        # guest knows is the sandbox network's own.
        written.append(
            {
                "path": "/etc/resolv.conf",
                "content": resolv_conf(spec.nameserver),
                "permissions": "0644",
            }
        )
    written += [
        {"path": path, "content": text, "permissions": "0644"} for path, text in spec.guest_files
    ]
    if written:
        data["write_files"] = written
    return data


class _SeedDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (keys, files) as literal blocks, readably."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SeedDumper.add_representer(str, _str_representer)


def render_user_data(spec: SeedSpec) -> str:
    body = yaml.dump(user_data(spec), Dumper=_SeedDumper, sort_keys=True, width=1000)
    return "#cloud-config\n" + body


def render_meta_data(spec: SeedSpec) -> str:
    return yaml.safe_dump(
        {"instance-id": spec.instance_id, "local-hostname": spec.hostname}, sort_keys=True
    )


def build_seed_iso(spec: SeedSpec) -> bytes:
    files = {
        "user-data": render_user_data(spec).encode(),
        "meta-data": render_meta_data(spec).encode(),
    }
    for name, text in spec.files:
        if not _FILE_NAME.match(name) or name in files:
            raise SandboxError(
                f"cannot put {name!r} on the cloud-init seed", "this is a bug in sandbox: report it"
            )
        files[name] = text.encode()
    iso = pycdlib.PyCdlib()
    # cloud-init finds the seed by its label and reads the Joliet/Rock Ridge long names.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for index, (name, data) in enumerate(sorted(files.items())):
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/FILE{index};1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()

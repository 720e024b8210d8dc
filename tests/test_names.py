"""Derived resource names: fixed by the sandbox name alone, within the kernel's and nft's limits,
distinct between sandboxes and between kinds."""

from __future__ import annotations

import re

from orchestrator import names
from orchestrator.state import NAME_RE, validate_name

LONGEST = "a" + "-9" * 15  # 31 characters, the longest valid sandbox name


def test_host_interface_names_fit_ifnamsiz_and_differ() -> None:
    assert validate_name(LONGEST) and NAME_RE.fullmatch(LONGEST)
    for sandbox in ("a", LONGEST):
        bridge, tap = names.bridge(sandbox), names.target_dev(sandbox)
        assert len(bridge) <= 15 and len(tap) <= 15
        assert bridge != tap
        assert not bridge.startswith(("virbr", "vnet")) and not tap.startswith(("virbr", "vnet"))
    assert names.bridge("a") != names.bridge("b")
    assert names.bridge("a") == names.bridge("a")  # destroy finds what up made


def test_guard_table_is_an_nft_identifier() -> None:
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", names.guard_table("sbr-x.1"))


def test_libvirt_names_share_the_prefix_list_and_destroy_look_for() -> None:
    vols = names.SandboxVolumes.for_sandbox("web")
    for name in (names.domain("web"), names.network("web"), names.nwfilter("web"), *vols.all()):
        assert name.startswith(names.PREFIX + "web")
    base = names.BaseVolumes.for_image("default", "0123456789abcdef")
    assert base.disk == "base-default-0123456789ab.qcow2"
    for name in (base.disk, base.kernel, base.initrd, base.marker):
        assert name.startswith(names.base_volume_prefix("default"))
        assert not name.startswith(names.PREFIX)  # never taken for a sandbox's own volume

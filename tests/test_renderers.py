"""Pure renderers: domain, network, pool and volume XML; the cloud-init seed."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pycdlib
import pytest
import yaml

from orchestrator.errors import SandboxError
from orchestrator.vm.cloudinit import (
    POLICY_FILES,
    SeedSpec,
    build_seed_iso,
    render_meta_data,
    render_user_data,
)
from orchestrator.vm.domain import (
    Accel,
    DomainSpec,
    NetworkSpec,
    PoolSpec,
    VolumeSpec,
    render_domain,
    render_interface,
    render_metadata,
    render_network,
    render_pool,
    render_volume,
    resolver_hosts,
)

from .conftest import Golden

# Fixed key material so the golden files are stable; these keys are fakes and secure nothing.
HOST_PRIVATE = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
HOST_PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyForGoldenFilesOnly sandbox-test-host"
CLIENT_PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClientKeyForGoldenFiles sandbox-test-client"


def domain_spec(accel: Accel) -> DomainSpec:
    return DomainSpec(
        name="sandbox-test",
        uuid="6a1f4c8e-2b1d-4f0e-9a51-0c6f2d7e8b90",
        accel=accel,
        memory_mib=512,
        vcpus=2,
        kernel="/var/lib/libvirt/sandbox/base-default-0123456789ab.vmlinuz",
        initrd="/var/lib/libvirt/sandbox/base-default-0123456789ab.initrd",
        cmdline="root=/dev/vda rw console=ttyS0 quiet",
        disk="/var/lib/libvirt/sandbox/sandbox-test.qcow2",
        seed="/var/lib/libvirt/sandbox/sandbox-test-seed.iso",
        network="sandbox",
        mac="52:54:00:12:34:56",
        console_log="/var/lib/libvirt/sandbox/sandbox-test-console.log",
        capture_log="/var/lib/libvirt/sandbox/sandbox-test-capture.log",
        sandbox="test",
        image="default",
        filterref="sandbox-test",
        ip="192.168.213.77",
        ip6=("2001:db8:213::1:4d", "fe80::5054:ff:fe12:3456"),
    )


@pytest.mark.parametrize("accel", [Accel.TCG, Accel.KVM])
def test_domain_xml_golden(golden: Golden, accel: Accel) -> None:
    golden.check(f"domain-{accel.value}.xml", render_domain(domain_spec(accel)))


def test_domain_xml_shape() -> None:
    root = ET.fromstring(render_domain(domain_spec(Accel.TCG)))
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel", "").endswith(".vmlinuz")
    assert root.find("features/tcg/tb-cache") is not None
    assert root.find("cpu") is None
    kvm = ET.fromstring(render_domain(domain_spec(Accel.KVM)))
    assert kvm.get("type") == "kvm"
    assert kvm.find("features/tcg") is None
    assert kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    # Our metadata is how `list` recognises our domains.
    meta = root.find("metadata/{urn:sandbox:domain:1}sandbox")
    assert meta is not None and meta.get("name") == "test"
    # The capture's port (the guest's sandbox-capture-stream.service writes to it by this name).
    channel = root.find("devices/channel[@type='file']")
    assert channel is not None
    assert channel.find("target").get("name") == "org.sandbox.capture.0"  # type: ignore[union-attr]
    assert channel.find("source").get("path", "").endswith("-capture.log")  # type: ignore[union-attr]
    assert (
        ET.fromstring(render_domain(replace(domain_spec(Accel.TCG), capture_log=None))).find(
            "devices/channel"
        )
        is None
    )


def test_auto_accel_must_be_resolved() -> None:
    with pytest.raises(ValueError):
        render_domain(domain_spec(Accel.AUTO))


def test_domain_xml_escapes_values() -> None:
    spec = domain_spec(Accel.TCG)
    odd = DomainSpec(**{**spec.__dict__, "cmdline": "quiet x=<a&b>"})
    root = ET.fromstring(render_domain(odd))
    assert root.findtext("os/cmdline") == "quiet x=<a&b>"


def net_spec() -> NetworkSpec:
    return NetworkSpec(
        name="sandbox-test",
        bridge="sbr0123456789",
        subnet=ipaddress.IPv4Network("192.168.208.16/28"),
        subnet6=ipaddress.IPv6Network("2001:db8:213:1::/64"),
        dns_hosts=resolver_hosts(
            [("allowed.example", ["203.0.113.7", "2001:db8:1::9"]), ("b.example", ["203.0.113.7"])]
        ),
        guest_mac="52:54:00:12:34:56",
    )


def test_network_xml_golden(golden: Golden) -> None:
    golden.check("network.xml", render_network(net_spec()))


def test_network_never_forwards_dns() -> None:
    root = ET.fromstring(render_network(net_spec()))
    assert root.find("dns").get("forwardPlainNames") == "no"  # type: ignore[union-attr]
    ns = "{http://libvirt.org/schemas/network/dnsmasq/1.0}"
    options = {o.get("value") for o in root.iter(f"{ns}option")}
    assert {"no-resolv", "no-hosts"} <= options
    assert root.find("ip").get("address") == "192.168.208.17"  # type: ignore[union-attr]
    dhcp = root.find("ip/dhcp/range")
    assert dhcp is not None and dhcp.get("start") == "192.168.208.18"


def test_pool_and_volume_golden(golden: Golden) -> None:
    golden.check("pool.xml", render_pool(PoolSpec("sandbox", "/var/lib/libvirt/sandbox")))
    overlay = VolumeSpec(
        name="sandbox-test.qcow2",
        capacity=2 << 30,
        format="qcow2",
        backing_path="/var/lib/libvirt/sandbox/base-default-0123456789ab.qcow2",
        backing_format="qcow2",
    )
    golden.check("volume-overlay.xml", render_volume(overlay))


def seed_spec() -> SeedSpec:
    return SeedSpec(
        instance_id="sandbox-test-0123456789ab",
        hostname="sandbox-test",
        host_key_private=HOST_PRIVATE,
        host_key_public=HOST_PUBLIC,
        authorized_key=CLIENT_PUBLIC,
        nameserver="192.168.213.1",
    )


def test_seed_golden(golden: Golden) -> None:
    golden.check("user-data.yaml", render_user_data(seed_spec()))
    golden.check("meta-data.yaml", render_meta_data(seed_spec()))


def test_user_data_is_cloud_config() -> None:
    text = render_user_data(seed_spec())
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["ssh_keys"]["ed25519_private"] == HOST_PRIVATE
    assert data["ssh_keys"]["ed25519_public"] == HOST_PUBLIC
    assert data["ssh_authorized_keys"] == [CLIENT_PUBLIC]
    assert data["disable_root"] is False
    assert data["ssh_genkeytypes"] == ["ed25519"]  # only if ssh_keys were missing
    assert data["write_files"][0]["path"] == "/etc/resolv.conf"


# The cloud-config schema of the guest's cloud-init (Debian bookworm's cloud-init 22.4.2,
# cloudinit/config/schemas/schema-cloud-config-v1.json; Apache-2.0 or GPL-3.0): what it checks at
# every boot, warning on the console when the seed or the image's config does not match.
CLOUD_INIT_SCHEMA = Path(__file__).parent / "data" / "cloud-init-22.4-schema-cloud-config-v1.json"


@pytest.mark.parametrize(
    "config",
    ["seed user-data", "images/rootfs/etc/cloud/cloud.cfg.d/99_sandbox.cfg"],
)
def test_cloud_config_passes_the_guests_cloud_init_schema(config: str) -> None:
    import jsonschema

    schema = json.loads(CLOUD_INIT_SCHEMA.read_text())
    if config == "seed user-data":
        data = yaml.safe_load(render_user_data(seed_spec()))
    else:
        data = yaml.safe_load((Path(__file__).parent.parent / config).read_text())
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(data)
    ]
    assert errors == []


# Reading a seed back, as cloud-init does: by its volume label and Joliet names.
def read_seed_iso(data: bytes) -> dict[str, bytes]:
    """The files of a seed ISO by their Joliet names."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        result: dict[str, bytes] = {}
        for child in iso.list_children(joliet_path="/"):
            name = iso.full_path_from_dirrecord(child)
            if child.is_dir():
                continue
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=name)
            result[name.lstrip("/")] = out.getvalue()
        return result
    finally:
        iso.close()


def volume_label(data: bytes) -> str:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        return str(iso.pvd.volume_identifier.decode().strip())
    finally:
        iso.close()


def test_seed_iso_round_trip() -> None:
    iso = build_seed_iso(seed_spec())
    assert volume_label(iso) == "cidata"
    files = read_seed_iso(iso)
    assert set(files) == {"user-data", "meta-data"}
    assert files["user-data"].decode() == render_user_data(seed_spec())
    assert yaml.safe_load(files["meta-data"]) == {
        "instance-id": "sandbox-test-0123456789ab",
        "local-hostname": "sandbox-test",
    }


def test_the_seed_carries_the_policy_files_beside_user_data() -> None:
    rules = {4: "*filter\n:OUTPUT DROP [0:0]\nCOMMIT\n", 6: "*filter\nCOMMIT\n"}
    spec = dataclasses.replace(
        seed_spec(), files=tuple((POLICY_FILES[v], text) for v, text in rules.items())
    )
    files = read_seed_iso(build_seed_iso(spec))
    assert set(files) == {"user-data", "meta-data", "sandbox-v4.rules", "sandbox-v6.rules"}
    # Byte for byte: the guest's sha256sum of them is what `up` compares (guestfw.marker_line).
    assert {v: files[POLICY_FILES[v]].decode() for v in (4, 6)} == rules
    assert files["user-data"].decode() == render_user_data(seed_spec())


@pytest.mark.parametrize("name", ["user-data", "../x", "A.rules", "", "x/y"])
def test_a_seed_file_name_is_checked(name: str) -> None:
    spec = dataclasses.replace(seed_spec(), files=((name, "x"),))
    with pytest.raises(SandboxError, match="cannot put"):
        build_seed_iso(spec)


def warm_spec() -> DomainSpec:
    spec = domain_spec(Accel.TCG)
    return DomainSpec(
        **{
            **spec.__dict__,
            "name": "sandbox-warm.0123abcd",
            "network": None,
            "mac": None,
            "filterref": None,
            "ip": None,
            "ip6": (),
            "sandbox": "",
            "hotplug_ports": 1,
            "warm_id": "0123abcd",
        }
    )


def test_warm_domain_xml_golden(golden: Golden) -> None:
    golden.check("domain-warm.xml", render_domain(warm_spec()))


def test_a_warm_domain_has_no_interface_and_a_free_port_for_one() -> None:
    root = ET.fromstring(render_domain(warm_spec()))
    devices = root.find("devices")
    assert devices is not None
    assert devices.find("interface") is None
    # Its own PCIe devices (two disks, the rng, the channel's controller) each take a port; one
    # more stays empty.
    ports = [c for c in devices.findall("controller") if c.get("model") == "pcie-root-port"]
    used = [d for d in devices if d.tag in ("disk", "rng", "interface")]
    # The capture's channel brings libvirt's virtio-serial controller: one more.
    assert devices.find("channel") is not None
    assert len(ports) == len(used) + 1 + 1
    assert devices.find("controller[@model='pcie-root']").get("index") == "0"  # type: ignore[union-attr]
    # No USB controller: libvirt's default one would take the free port.
    assert devices.find("controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]
    meta = root.find("metadata/{urn:sandbox:domain:1}sandbox")
    assert meta is not None and (meta.get("name"), meta.get("warm")) == ("", "0123abcd")


def test_the_interface_plugged_into_a_warm_vm_is_the_cold_boots_interface() -> None:
    cold = ET.fromstring(render_domain(domain_spec(Accel.TCG))).find("devices/interface")
    iface = domain_spec(Accel.TCG).interface()
    assert cold is not None and iface is not None
    plugged = ET.fromstring(render_interface(iface))

    def canonical(el: ET.Element) -> str:
        return ET.canonicalize(ET.tostring(el, encoding="unicode"), strip_text=True)

    assert canonical(plugged) == canonical(cold)
    assert [p.get("value") for p in plugged.iterfind("filterref/parameter")] == [
        "192.168.213.77",
        "2001:db8:213::1:4d",
        "fe80::5054:ff:fe12:3456",
    ]


def test_metadata_for_a_taken_warm_vm() -> None:
    meta = ET.fromstring(render_metadata("hd1", "default", "0123abcd"))
    assert meta.tag == "sandbox"  # libvirt puts it in the namespace the call names
    assert (meta.get("name"), meta.get("image"), meta.get("warm")) == ("hd1", "default", "0123abcd")

#!/usr/bin/env bash
# Installs everything sandbox needs on Debian 12 / Ubuntu: system packages and a venv in .venv.
# Run as root (apt-get). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  # libvirt and QEMU (the VM), qemu-img (overlays), dnsmasq (the sandbox network's DHCP/DNS)
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base
  # `sandbox up --pcap`: the packet capture of a sandbox's interface
  tcpdump
  # the host side of the network: bridges, NAT, namespaces for the lab
  iproute2 iptables
  # the host-side input guard of the sandbox network (hostguard.py)
  nftables
  # the base image recipe, and its connect() capture (eBPF program and loader, images/capture/)
  mmdebstrap e2fsprogs clang libbpf-dev libelf-dev zlib1g-dev
  # libvirt-python builds from source against these
  libvirt-dev pkg-config gcc python3-venv python3-dev
  # `sandbox ssh`, and the real sshd the SSH tests run against
  openssh-client openssh-server
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package starts no daemon here when PID 1 is not systemd; on a systemd host libvirtd
# runs already. The lab (sandbox-lab up) starts its own inside a network namespace.

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "installed: $(.venv/bin/sandbox --help >/dev/null && echo .venv/bin/sandbox)"

#!/usr/bin/env bash
# The main job, end to end: build (or reuse) the base image, boot a sandbox, run
# examples/phone_home.php in it, show what it tried to reach and from which PHP line, destroy it. Where no libvirtd runs yet (no systemd, as on CI machines), it starts one inside a
# network-namespace lab so that the VM's network never touches the machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
sandbox=.venv/bin/sandbox

$sandbox image build
run=()
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  .venv/bin/sandbox-lab up
  run=(ip netns exec sandbox-lab)
fi
trap '"${run[@]}" $sandbox destroy --name demo || true' EXIT
"${run[@]}" $sandbox up --name demo --allow 203.0.113.7
"${run[@]}" $sandbox exec --name demo -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"; php -r "echo PHP_VERSION, PHP_EOL;"'
"${run[@]}" $sandbox status --name demo
"${run[@]}" $sandbox run --name demo examples/phone_home.php
"${run[@]}" $sandbox logs --name demo --run last

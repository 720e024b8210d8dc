#!/usr/bin/env bash
# The whole test suite: linters (ruff, strict mypy), unit and golden tests, the libvirt test
# driver, a real sshd, the namespace lab, the image build and real VM boots.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pytest "$@"

"""The `lab` pytest fixture: libvirtd in a network namespace next to a fake internet.

tests/conftest.py registers these fixtures once for the whole session; test modules just name them.
The lab is brought up once per session, reused if it is already up (someone's `sandbox-lab up`),
and torn down at the end only if this session started it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sandbox_lab import DEFAULT_LAB, Lab, lab_down, lab_status, lab_up


@dataclass(frozen=True)
class LabSession:
    lab: Lab
    started_here: bool


def lab_unavailable() -> str | None:
    """Why the lab cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [tool for tool in ("ip", "libvirtd", "virtlogd") if shutil.which(tool) is None]
    return f"missing: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def lab_session() -> Iterator[LabSession]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    was_up = lab_status(DEFAULT_LAB).up
    lab_up(DEFAULT_LAB)
    yield LabSession(DEFAULT_LAB, started_here=not was_up)
    if not was_up:
        lab_down(DEFAULT_LAB)


@pytest.fixture(scope="session")
def lab(lab_session: LabSession) -> Lab:
    return lab_session.lab

"""Shared test plumbing: golden files. `pytest --regenerate` rewrites them from the current
output; the suite then fails (test_goldens.py) until the change is reviewed (`git diff
tests/golden`) and accepted with `pytest --accept-golden`, which records each golden's digest in
tests/golden/ACCEPTED."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

# Session fixtures are registered here, once: a fixture imported into several test modules is a
# separate fixture per module, and the lab would be "already up" for all but the first.
from .e2e_support import cli, image, real_php_cli, real_php_image
from .lab_fixture import lab, lab_session

__all__ = ["cli", "image", "lab", "lab_session", "real_php_cli", "real_php_image"]

GOLDEN = Path(__file__).parent / "golden"
ACCEPTED = GOLDEN / "ACCEPTED"


def golden_digests() -> dict[str, str]:
    """Relative path -> sha256 of every golden file as it is now."""
    return {
        str(path.relative_to(GOLDEN)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(GOLDEN.rglob("*"))
        if path.is_file() and path != ACCEPTED
    }


def accepted_digests() -> dict[str, str]:
    if not ACCEPTED.exists():
        return {}
    pairs = (line.split("  ", 1) for line in ACCEPTED.read_text().splitlines() if line)
    return {name: digest for digest, name in pairs}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate", action="store_true", help="rewrite golden files from current output"
    )
    parser.addoption(
        "--accept-golden",
        action="store_true",
        help="record the golden files as they are now as reviewed (tests/golden/ACCEPTED)",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--accept-golden"):
        ACCEPTED.write_text(
            "".join(f"{digest}  {name}\n" for name, digest in golden_digests().items())
        )


class Golden:
    def __init__(self, regenerate: bool) -> None:
        self.regenerate = regenerate

    def check(self, name: str, actual: str) -> None:
        path = GOLDEN / name
        if self.regenerate:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual)
            return
        assert path.exists(), f"golden file {path} is missing: run pytest --regenerate"
        assert actual == path.read_text(), f"output differs from {path}"


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(bool(request.config.getoption("--regenerate")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """In CI everything the suite needs is installed: a skip there means a broken install step,
    so it fails instead of passing silently."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    expected_failure = hasattr(report, "wasxfail")  # xfail is reported as skipped
    if (
        report.skipped
        and not expected_failure
        and os.environ.get("CI") == "true"
        and "vagrant" not in item.name
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI: {report.longrepr}"
    return None

"""`pip install .` (a wheel, not editable) gives a working `sandbox`: the image recipe and the
cloud-init template travel as package data (setup.py), and the build is quiet about deprecated
metadata. Builds from a copy of the checkout's tracked files, so nothing is left in the tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.vm.images import ImageRecipe, recipe_hash

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

PROBE = """
import json, orchestrator
from orchestrator.capture import report
from orchestrator.vm import cloudinit, images
seed = cloudinit.build_seed_iso(cloudinit.SeedSpec("i", "h", "k", "k.pub", "a", "192.0.2.1"))
print(json.dumps({
    "package": orchestrator.__file__,
    "recipe": str(images.RECIPE_DIR),
    "hash": images.recipe_hash(images.ImageRecipe()),
    "template": str(cloudinit.SEED_TEMPLATE),
    "seed": len(seed),
    "report_template": report.template_path(),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = work / "wheels"
    build = subprocess.run(
        [str(BIN / "pip"), "wheel", "-v", "--no-deps", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    target = work / "site"
    (wheel,) = wheels.glob("sandbox-*.whl")
    install = subprocess.run(
        [str(BIN / "pip"), "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return target, build.stdout + build.stderr


def _run_installed(target: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv` with the installed copy first on the path and not from the checkout (`python -c`
    puts its working directory first on the path)."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=target,
        timeout=120,
    )


def test_a_wheel_install_finds_its_recipe_and_template(installed: tuple[Path, str]) -> None:
    target, _log = installed
    probe = _run_installed(target, [sys.executable, "-c", PROBE])
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    # The installed copy is used, never the checkout's editable one.
    assert Path(found["package"]).is_relative_to(target)
    assert Path(found["recipe"]).is_relative_to(target)
    assert Path(found["template"]).is_relative_to(target)
    # The same recipe as the checkout's, executable bits included: the same cached image.
    assert found["hash"] == recipe_hash(ImageRecipe())
    assert found["seed"] > 0
    # The report's HTML template travels as package data too.
    assert Path(found["report_template"]).is_relative_to(target)
    assert Path(found["report_template"]).is_file()
    cli = _run_installed(target, [str(target / "bin" / "sandbox"), "--help"])
    assert cli.returncode == 0 and "destroy" in cli.stdout, cli.stdout + cli.stderr
    # The lab is a package of its own beside the product, installed with it as `sandbox-lab`.
    lab = _run_installed(target, [str(target / "bin" / "sandbox-lab"), "--help"])
    assert lab.returncode == 0 and "status" in lab.stdout, lab.stdout + lab.stderr
    assert not (target / "orchestrator" / "lab.py").exists()


def test_the_product_never_imports_the_lab() -> None:
    """The lab (sandbox_lab) drives the product in tests and trials; the product knows nothing of
    it, so a user's `sandbox` never loads test harness code."""
    users = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "orchestrator").rglob("*.py"))
        if "sandbox_lab" in p.read_text()
    ]
    assert users == []


def test_the_build_warns_about_no_deprecated_metadata(installed: tuple[Path, str]) -> None:
    _target, log = installed
    # e.g. "`project.license` as a TOML table is deprecated" (setuptools >= 77)
    assert "deprecat" not in log.lower(), [x for x in log.splitlines() if "eprecat" in x]

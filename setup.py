"""Only what pyproject.toml cannot say: a wheel carries the image recipe (images/) and the
cloud-init template (cloud-init/) as package data, under orchestrator/bundled/. They live at the
top of the checkout, outside the package, where an editable install finds them
(paths.project_dir); package-data cannot name files outside the package directory."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("images", "cloud-init")


class BuildPyWithRecipe(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "orchestrator" / "bundled"
        for name in BUNDLED:
            # copy2 keeps the executable bits the recipe hash covers.
            shutil.copytree(here / name, target / name, symlinks=True, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithRecipe})

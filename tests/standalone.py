"""What a program run on a remote libvirt host must be (the sinkhole's, the wildcard relay's):
nothing of sandbox is installed there, only the host's python3."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def assert_standalone(program: Path) -> None:
    """`program` imports the standard library alone, and older Debian releases' python3 parses it
    (Python 3.7: buster)."""
    text = program.read_text()
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: it runs as a file on the host"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported
    assert "orchestrator" not in imported
    ast.parse(text, feature_version=(3, 7))

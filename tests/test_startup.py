"""What the CLI loads before it does anything: every `sandbox` command pays for it, and a warm
`up` has a budget of a few seconds (issue 15). The lifecycle package loads its verbs on first
use; these tests fail when a module-level import drags the collection side back into `up`."""

from __future__ import annotations

import json
import subprocess
import sys

import orchestrator.lifecycle as lifecycle

# Loaded by `sandbox up` only if it is asked for (--sinkhole) or by other verbs.
NOT_FOR_UP = (
    "dpkt",
    "jinja2",
    "orchestrator.capture.payload",
    "orchestrator.egress.sinkhole",
    "orchestrator.lifecycle.access",
    "orchestrator.lifecycle.collection",
    "orchestrator.lifecycle.reporting",
)


def _modules_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_up_loads_neither_the_collection_nor_the_packet_parser() -> None:
    loaded = _modules_after(
        "import orchestrator.cli\nfrom orchestrator import lifecycle\nlifecycle.up\n"
        "import orchestrator.lifecycle.build"
    )
    assert "orchestrator.lifecycle.build" in loaded
    assert sorted(loaded & set(NOT_FOR_UP)) == []


def test_every_export_resolves_to_its_module() -> None:
    for name in lifecycle.__all__:
        value = getattr(lifecycle, name)
        assert getattr(value, "__module__", "").startswith("orchestrator.lifecycle."), name
    assert set(lifecycle._EXPORTS) == set(lifecycle.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        lifecycle.no_such_verb  # noqa: B018
    except AttributeError as error:
        assert "no_such_verb" in str(error)
    else:
        raise AssertionError("lifecycle.no_such_verb resolved")

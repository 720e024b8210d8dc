"""Bad input through the real CLI: a clear error, exit code 2, and nothing created (no state,
which `up` writes before anything else exists). No VM: validation comes first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SANDBOX = str(Path(sys.executable).parent / "sandbox")


def sandbox(tmp_path: Path, *args: str, config: str = "") -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "config.yaml"
    conf.write_text(config)
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "SANDBOX_CONFIG": str(conf),
        "SANDBOX_CONNECT": "test:///default",
    }
    return subprocess.run(
        [SANDBOX, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


CASES = [
    (["up", "--name", "web\n"], "", "invalid sandbox name"),
    (["up", "--allow", "203.0.113.7:²"], "", "is not a number"),
    (["up", "--allow", "2001:db8::1:443"], "", "ambiguous"),
    (["up"], "vcpus: 0\n", "vcpus must be between 1 and 64"),
    (["up"], "vcpus: -1\n", "vcpus must be between 1 and 64"),
    (["up"], "boot_timeout: -5\n", "boot_timeout"),
    (["up", "--memory", "0"], "", "--memory (MiB) must be between"),
    (["up", "--memory", "99999999"], "", "--memory (MiB) must be between"),
    (["up", "--vcpus", "0"], "", "--vcpus must be between"),
    (["up", "--vcpus", "1000"], "", "--vcpus must be between"),
    (["up", "--policy", "/"], "", "is a directory"),
    (["up", "--xdebug", "everything"], "", "--xdebug 'everything'"),
    (["run", "--timeout", "0", "x.php"], "", "--timeout 0"),
    (["run", "--timeout", "-3", "x.php"], "", "--timeout -3"),
    (["run", "--debug-port", "70000", "x.php"], "", "--debug-port must be between 1 and 65535"),
    (["run", "--debug-port", "0", "x.php"], "", "--debug-port must be between 1 and 65535"),
    (["run", "--xdebug", "nope", "x.php"], "", "--xdebug 'nope'"),
    (["destroy", "--name", "a\n"], "", "invalid sandbox name"),
]


@pytest.mark.parametrize(("args", "config", "message"), CASES)
def test_bad_input_is_exit_2_and_creates_nothing(
    tmp_path: Path, args: list[str], config: str, message: str
) -> None:
    result = sandbox(tmp_path, *args, config=config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    state = tmp_path / "state" / "sandbox"
    assert not state.exists() or not [p for p in state.iterdir() if p.is_dir()]

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
    (["up", "--allow", "2001:db8::1:443"], "", "ambiguous: write [2001:db8::1]:443"),
    (["up"], "vcpus: 0\n", "vcpus must be between 1 and 64"),
    (["up"], "vcpus: -1\n", "vcpus must be between 1 and 64"),
    (["up"], "boot_timeout: -5\n", "boot_timeout"),
    (["up"], "boot_timeout: 0\n", "boot_timeout (s) must be between"),
    (["up"], "boot_timeout: .nan\n", "boot_timeout (s) must be between"),
    (["up"], "vcpus: true\n", "vcpus must be a int"),
    (["up"], "memory: 64\n", "memory (MiB) must be between"),
    (["up"], "memory: 4194304\n", "memory (MiB) must be between"),
    (["up", "--allow", "203.0.113.7:\uff18\uff10"], "", "is not a number"),
    (["up", "--allow", "203.0.113.7:70000"], "", "out of range"),
    (["up", "--allow", "tcp:::1:80"], "", "ambiguous"),
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
    assert "hint:" in result.stderr, result.stderr  # every refusal says what to do instead
    state = tmp_path / "state" / "sandbox"
    assert not state.exists() or not [p for p in state.iterdir() if p.is_dir()]


def test_error_messages_show_input_escaped(tmp_path: Path) -> None:
    """The error boundary prints the message as text: an ESC or C1 CSI in a path is shown as an
    escape, and markup in it is printed literally (it would vanish as markup)."""
    odd = tmp_path / "\x1b[2J\x9b31m[bold]x[red]"  # no "/": it is a directory name
    odd.mkdir()
    result = sandbox(tmp_path, "up", "--policy", str(odd))
    assert result.returncode == 2, result.stderr
    assert "\x1b" not in result.stderr and "\x9b" not in result.stderr, result.stderr
    assert "[bold]x[red]" in result.stderr and "is a directory" in result.stderr, result.stderr

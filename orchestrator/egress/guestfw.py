"""The guest's firewall over SSH: push the policy's rules, and the one check that the guest still
holds them (after the push, before every run, at every collection). The rules themselves are
rendered by firewall.py; this module is the edge that loads and reads them back."""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from orchestrator.egress import firewall
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import GuestError
from orchestrator.vm.domain import NetworkSpec

if TYPE_CHECKING:
    from orchestrator.vm.guest import Guest

# How many differing lines an error shows: the rest is in `sandbox policy show`.
_DIFF_LINES = 10


# Between the rules' read-back and the output of `apply`'s `then` command; after that output
# if the command failed (then its exit status).
_THEN = "@@then"
THEN_FAILED = "@@then-failed"


def _printf_escaped(data: bytes) -> str:
    """`data` as an argument of printf's %b: printable ASCII as itself, every other byte (and the
    backslash) as an octal escape, so any content survives the shell unchanged."""
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\0{b:03o}" for b in data)


def files_script(files: Mapping[str, str]) -> list[str]:
    """Shell lines that write files into the guest (mode 0644), contents inline. printf is a
    shell builtin: under TCG each extra process costs tens of milliseconds, so all files take
    two processes (one mkdir, one chmod) whatever their number."""
    if not files:
        return []
    ordered = sorted(files.items())
    dirs = sorted({os.path.dirname(path) for path, _ in ordered})
    lines = ["mkdir -p " + " ".join(shlex.quote(d) for d in dirs)]
    for path, content in ordered:
        escaped = _printf_escaped(content.encode())
        lines.append(f"printf '%b' {shlex.quote(escaped)} > {shlex.quote(path)}")
    lines.append("chmod 0644 " + " ".join(shlex.quote(path) for path, _ in ordered))
    return lines


def render(policy: EgressPolicy, net: NetworkSpec) -> dict[int, str]:
    """The filter tables the guest must hold for this policy, per IP version."""
    policy = policy.with_sinkhole(net.gateway)
    return {
        version: firewall.render_rules(
            policy, version=version, resolver=net.gateway, resolver6=net.gateway6
        )
        for version in (4, 6)
    }


def require(expected: Mapping[int, str], printed: str, *, when: str, hint: str) -> None:
    """Fail unless `printed` (the output of firewall.save_script) holds exactly `expected`."""
    for version, diff in sorted(firewall.mismatches(expected, printed).items()):
        raise GuestError(
            f"the guest's IPv{version} firewall {when}:\n" + "\n".join(diff[:_DIFF_LINES]),
            hint,
        )


def apply(
    guest: Guest,
    rules: Mapping[int, str],
    *,
    files: Mapping[str, str] | None = None,
    commands: Sequence[Sequence[str]] = (),
    then: Sequence[str] = (),
) -> str:
    """Load the rules with iptables-restore (each family atomically), read them back and fail
    unless the kernel holds exactly what was meant; write `files` and run `commands` (argv)
    first, and `then` (argv) last: its output (stdout and stderr) is returned, followed by a
    THEN_FAILED line if it failed. One SSH round trip: under TCG every extra channel costs a
    noticeable part of a second."""
    restore4, restore6 = (firewall.restore_commands(v)[0] for v in (4, 6))
    script = "\n".join(
        [
            "set -e",
            *files_script(files or {}),
            *(shlex.join(argv) for argv in commands),
            f"{shlex.join(restore4)} <<'SANDBOX_RULES_V4'",
            rules[4].rstrip("\n"),
            "SANDBOX_RULES_V4",
            f"{shlex.join(restore6)} <<'SANDBOX_RULES_V6'",
            rules[6].rstrip("\n"),
            "SANDBOX_RULES_V6",
            *firewall.save_script(),
        ]
    )
    if then:
        script += f"\necho {_THEN}\n{shlex.join(then)} 2>&1 || echo {THEN_FAILED} $?"
    printed, _, after = guest.check(["sh", "-c", script], timeout=60).partition(_THEN + "\n")
    require(
        rules,
        printed,
        when="differs from the policy after loading it",
        hint="something in the guest changed the rules; destroy the sandbox and report this",
    )
    return after


def read_back(guest: Guest) -> str:
    """Both filter tables as the guest holds them now, for `require` or `readback_state`."""
    return guest.check(["sh", "-c", "\n".join(firewall.save_script())], timeout=30)


def readback_state(expected: Mapping[int, str], printed: str) -> tuple[str, dict[int, list[str]]]:
    """("intact" or "changed DIGEST", what differs) for the guest's firewall as printed by
    firewall.save_script. The digest is of what differs, not of the whole output: its chain
    counters move at every collection, and one change would be a new row each time."""
    diff = firewall.mismatches(expected, printed)
    if not diff:
        return "intact", diff
    return f"changed {hashlib.sha256(repr(sorted(diff.items())).encode()).hexdigest()[:16]}", diff

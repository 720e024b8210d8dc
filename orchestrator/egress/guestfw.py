"""The guest's firewall over SSH: push the policy's rules, and the one check that the guest still
holds them (after the push, before every run, at every collection). The rules themselves are
rendered by firewall.py; this module is the edge that loads and reads them back."""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from orchestrator.egress import firewall
from orchestrator.egress.policy import EgressPolicy
from orchestrator.errors import GuestError
from orchestrator.vm.domain import NetworkSpec

if TYPE_CHECKING:
    from orchestrator.vm.guest import Guest

# How many differing lines an error shows: the rest is in `sandbox policy show`.
_DIFF_LINES = 10


def files_script(files: Mapping[str, str]) -> list[str]:
    """Shell lines that write files into the guest (mode 0644), contents inline. Two commands
    in all (mkdir, chmod): the contents go through the shell's builtin printf, since under TCG
    every program started costs a noticeable part of a second's tenth."""
    if not files:
        return []
    paths = sorted(files)
    directories = sorted({os.path.dirname(path) for path in paths})
    return [
        f"mkdir -p {shlex.join(directories)}",
        *(f"printf '%s' {shlex.quote(files[path])} > {shlex.quote(path)}" for path in paths),
        f"chmod 0644 {shlex.join(paths)}",
    ]


def render(policy: EgressPolicy, net: NetworkSpec) -> dict[int, str]:
    """The filter tables the guest must hold for this policy, per IP version."""
    policy = policy.with_sinkhole(net.gateway)
    return {
        version: firewall.render_rules(
            policy, version=version, resolver=net.gateway, resolver6=net.gateway6
        )
        for version in (4, 6)
    }


def require(
    expected: Mapping[int, str],
    printed: str,
    *,
    when: str,
    hint: str,
    handed_out: Collection[str] = (),
) -> None:
    """Fail unless `printed` (the output of firewall.save_script) holds exactly `expected`, and
    of the wildcard resolver's rules only `handed_out` (firewall.differences)."""
    for version, diff in sorted(firewall.mismatches(expected, printed, handed_out).items()):
        raise GuestError(
            f"the guest's IPv{version} firewall {when}:\n" + "\n".join(diff[:_DIFF_LINES]),
            hint,
        )


# Between the read-back and the output of `apply`'s `then`.
_THEN = "@@then"


def apply(
    guest: Guest,
    rules: Mapping[int, str],
    *,
    files: Mapping[str, str] | None = None,
    commands: Sequence[Sequence[str]] = (),
    then: str | None = None,
    preloaded: bool = False,
    marker: str | None = None,
) -> tuple[int, str]:
    """Load the rules with iptables-restore (each family atomically), read them back and fail
    unless the kernel holds exactly what was meant; write `files` and run `commands` (argv)
    first; then run the shell `then` (in a subshell, stderr with stdout). One SSH round trip:
    under TCG every extra channel costs a noticeable part of a second. Returns `then`'s exit
    status and output.

    `preloaded`: the guest may hold these very rules already, loaded at boot from its seed
    (`marker`, POLICY_MARKER by default, says so, with their digests): then they are only read
    back. Each iptables-restore costs 0.1-0.2 s under TCG."""
    restore4, restore6 = (firewall.restore_commands(v)[0] for v in (4, 6))
    restore = [
        f"{shlex.join(restore4)} <<'SANDBOX_RULES_V4'",
        rules[4].rstrip("\n"),
        "SANDBOX_RULES_V4",
        f"{shlex.join(restore6)} <<'SANDBOX_RULES_V6'",
        rules[6].rstrip("\n"),
        "SANDBOX_RULES_V6",
    ]
    writes = files_script(files or {})
    if preloaded:
        # `read`, `[` and `:` are builtins: no program started when the rules are in place.
        restore = [
            f"loaded=; read -r loaded < {shlex.quote(marker or POLICY_MARKER)} || :",
            f'if [ "$loaded" != {shlex.quote(marker_line(rules))} ]; then',
            *restore,
            "fi",
        ]
        if writes:
            # cloud-init wrote them from the seed before sshd started (`[` is a builtin).
            present = " && ".join(f"[ -f {shlex.quote(path)} ]" for path in sorted(files or {}))
            writes = [f"if ! {{ {present}; }}; then", *writes, "fi"]
    save4, split, save6 = firewall.save_script()
    # Two vCPUs: the IPv6 table is read back (0.1-0.4 s under TCG) while the IPv4 one is and
    # `then` runs, into a file of /run (read back through builtins only).
    readback = [f"{save6} > {READBACK_SCRATCH} & saving6=$!", save4]
    if then is not None:
        readback.append(f"status=0; output=$( ( {then} ) 2>&1 ) || status=$?")
    readback += [
        split,
        "wait $saving6",
        'while IFS= read -r line || [ -n "$line" ]; do',
        "    printf '%s\\n' \"$line\"",
        f"done < {READBACK_SCRATCH}",
    ]
    if then is not None:
        readback += [f"echo {_THEN}", "printf '%s\\n' \"$output\"", "echo $status"]
    script = "\n".join(
        ["set -e", *writes, *(shlex.join(argv) for argv in commands), *restore, *readback]
    )
    printed = guest.check(["sh", "-c", script], timeout=60)
    saved, found, after = printed.partition(f"\n{_THEN}\n")
    require(
        rules,
        saved + "\n" if found else printed,
        when="differs from the policy after loading it",
        hint="something in the guest changed the rules; destroy the sandbox and report this",
    )
    if then is None:
        return 0, ""
    output, _, status = after.rstrip("\n").rpartition("\n")
    return (int(status) if status.isdigit() else 1), output


# Where `apply` has the guest's IPv6 table read back into while it reads the IPv4 one: /run is a
# tmpfs of root's, there at every boot.
READBACK_SCRATCH = "/run/sandbox-readback6"

# Written at boot by images/rootfs/usr/lib/sandbox/seed-policy: `loaded SHA256_V4 SHA256_V6` of
# the rules it loaded from the seed (cloudinit.POLICY_FILES), else why not (`none`, `failed`).
POLICY_MARKER = "/run/sandbox/seed-policy"


def marker_line(rules: Mapping[int, str]) -> str:
    """POLICY_MARKER's line when the guest loaded exactly these rules at boot: sha256sum's
    digests of the files the seed carries."""
    digests = (hashlib.sha256(rules[version].encode()).hexdigest() for version in (4, 6))
    return "loaded " + " ".join(digests)


def read_back(guest: Guest) -> str:
    """Both filter tables as the guest holds them now, for `require` or `readback_state`."""
    return guest.check(["sh", "-c", "\n".join(firewall.save_script())], timeout=30)


def readback_state(
    expected: Mapping[int, str], printed: str, handed_out: Collection[str] = ()
) -> tuple[str, dict[int, list[str]]]:
    """("intact" or "changed DIGEST", what differs) for the guest's firewall as printed by
    firewall.save_script. The digest is of what differs, not of the whole output: its chain
    counters move at every collection, and one change would be a new row each time."""
    diff = firewall.mismatches(expected, printed, handed_out)
    if not diff:
        return "intact", diff
    return f"changed {hashlib.sha256(repr(sorted(diff.items())).encode()).hexdigest()[:16]}", diff

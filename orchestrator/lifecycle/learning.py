"""Learn mode's edges: whether a sandbox's logs come from a learn-mode sandbox, and in which mode
(allow-all or under the sinkhole), and `sandbox policy suggest` (egress/suggest.py) over its
stored records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator import jsontext, paths
from orchestrator.capture import logview
from orchestrator.egress import suggest
from orchestrator.egress.policy import (
    LEARN_SINKHOLE_NOTE,
    LEARN_WARNING,
    IPNetwork,
    Learn,
    load_policy_file,
)
from orchestrator.errors import SandboxError
from orchestrator.files import atomic_write
from orchestrator.lifecycle.collection import last_run_id, refresh_logs, require_logs
from orchestrator.lifecycle.context import Context, logs_dir


def learned(ctx: Context, name: str) -> bool:
    """Whether sandbox `name`'s logs hold records made in learn mode (kept past destroy)."""
    return (logs_dir(ctx, name) / paths.LEARN_RECORD).exists()


def learned_mode(ctx: Context, name: str) -> Learn:
    """The learn mode sandbox `name`'s logs were made in (OFF: not in learn mode). A record
    that cannot be read, or names no mode this version knows, counts as ALLOW_ALL: the loud
    warning is the safe side of a doubt."""
    try:
        text = (logs_dir(ctx, name) / paths.LEARN_RECORD).read_text(errors="replace")
    except FileNotFoundError:
        return Learn.OFF
    except OSError:
        return Learn.ALLOW_ALL
    value = (jsontext.object_or_none(text) or {}).get("learn")
    try:
        mode = Learn(value)
    except ValueError:
        return Learn.ALLOW_ALL
    return Learn.ALLOW_ALL if mode is Learn.OFF else mode


def learn_warning(name: str, mode: Learn = Learn.ALLOW_ALL) -> str:
    """What the CLI says of a learn-mode sandbox: a warning to shout under allow-all, a plain
    note under the sinkhole (nothing was let out)."""
    if mode is Learn.SINKHOLE:
        return f"sandbox {name!r}: {LEARN_SINKHOLE_NOTE}"
    return f"sandbox {name!r}: {LEARN_WARNING}"


def own_ranges(ctx: Context) -> tuple[IPNetwork, ...]:
    """The sandbox networks' ranges: `up --policy` refuses entries inside them (make_policy)."""
    net = ctx.settings.network
    return tuple(r for r in (net.subnets, net.subnets6) if r is not None)


def suggest_policy(
    ctx: Context, name: str, run: str | None, on_warning: Callable[[str], None]
) -> str:
    """The YAML text of a policy that allows what sandbox `name` (or one of its runs) tried."""
    require_logs(ctx, name)
    refresh_logs(ctx, name, on_warning)
    run_id = last_run_id(ctx, name) if run == "last" else run
    chosen = logview.Filter.from_options(run=run_id, probes=False)
    attempts = logview.apply(chosen, logview.read_attempts(logs_dir(ctx, name)))
    mode = learned_mode(ctx, name)
    if mode is Learn.OFF:
        made = (
            "; these logs were not made in learn mode: what the policy then in force blocked "
            "stops short (a blocked lookup ends a program early)"
        )
    elif mode is Learn.SINKHOLE:
        made = (
            "; made in learn mode under the sinkhole: names as the software resolved them, "
            "nothing it sent left the machine"
        )
    else:
        made = "; made in learn mode (allow-all)"
    header = [
        f"sandbox policy suggest: sandbox {name}" + (f", run {run_id}" if run_id else ""),
        f"from {len(attempts)} recorded attempt(s){made}",
        "review it, then: sandbox up --policy FILE",
    ]
    return suggest.render(suggest.suggest(attempts, inside=own_ranges(ctx)), header)


def write_policy(text: str, path: Path) -> None:
    """Write a suggested policy, and check it loads as `up --policy` will load it."""
    atomic_write(path, text, mode=0o644)
    try:
        load_policy_file(path)
    except SandboxError as exc:  # a bug of ours, never the user's: say so plainly
        raise SandboxError(
            f"the suggested policy in {path} does not load: {exc.message}",
            "report this as a bug; edit the file meanwhile",
        ) from None

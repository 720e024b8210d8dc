"""Learn mode's edges: whether a sandbox's logs come from a learn-mode (allow-all) sandbox, and
`sandbox policy suggest` (egress/suggest.py) over its stored records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator import paths
from orchestrator.capture import logview
from orchestrator.egress import suggest
from orchestrator.egress.policy import LEARN_WARNING, load_policy_file
from orchestrator.errors import SandboxError
from orchestrator.files import atomic_write
from orchestrator.lifecycle.collection import last_run_id, refresh_logs, require_logs
from orchestrator.lifecycle.context import Context, logs_dir


def learned(ctx: Context, name: str) -> bool:
    """Whether sandbox `name`'s logs hold records made in learn mode (kept past destroy)."""
    return (logs_dir(ctx, name) / paths.LEARN_RECORD).exists()


def learn_warning(name: str) -> str:
    return f"sandbox {name!r}: {LEARN_WARNING}"


def suggest_policy(
    ctx: Context, name: str, run: str | None, on_warning: Callable[[str], None]
) -> str:
    """The YAML text of a policy that allows what sandbox `name` (or one of its runs) tried."""
    require_logs(ctx, name)
    refresh_logs(ctx, name, on_warning)
    run_id = last_run_id(ctx, name) if run == "last" else run
    chosen = logview.Filter.from_options(run=run_id, probes=False)
    attempts = logview.apply(chosen, logview.read_attempts(logs_dir(ctx, name)))
    header = [
        f"sandbox policy suggest: sandbox {name}" + (f", run {run_id}" if run_id else ""),
        f"from {len(attempts)} recorded attempt(s)"
        + (
            ""
            if learned(ctx, name)
            else "; these logs were not made in learn mode: what the "
            "policy then in force blocked stops short (a blocked lookup ends a program early)"
        ),
        "review it, then: sandbox up --policy FILE",
    ]
    return suggest.render(suggest.suggest(attempts), header)


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

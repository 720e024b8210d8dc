"""`sandbox report`: which run is meant, its records brought home if its sandbox is up, the report
built (capture/report.py) and written.

How a run is named. A run id (`20261205-205013-a315`: the guest's clock and 16 random bits) is
unique in practice, and a sandbox's logs outlive it, so a run is named across sandboxes as
`[SANDBOX:]RUN`: RUN is a run id or `last`. Without SANDBOX, `last` is the last run of the
sandbox `--name` gives (default "default"), and an id is looked for in that sandbox's logs first,
then in the logs of every sandbox, destroyed ones included; an id two sandboxes both hold must be
given with its SANDBOX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator import paths
from orchestrator.capture import logview
from orchestrator.capture import report as reports
from orchestrator.errors import NotFoundError, UsageError
from orchestrator.files import atomic_write
from orchestrator.lifecycle.collection import last_run_id, refresh_logs, require_logs
from orchestrator.lifecycle.context import Context, logs_dir
from orchestrator.run import target as runs
from orchestrator.state import NAME_RE, validate_name


@dataclass(frozen=True)
class RunName:
    sandbox: str
    run: str  # a run id


def _sandboxes_with_logs(ctx: Context) -> list[str]:
    root = ctx.dirs.state
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if NAME_RE.fullmatch(p.name) and (p / paths.LOGS_DIR).is_dir()
    )


def _has_run(ctx: Context, sandbox: str, run_id: str) -> bool:
    return (logs_dir(ctx, sandbox) / paths.RUNS_DIR / run_id / paths.RUN_FILE).is_file()


def resolve_run(ctx: Context, spec: str, default_sandbox: str) -> RunName:
    """The run `spec` ([SANDBOX:]RUN, see the module's doc) names."""
    sandbox, sep, run_id = spec.rpartition(":")
    if sep:
        validate_name(sandbox)
    if not run_id:
        raise UsageError(f"run {spec!r}", "name a run as RUN_ID, last, or SANDBOX:RUN_ID")
    if run_id != "last" and not runs.is_run_id(run_id):
        raise UsageError(
            f"{run_id!r} is not a run id",
            "run ids look like 20261205-205013-a315 (see `sandbox run`'s last line), or use last",
        )
    home = sandbox or default_sandbox
    if run_id == "last":
        require_logs(ctx, home)
        return RunName(home, last_run_id(ctx, home))
    if sandbox or _has_run(ctx, home, run_id):
        if not _has_run(ctx, home, run_id):
            raise NotFoundError(
                f"sandbox {home!r} has no run {run_id}",
                f"list its runs with `ls {logs_dir(ctx, home) / paths.RUNS_DIR}`",
            )
        return RunName(home, run_id)
    holders = [name for name in _sandboxes_with_logs(ctx) if _has_run(ctx, name, run_id)]
    if not holders:
        raise NotFoundError(
            f"no sandbox's logs hold run {run_id}",
            "check the id (`sandbox run` printed it), or the state directory (XDG_STATE_HOME)",
        )
    if len(holders) > 1:
        raise UsageError(
            f"run {run_id} is in the logs of sandboxes {', '.join(holders)}",
            f"say which: {holders[0]}:{run_id}",
        )
    return RunName(holders[0], run_id)


def _record(ctx: Context, name: RunName) -> runs.RunRecord:
    for record in runs.load_records(logs_dir(ctx, name.sandbox)):
        if record.id == name.run:
            return record
    raise NotFoundError(
        f"the record of run {name.run} in sandbox {name.sandbox!r} is damaged",
        f"see {logs_dir(ctx, name.sandbox) / paths.RUNS_DIR / name.run / paths.RUN_FILE}",
    )


def run_report(
    ctx: Context, spec: str, default_sandbox: str, on_warning: Callable[[str], None]
) -> reports.Report:
    """The report of the run `spec` names, its sandbox's records collected first if it is up."""
    name = resolve_run(ctx, spec, default_sandbox)
    refresh_logs(ctx, name.sandbox, on_warning)
    directory = logs_dir(ctx, name.sandbox)
    return reports.build(
        name.sandbox,
        _record(ctx, name),
        logview.read_attempts(directory),
        logview.read_dns(directory),
    )


def diff_runs(
    ctx: Context, spec_a: str, spec_b: str, default_sandbox: str, on_warning: Callable[[str], None]
) -> reports.Diff:
    """`sandbox report --diff A B`: run B's destinations against run A's. Each is a run
    ([SANDBOX:]RUN) or a report saved with `--json` (a FILE.json: a run id never ends so)."""

    def load(spec: str) -> reports.Report:
        if spec.endswith(".json"):
            path = Path(spec)
            try:
                data = path.read_bytes()
            except OSError as error:
                raise NotFoundError(
                    f"cannot read the report {spec}: {error.strerror}", reports.REPORT_HINT
                ) from None
            return reports.from_json(data, spec)
        return run_report(ctx, spec, default_sandbox, on_warning)

    return reports.diff(load(spec_a), load(spec_b))


def save_report(
    model: reports.Report | reports.Diff, *, html: Path | None = None, json: Path | None = None
) -> list[Path]:
    """Write the report's HTML and JSON files (atomically, readable by others: it is meant to be
    shared); the diff has JSON only. Returns the files written."""
    written = []
    if html is not None:
        if not isinstance(model, reports.Report):
            raise UsageError("--html with --diff", "the diff is a table or JSON: use --json FILE")
        atomic_write(html, reports.render_html(model), mode=0o644)
        written.append(html)
    if json is not None:
        atomic_write(json, reports.to_json(model), mode=0o644)
        written.append(json)
    return written

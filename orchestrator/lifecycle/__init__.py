"""The verbs, one module each: `up` (build.py: named steps, each with its rollback), `destroy`
(teardown.py), `status`, `list` and `policy show` (status.py), `exec`, `run`, `ssh` and sockets
(access.py), `run --rm` (oneshot.py), `warm` (warm.py: VMs booted ahead for `up`), `report`
(reporting.py), and the one pipeline that brings connection records home (collection.py).
context.py is what they share. The CLI calls only what is exported here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.lifecycle.access import (
        RunOutcome,
        ServeOutcome,
        exec_command,
        run_target,
        serve_target,
        sockets,
        ssh_argv,
    )
    from orchestrator.lifecycle.build import make_policy, up
    from orchestrator.lifecycle.collection import (
        CollectReport,
        HostFlowReport,
        collect,
        collect_quietly,
        host_flows,
        last_run_id,
        purge_logs,
        read_logs,
        recorded_losses,
        refresh_logs,
        require_logs,
    )
    from orchestrator.lifecycle.context import (
        Context,
        QuietReporter,
        Reporter,
        logs_dir,
        open_guest,
        ready_state,
    )
    from orchestrator.lifecycle.learning import (
        learn_warning,
        learned,
        learned_mode,
        suggest_policy,
        write_policy,
    )
    from orchestrator.lifecycle.oneshot import OneShotOutcome, run_once
    from orchestrator.lifecycle.reporting import (
        RunName,
        diff_runs,
        resolve_run,
        run_report,
        save_report,
    )
    from orchestrator.lifecycle.status import (
        HostDown,
        Listing,
        PolicyReport,
        Status,
        inspect,
        list_status,
        policy_report,
    )
    from orchestrator.lifecycle.teardown import DestroyReport, destroy, destroy_all, known_names
    from orchestrator.lifecycle.warm import FillReport, WarmStatus
    from orchestrator.lifecycle.warm import drain as warm_drain
    from orchestrator.lifecycle.warm import fill as warm_fill
    from orchestrator.lifecycle.warm import status as warm_status

# Imported when first used (PEP 562): each verb loads only its own modules, so `sandbox up` does
# not pay for the collection pipeline's imports (packet parsing, the capture protocol) at start.
_EXPORTS: dict[str, tuple[str, str]] = {
    "CollectReport": ("collection", "CollectReport"),
    "Context": ("context", "Context"),
    "DestroyReport": ("teardown", "DestroyReport"),
    "FillReport": ("warm", "FillReport"),
    "HostDown": ("status", "HostDown"),
    "HostFlowReport": ("collection", "HostFlowReport"),
    "Listing": ("status", "Listing"),
    "OneShotOutcome": ("oneshot", "OneShotOutcome"),
    "PolicyReport": ("status", "PolicyReport"),
    "QuietReporter": ("context", "QuietReporter"),
    "Reporter": ("context", "Reporter"),
    "RunName": ("reporting", "RunName"),
    "RunOutcome": ("access", "RunOutcome"),
    "ServeOutcome": ("access", "ServeOutcome"),
    "Status": ("status", "Status"),
    "WarmStatus": ("warm", "WarmStatus"),
    "collect": ("collection", "collect"),
    "collect_quietly": ("collection", "collect_quietly"),
    "destroy": ("teardown", "destroy"),
    "destroy_all": ("teardown", "destroy_all"),
    "diff_runs": ("reporting", "diff_runs"),
    "exec_command": ("access", "exec_command"),
    "host_flows": ("collection", "host_flows"),
    "inspect": ("status", "inspect"),
    "known_names": ("teardown", "known_names"),
    "last_run_id": ("collection", "last_run_id"),
    "learn_warning": ("learning", "learn_warning"),
    "learned": ("learning", "learned"),
    "learned_mode": ("learning", "learned_mode"),
    "list_status": ("status", "list_status"),
    "logs_dir": ("context", "logs_dir"),
    "make_policy": ("build", "make_policy"),
    "open_guest": ("context", "open_guest"),
    "policy_report": ("status", "policy_report"),
    "purge_logs": ("collection", "purge_logs"),
    "read_logs": ("collection", "read_logs"),
    "ready_state": ("context", "ready_state"),
    "recorded_losses": ("collection", "recorded_losses"),
    "refresh_logs": ("collection", "refresh_logs"),
    "require_logs": ("collection", "require_logs"),
    "resolve_run": ("reporting", "resolve_run"),
    "run_once": ("oneshot", "run_once"),
    "run_report": ("reporting", "run_report"),
    "run_target": ("access", "run_target"),
    "save_report": ("reporting", "save_report"),
    "serve_target": ("access", "serve_target"),
    "sockets": ("access", "sockets"),
    "ssh_argv": ("access", "ssh_argv"),
    "suggest_policy": ("learning", "suggest_policy"),
    "up": ("build", "up"),
    "warm_drain": ("warm", "drain"),
    "warm_fill": ("warm", "fill"),
    "warm_status": ("warm", "status"),
    "write_policy": ("learning", "write_policy"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


__all__ = [
    "CollectReport",
    "Context",
    "DestroyReport",
    "FillReport",
    "HostDown",
    "HostFlowReport",
    "Listing",
    "OneShotOutcome",
    "PolicyReport",
    "QuietReporter",
    "Reporter",
    "RunName",
    "RunOutcome",
    "ServeOutcome",
    "Status",
    "WarmStatus",
    "collect",
    "collect_quietly",
    "destroy",
    "destroy_all",
    "diff_runs",
    "exec_command",
    "host_flows",
    "inspect",
    "known_names",
    "last_run_id",
    "learn_warning",
    "learned",
    "learned_mode",
    "list_status",
    "logs_dir",
    "make_policy",
    "open_guest",
    "policy_report",
    "purge_logs",
    "read_logs",
    "ready_state",
    "recorded_losses",
    "refresh_logs",
    "require_logs",
    "resolve_run",
    "run_once",
    "run_report",
    "run_target",
    "save_report",
    "serve_target",
    "sockets",
    "ssh_argv",
    "suggest_policy",
    "up",
    "warm_drain",
    "warm_fill",
    "warm_status",
    "write_policy",
]

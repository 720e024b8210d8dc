"""The verbs, one module each: `up` (build.py: named steps, each with its rollback), `destroy`
(teardown.py), `status`, `list` and `policy show` (status.py), `exec`, `run`, `ssh` and sockets
(access.py), `run --rm` (oneshot.py), `warm` (warm.py: VMs booted ahead for `up`), `report`
(reporting.py), and the one pipeline that brings connection records home (collection.py).
context.py is what they share. The CLI calls only what is exported here."""

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
from orchestrator.lifecycle.learning import learn_warning, learned, suggest_policy, write_policy
from orchestrator.lifecycle.oneshot import OneShotOutcome, run_once
from orchestrator.lifecycle.reporting import (
    RunName,
    diff_runs,
    resolve_run,
    run_report,
    save_report,
)
from orchestrator.lifecycle.status import PolicyReport, Status, inspect, list_status, policy_report
from orchestrator.lifecycle.teardown import DestroyReport, destroy, destroy_all, known_names
from orchestrator.lifecycle.warm import FillReport, WarmStatus
from orchestrator.lifecycle.warm import drain as warm_drain
from orchestrator.lifecycle.warm import fill as warm_fill
from orchestrator.lifecycle.warm import status as warm_status

__all__ = [
    "CollectReport",
    "Context",
    "DestroyReport",
    "FillReport",
    "HostFlowReport",
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

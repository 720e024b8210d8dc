"""`sandbox run`: the target software in the guest, in a cgroup of its own, as an unprivileged
user; its output streamed, its exit code passed back, its xdebug output fetched and its connection
attempts tied to the run and (for PHP) to the source line that made them.

The pure half (what to upload, the guest's shell script, which attempt belongs to which run) is
tested on its own; `execute` is the edge that talks SSH.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import jsontext, paths
from orchestrator.capture.records import Attempt, guest_seconds, parse_time
from orchestrator.config import Limits
from orchestrator.errors import (
    NotFoundError,
    OutputTooLarge,
    SandboxError,
    TimeoutExpired,
    UsageError,
)
from orchestrator.files import atomic_write
from orchestrator.run import xdebug

if TYPE_CHECKING:
    from orchestrator.vm.guest import Guest

RUN_USER = "sandbox"  # made by the image recipe (images/customize.sh), uid 1000
RUN_UID = 1000
EXIT_TIMEOUT = 124  # what timeout(1) returns: scripts around `sandbox run` know it
EXIT_INTERRUPTED = 130  # a shell's code for a command ended by Ctrl-C (128 + SIGINT)
# Every run gets a scope unit in this slice, so its cgroup is at a known path and the whole
# process tree (double-forked daemons included) can be killed with one write to cgroup.kill.
SLICE = "sandbox.slice"
_UPLOAD_TAR = ".sandbox-upload.tar"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{4}\Z")
# A record of a run that ended may still be on its way (the firewall's and connect()'s halves
# meet within monitor's settle window): attempts this long after the end still count as the run's.
_AFTER_END = 5.0


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for. `php` runs argv[0] as a PHP script; otherwise argv is a command
    (a local executable when it names a local file with a '/', else a command in the image)."""

    argv: tuple[str, ...]
    php: bool
    workdir: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    root: bool = False
    timeout: float | None = None
    xdebug: xdebug.XdebugMode | None = None  # None: the sandbox's default (set at `up`)
    debug_port: int = 9003
    # Files of ours written into the guest (mode 0644) before the target starts: guest path
    # (relative: in the run's directory) -> text.
    extra_files: tuple[tuple[str, str], ...] = ()
    # Ctrl-C is how the target is meant to end (`sandbox serve`): it stops the target and the
    # run finishes as if the target had exited (outputs fetched, record kept), exit code 130.
    interrupt_ends: bool = False


@dataclass(frozen=True)
class Plan:
    """What to copy into the run's guest directory and what to start there."""

    upload_file: Path | None
    upload_dir: Path | None
    executable: bool  # upload_file is a program, not a script
    argv: tuple[str, ...]  # run in the run's guest directory


def parse_env(pairs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise UsageError(f"--env {pair!r}", "write --env NAME=VALUE (NAME: letters, digits, _)")
        parsed.append((key, value))
    return tuple(parsed)


def _inside(root: Path, candidate: Path) -> str | None:
    """candidate's path relative to root, if it is a file inside root."""
    try:
        rel = candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix() if candidate.is_file() else None


def plan(request: RunRequest) -> Plan:
    """Check the local files the request names and decide what to upload."""
    if not request.argv:
        raise UsageError(
            "nothing to run", "usage: sandbox run SCRIPT.php [ARGS...] or sandbox run -- CMD"
        )
    first, rest = request.argv[0], request.argv[1:]
    workdir = request.workdir
    if workdir is not None and not workdir.is_dir():
        raise NotFoundError(f"--workdir {workdir}: no such directory", "give a local directory")
    if workdir is not None:
        rel = _inside(workdir, workdir / first) or _inside(workdir, Path(first))
        if rel is None and (request.php or "/" in first):
            raise NotFoundError(
                f"{first!r} is not a file inside --workdir {workdir}",
                "name the entry point relative to the directory, e.g. index.php",
            )
        if rel is not None:
            entry = ("php", rel) if request.php else ("./" + rel,)
            return Plan(None, workdir, False, (*entry, *rest))
        return Plan(None, workdir, False, request.argv)
    local = Path(first)
    if request.php:
        if not local.is_file():
            raise NotFoundError(
                f"no such PHP script: {first}", "give the path of a local file to upload and run"
            )
        return Plan(local, None, False, ("php", local.name, *rest))
    if "/" in first and local.is_file():
        return Plan(local, None, True, ("./" + local.name, *rest))
    if "/" in first and not first.startswith("/"):
        raise NotFoundError(
            f"no such file: {first}",
            "give a local executable to upload, an absolute guest path, or a command in the image",
        )
    return Plan(None, None, False, request.argv)


def serve_request(
    workdir: Path,
    *,
    guest_port: int,
    docroot: str = ".",
    router: str | None = None,
    env: tuple[tuple[str, str], ...] = (),
    mode: xdebug.XdebugMode | None = None,
) -> RunRequest:
    """`sandbox serve`: PHP's built-in web server on the guest's loopback, serving `docroot`
    (and `router`, a script every request goes through) of the uploaded `workdir`. The serve
    prepend names each HTTP request in its trace (xdebug.SERVE_PREPEND)."""
    if not workdir.is_dir():
        raise NotFoundError(f"--workdir {workdir}: no such directory", "give a local directory")
    root = workdir.resolve()
    served = (root / docroot).resolve()
    if not served.is_dir() or not served.is_relative_to(root):
        raise NotFoundError(
            f"--docroot {docroot!r} is not a directory inside {workdir}",
            "give the web root relative to --workdir, e.g. public",
        )
    argv = [
        "php",
        "-d",
        f"auto_prepend_file={xdebug.SERVE_PREPEND_PATH}",
        "-S",
        f"127.0.0.1:{guest_port}",
        "-t",
        served.relative_to(root).as_posix(),
    ]
    files = [(xdebug.SERVE_PREPEND_PATH, xdebug.SERVE_PREPEND)]
    if router is not None:
        script = _inside(root, root / router)
        if script is None:
            raise NotFoundError(
                f"--router {router!r} is not a file inside {workdir}",
                "give the router script relative to --workdir, e.g. router.php",
            )
        # The server runs a router without the prepend: ours runs it, then the application's.
        argv.append(xdebug.SERVE_ROUTER)
        files.append((xdebug.SERVE_ROUTER, xdebug.serve_router(script)))
    return RunRequest(
        argv=tuple(argv),
        php=False,
        workdir=workdir,
        env=env,
        xdebug=mode,
        extra_files=tuple(files),
        interrupt_ends=True,
    )


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{secrets.token_hex(2)}"


def is_run_id(text: str) -> bool:
    """Whether `text` has the shape new_run_id gives (a directory name under logs/runs/)."""
    return bool(_RUN_ID.match(text))


def guest_dir(run_id: str) -> str:
    return posixpath.join(paths.GUEST_RUNS_DIR, run_id)


def unit(run_id: str) -> str:
    return f"sandbox-run-{run_id}.scope"


def cgroup(run_id: str) -> str:
    return f"/sys/fs/cgroup/{SLICE}/{unit(run_id)}"


def base_env(root: bool) -> dict[str, str]:
    """A clean environment: nothing of the SSH session or of the host leaks into the target."""
    home = "/root" if root else f"/home/{RUN_USER}"
    user = "root" if root else RUN_USER
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin"
        + (":/usr/local/sbin:/usr/sbin:/sbin" if root else ""),
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
    }


def prepare_script(run_id: str, *, root: bool, output_dir: str) -> str:
    """Make the run's directories (owned by the user who runs), then print the guest's clock and
    both firewall tables, so one round trip also checks that the policy is still in force."""
    from orchestrator.egress import firewall

    owner = (
        ""
        if root
        else f"chown {RUN_USER}:{RUN_USER} {shlex.quote(guest_dir(run_id))} "
        + (shlex.quote(output_dir))
    )
    lines = [
        "set -e",
        f"mkdir -p -m 0700 {shlex.quote(guest_dir(run_id))} {shlex.quote(output_dir)}",
        owner,
        "date +%s.%N",
        *firewall.save_script(),
    ]
    return "\n".join(line for line in lines if line)


def run_script(run_id: str, plan: Plan, env: Mapping[str, str], *, root: bool) -> str:
    """The guest shell script that starts the target: unpack, hand the files to the run user,
    then the target in its own scope, without privileges, in a clean environment. The script's
    exit status is the target's (128+N when a signal killed it)."""
    directory = shlex.quote(guest_dir(run_id))
    lines = ["set -e", f"cd {directory}"]
    if plan.upload_dir is not None:
        lines += [f"tar -x --no-same-owner -f {_UPLOAD_TAR}", f"rm -f {_UPLOAD_TAR}"]
    if not root:
        lines.append(f"chown -R {RUN_USER}:{RUN_USER} {directory}")
    command = [
        "systemd-run",
        "--scope",
        "--quiet",
        "--collect",
        f"--slice={SLICE}",
        f"--unit={unit(run_id)}",
        "--",
    ]
    if not root:
        # no_new_privs: setuid programs in the image cannot hand the target root (and with it
        # the means to flush the guest's own firewall).
        command += [
            "setpriv",
            f"--reuid={RUN_UID}",
            f"--regid={RUN_UID}",
            "--clear-groups",
            "--no-new-privs",
            "--",
        ]
    command += ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *plan.argv]
    # Not `exec`: the shell turns a death by signal into 128+N, which paramiko would lose.
    lines += ["set +e", shlex.join(command)]
    return "\n".join(lines)


def finish_script(run_id: str, output_dir: str) -> str:
    """Kill what the run left behind (daemons, background jobs) and say how many there were,
    print the guest's clock, then the names of the run's xdebug output files."""
    cg = shlex.quote(cgroup(run_id))
    return "\n".join(
        [
            f"n=0; if [ -f {cg}/cgroup.procs ]; then n=$(wc -l < {cg}/cgroup.procs);"
            f" [ $n -eq 0 ] || echo 1 > {cg}/cgroup.kill; fi",
            "echo $n",
            "date +%s.%N",
            f"find {shlex.quote(output_dir)} -maxdepth 1 -type f -printf '%f\\n'",
        ]
    )


def kill_command(run_id: str) -> str:
    cg = shlex.quote(cgroup(run_id))
    return f"[ ! -f {cg}/cgroup.kill ] || echo 1 > {cg}/cgroup.kill"


def upload_tar(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        # Owner names of the host mean nothing in the guest; the run user gets everything.
        tar.add(directory, arcname=".", filter=_anonymous)
    return buffer.getvalue()


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ---- the run's record on the host -----------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """logs/runs/<id>/run.json: what ran, when (guest clock), and how it ended."""

    id: str
    argv: tuple[str, ...]
    php: bool
    user: str
    xdebug: str
    started: float  # guest epoch seconds
    ended: float | None = None
    exit_code: int | None = None
    timed_out: bool = False
    leftovers: int = 0  # processes still running when the target exited, killed then
    # The sandbox's egress policy when the run started (EgressPolicy.to_dict()): the state that
    # holds it is gone at destroy, the run's record stays for `sandbox report`. None: a record
    # from before it was kept.
    policy: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = jsontext.known_fields(cls, jsontext.parse_object(text))
        data["argv"] = tuple(data["argv"])
        return cls(**data)

    def covers(self, moment: float) -> bool:
        end = self.ended if self.ended is not None else float("inf")
        return self.started - 0.5 <= moment <= end + _AFTER_END


def runs_dir(logs: Path) -> Path:
    return logs / paths.RUNS_DIR


def save_record(logs: Path, record: RunRecord) -> None:
    directory = runs_dir(logs) / record.id
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / paths.RUN_FILE, record.to_json())


def load_records(logs: Path) -> list[RunRecord]:
    found = []
    base = runs_dir(logs)
    if not base.is_dir():
        return []
    for entry in sorted(base.iterdir()):
        path = entry / paths.RUN_FILE
        if _RUN_ID.match(entry.name) and path.is_file():
            try:
                found.append(RunRecord.from_json(path.read_text()))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged record costs its run's attribution, not the log view
    return found


def _traces(logs: Path, run: RunRecord, limit: int) -> list[xdebug.Trace]:
    directory = runs_dir(logs) / run.id / paths.XDEBUG_DIR
    if not directory.is_dir():
        return []
    traces = []
    for path in sorted(directory.iterdir()):
        if xdebug.is_trace_name(path.name):
            try:
                traces.append(xdebug.parse_trace(path.read_bytes(), path.name, limit=limit))
            except xdebug.TraceError:
                continue  # a damaged trace costs its process's stacks, not the log view
    return traces


def _traced_pids(logs: Path, run: RunRecord) -> frozenset[int]:
    """The pids the run's fetched traces are named after (their names only: nothing is read)."""
    directory = runs_dir(logs) / run.id / paths.XDEBUG_DIR
    if not directory.is_dir():
        return frozenset()
    pids = (xdebug.trace_pid(path.name) for path in directory.iterdir())
    return frozenset(pid for pid in pids if pid is not None)


def annotate(
    attempts: Sequence[Attempt], logs: Path, *, limit: int = xdebug.MAX_DECOMPRESSED
) -> list[Attempt]:
    """Tie attempts to the runs that made them and, where an xdebug trace of the process exists,
    to the PHP frames that were running at that moment. Attempts already tied stay as they are,
    except those tied while their run was going (a collection during the run, before its traces
    were fetched): without a stack and with a trace of their process now there, they are
    attributed again.

    An attempt is a run's when its process is one the run's traces name, or when it was made by
    the run user (nobody else in the guest runs as that user) while only that run was going."""
    runs = load_records(logs)
    traced_pids = {run.id: _traced_pids(logs, run) for run in runs}
    pending = [
        a
        for a in attempts
        if a.run is None or (not a.stack and a.pid in traced_pids.get(a.run, ()))
    ]
    if not pending:
        return list(attempts)
    moments = {a.id: parse_time(a.time).timestamp() for a in pending}
    changed: dict[str, Attempt] = {}
    for run in runs:
        mine = [
            a for a in pending if a.run == run.id or (a.run is None and run.covers(moments[a.id]))
        ]
        if not mine:
            continue
        traces = _traces(logs, run, limit)
        traced = {t.pid for t in traces}
        others = [r for r in runs if r is not run]
        owned = [
            a
            for a in mine
            if a.run == run.id
            or a.pid in traced
            or (
                run.user == RUN_USER
                and a.uid == RUN_UID
                and not any(r.covers(moments[a.id]) for r in others)
            )
        ]
        for attempt in xdebug.name_requests(xdebug.attribute(owned, traces), traces):
            changed[attempt.id] = dataclasses.replace(attempt, run=run.id)
    return [changed.get(a.id, a) for a in attempts]


# ---- the edge ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    record: RunRecord
    fetched: tuple[Path, ...]  # xdebug traces, profiles and coverage on the host
    finished: float  # time.monotonic() when the run's processes were all gone
    skipped: tuple[str, ...] = ()  # output files refused (name, size), and why


_COUNT = re.compile(r"[0-9]{1,9}")


def execute(
    guest: Guest,
    request: RunRequest,
    *,
    logs: Path,
    expected_rules: Mapping[int, str],
    default_mode: xdebug.XdebugMode,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    on_warning: Callable[[str], None],
    limits: Limits | None = None,
    policy: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run the request in the guest behind `guest` and record it under `logs`, with `policy`
    (the sandbox's, EgressPolicy.to_dict()) as the one in force."""
    limits = limits or Limits()
    from orchestrator.egress import guestfw

    the_plan = plan(request)
    run_id = new_run_id()
    mode = request.xdebug or default_mode
    output_dir = xdebug.output_dir(run_id)
    prepared = guest.check(
        ["sh", "-c", prepare_script(run_id, root=request.root, output_dir=output_dir)],
        timeout=60,
    )
    clock, _, saved = prepared.partition("\n")
    from orchestrator.egress import wildcards

    guestfw.require(
        expected_rules,
        saved,
        handed_out=wildcards.handed_out_rules(logs),
        when="no longer matches the sandbox's policy",
        hint="something in the guest (an earlier --root run?) changed the rules; "
        "destroy the sandbox and create it again",
    )
    directory = guest_dir(run_id)
    if the_plan.upload_file is not None:
        guest.put(
            the_plan.upload_file,
            posixpath.join(directory, the_plan.upload_file.name),
            mode=0o755 if the_plan.executable else 0o644,
        )
    if the_plan.upload_dir is not None:
        guest.put_bytes(upload_tar(the_plan.upload_dir), posixpath.join(directory, _UPLOAD_TAR))
    if request.extra_files:
        files = {posixpath.join(directory, path): text for path, text in request.extra_files}
        guest.check(["sh", "-c", "\n".join(guestfw.files_script(files))])
    record = RunRecord(
        id=run_id,
        argv=request.argv,
        php=request.php,
        user="root" if request.root else RUN_USER,
        xdebug=mode.value,
        started=guest_seconds(clock, "preparing the run"),
        policy=dict(policy) if policy is not None else None,
    )
    save_record(logs, record)
    env = base_env(request.root)
    timed_out = False
    with xdebug_tunnel(guest, mode, request.debug_port, on_warning) as guest_port:
        env.update(xdebug.run_env(mode, run_id, debug_port=guest_port))
        env.update(request.env)
        script = run_script(run_id, the_plan, env, root=request.root)
        try:
            code = guest.run(
                ["sh", "-c", script], stdout=stdout, stderr=stderr, timeout=request.timeout
            )
        except TimeoutExpired:
            timed_out, code = True, EXIT_TIMEOUT
            guest.check(["sh", "-c", kill_command(run_id)], timeout=30)
        except KeyboardInterrupt:
            if not request.interrupt_ends:
                _stop_after_interrupt(guest, run_id, on_warning)
                raise
            code = EXIT_INTERRUPTED
            guest.check(["sh", "-c", kill_command(run_id)], timeout=30)
        except BaseException:
            _stop_after_interrupt(guest, run_id, on_warning)
            raise
    finished = guest.check(["sh", "-c", finish_script(run_id, output_dir)], timeout=30)
    finished_at = time.monotonic()
    leftovers, clock, *names = [*finished.split("\n"), "", ""]
    record = dataclasses.replace(
        record,
        ended=guest_seconds(clock, "finishing the run"),
        exit_code=code,
        timed_out=timed_out,
        leftovers=int(leftovers) if _COUNT.fullmatch(leftovers.strip()) else 0,
    )
    fetched = fetch_outputs(
        guest,
        output_dir,
        [n for n in names if n],
        runs_dir(logs) / run_id / paths.XDEBUG_DIR,
        limits,
    )
    for reason in fetched.skipped:
        on_warning(f"not fetched from the guest: {reason}")
    save_record(logs, record)
    return RunResult(record, fetched.files, finished_at, fetched.skipped)


def _stop_after_interrupt(guest: Guest, run_id: str, on_warning: Callable[[str], None]) -> None:
    # Interrupted (Ctrl-C) or the connection broke: never leave the target running.
    try:
        guest.check(["sh", "-c", kill_command(run_id)], timeout=10)
    except SandboxError as exc:
        on_warning(f"could not stop run {run_id} in the guest: {exc.message}")


# More output files than this in one run are not fetched (each costs an SFTP round trip).
MAX_OUTPUT_FILES = 2000


@dataclass(frozen=True)
class Fetched:
    files: tuple[Path, ...]
    skipped: tuple[str, ...]  # why each file that was not fetched was not


def local_output_path(local: Path, name: str) -> Path | None:
    """Where the output file `name` goes on the host: inside `local`, or None when the name is
    not one a run's outputs have (a hostile guest names its files as it likes). Pure."""
    if not xdebug.is_output_name(name):
        return None
    target = local / name
    # Belt and braces: the name pattern has no separator, but check where it resolves anyway.
    if os.path.dirname(os.path.normpath(target)) != os.path.normpath(local):
        return None
    return target


def fetch_outputs(
    guest: Guest, remote: str, names: Sequence[str], local: Path, limits: Limits
) -> Fetched:
    """Copy the run's xdebug output files (traces, profiles, coverage) to the host: only names
    of the expected shapes, each within `local`, each and all together within the limits."""
    fetched: list[Path] = []
    skipped: list[str] = []
    total = 0
    for name in sorted(names)[:MAX_OUTPUT_FILES]:
        target = local_output_path(local, name)
        if target is None:
            skipped.append(f"{name!r}: not the name of a run's output file")
            continue
        budget = min(limits.output_file, limits.run_outputs - total)
        if budget <= 0:
            skipped.append(f"{name}: the run's outputs reached {limits.run_outputs_mib} MiB")
            continue
        try:
            total += guest.get(posixpath.join(remote, name), target, limit=budget)
        except OutputTooLarge as exc:
            skipped.append(f"{name}: {exc.message}")
            continue
        fetched.append(target)
    if len(names) > MAX_OUTPUT_FILES:
        skipped.append(f"{len(names) - MAX_OUTPUT_FILES} more files: over {MAX_OUTPUT_FILES}")
    return Fetched(tuple(fetched), tuple(skipped))


def xdebug_tunnel(
    guest: Guest, mode: xdebug.XdebugMode, port: int, on_warning: Callable[[str], None]
) -> AbstractContextManager[int | None]:
    """For step debugging, a reverse tunnel on the management SSH connection: xdebug in the guest
    connects to the guest's loopback, the IDE listens on this machine's. No firewall opening.
    Yields the guest-side port (a free one: two debug runs may share a sandbox)."""
    if mode is not xdebug.XdebugMode.DEBUG:
        return contextlib.nullcontext()

    def refused(message: str) -> None:
        on_warning(
            f"{message}: start your IDE's DBGp listener on port {port} "
            "(or give its port with --debug-port); the script ran without stopping"
        )

    return guest.reverse_forward("127.0.0.1", port, on_refused=refused)

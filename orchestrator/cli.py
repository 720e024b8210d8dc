"""The `sandbox` command: a thin typer layer over lifecycle, and the one error boundary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator import lifecycle, paths, safetext
from orchestrator.capture import logview
from orchestrator.capture import report as reports
from orchestrator.capture.records import iso_time
from orchestrator.config import (
    MEMORY_MIB_RANGE,
    VCPUS_RANGE,
    WARM_RANGE,
    check_range,
    load_settings,
    parse_accel,
)
from orchestrator.egress.policy import Blocked, EgressPolicy, Learn
from orchestrator.errors import SandboxError, UsageError
from orchestrator.run import target as runs
from orchestrator.run import xdebug
from orchestrator.state import SandboxState
from orchestrator.vm import images

app = typer.Typer(
    name="sandbox",
    help="Run untrusted software in a disposable VM whose egress is denied except to what you "
    "allow, and log every connection attempt.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
image_app = typer.Typer(help="Build and list base images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
policy_app = typer.Typer(help="Inspect a sandbox's egress policy.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
warm_app = typer.Typer(
    help="VMs booted ahead of time: `up` takes one (a start in seconds) when one fits.",
    no_args_is_help=True,
)
app.add_typer(warm_app, name="warm")

err = Console(stderr=True, highlight=False)
# Off a terminal (a pipe, a file) rich would assume 80 columns and crush tables: be wide enough
# that addresses and command lines stay whole, unless COLUMNS says otherwise.
out = Console(
    highlight=False,
    width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200,
)


@dataclasses.dataclass
class Options:
    debug: bool = False
    config: Path | None = None
    connect: str | None = None


OPTIONS = Options()


class RichReporter:
    """Progress on stderr: a spinner per step on a terminal, one line per step otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        if self.console.is_terminal:
            with self.console.status(what):
                yield
        else:
            yield
        took = f"({time.monotonic() - start:.1f} s)"
        self.console.print(
            Text.assemble(("✓", "green"), " ", safetext.text(what), " ", (took, "dim"))
        )

    def step(self, what: str) -> AbstractContextManager[None]:
        return self._step(what)

    def info(self, message: str) -> None:
        self.console.print(safetext.text(message, multiline=True))


def _context(
    accel: str | None = None, memory: int | None = None, vcpus: int | None = None
) -> lifecycle.Context:
    dirs = paths.Dirs.from_env()
    settings = load_settings(OPTIONS.config, dirs.config_file)
    if OPTIONS.connect:
        settings = settings.on_host(OPTIONS.connect)  # exactly that host, not the config's hosts
    changes: dict[str, Any] = {}
    if accel:
        changes["accel"] = parse_accel(accel)
    if memory is not None:
        check_range(memory, MEMORY_MIB_RANGE, "--memory (MiB)")
        changes["memory_mib"] = memory
    if vcpus is not None:
        check_range(vcpus, VCPUS_RANGE, "--vcpus")
        changes["vcpus"] = vcpus
    settings = dataclasses.replace(settings, **changes)
    return lifecycle.Context(settings=settings, dirs=dirs, reporter=RichReporter(err))


NameOpt = Annotated[str, typer.Option("--name", "-n", help="Sandbox name.")]


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Config file (default: XDG config dir).")
    ] = None,
    connect: Annotated[
        str | None,
        typer.Option(
            "--connect",
            "-c",
            help="libvirt URI: this one host, whatever hosts the config lists "
            "(default qemu:///system; env SANDBOX_CONNECT).",
        ),
    ] = None,
) -> None:
    OPTIONS.debug, OPTIONS.config, OPTIONS.connect = debug, config, connect


@app.command()
def up(
    name: NameOpt = "default",
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Allowed destination (repeatable): ADDR, CIDR, ADDR:PORT, udp:ADDR:PORT, "
            "[V6]:PORT or a host name (resolved now).",
        ),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Policy file (YAML: allow, dns, blocked).")
    ] = None,
    dns: Annotated[
        bool | None,
        typer.Option(
            "--dns/--no-dns", help="Let the guest query the sandbox network's resolver (only)."
        ),
    ] = None,
    blocked: Annotated[
        str | None, typer.Option("--blocked", help="reject (default: fail fast) or drop.")
    ] = None,
    sinkhole: Annotated[
        bool | None,
        typer.Option(
            "--sinkhole/--no-sinkhole",
            help="Resolve every name (but the allowed ones) to a sinkhole on the host that "
            "records what the guest sends and forwards nothing.",
        ),
    ] = None,
    pcap: Annotated[
        bool, typer.Option("--pcap", help="Capture the VM's packets on the host (tcpdump).")
    ] = False,
    image: Annotated[str | None, typer.Option("--image", help="Base image name.")] = None,
    accel: Annotated[str | None, typer.Option("--accel", help="auto, kvm or tcg.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Guest memory, MiB.")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="Guest vCPUs.")] = None,
    xdebug_mode: Annotated[
        str,
        typer.Option(
            "--xdebug",
            help="xdebug for `sandbox run` only: trace (default), debug, profile, develop, "
            "coverage or off.",
        ),
    ] = "trace",
    cold: Annotated[
        bool, typer.Option("--cold", help="Boot a new VM even if a warm one is there.")
    ] = False,
    learn: Annotated[
        bool,
        typer.Option(
            "--learn",
            help="Learn mode: ALLOW ALL egress and record it, for `sandbox policy suggest`. "
            "Unconfined: only for software you would run unconfined. With --sinkhole: learn "
            "under the sinkhole instead (every name leads to it, nothing leaves the machine).",
        ),
    ] = False,
) -> None:
    """Create and boot a disposable sandbox VM (from a warm VM when one fits)."""
    mode = _xdebug_mode(xdebug_mode)
    ctx = _context(accel, memory, vcpus)
    egress = lifecycle.make_policy(
        ctx,
        allow or (),
        policy_file=policy,
        dns=dns,
        blocked=_blocked(blocked),
        learn=_learn(learn, sinkhole),
        sinkhole=sinkhole,
    )
    _say_learning(name, egress.learn)
    state = lifecycle.up(
        ctx,
        name,
        image=image,
        policy=egress,
        capture=pcap,
        xdebug_mode=mode,
        warm_start=not cold,
    )
    _print_ready(state)
    _say_learning(name, egress.learn)


def _learn(learn: bool, sinkhole: bool | None) -> Learn:
    """--learn alone is allow-all (loud); --learn --sinkhole learns with nothing let out. A
    policy file's `sinkhole: true` does not choose for --learn: make_policy asks the user."""
    if not learn:
        return Learn.OFF
    return Learn.SINKHOLE if sinkhole else Learn.ALLOW_ALL


def _say_learning(name: str, mode: Learn) -> None:
    """Say that a sandbox (or its logs) is in learn mode: a shout under allow-all, where the
    software could send anything anywhere; a plain note under the sinkhole, where nothing left."""
    if mode is Learn.ALLOW_ALL:
        _shout(lifecycle.learn_warning(name, mode))
    elif mode is Learn.SINKHOLE:
        err.print(
            safetext.labeled("LEARN MODE (sinkhole):", "bold", lifecycle.learn_warning(name, mode)),
            soft_wrap=True,
        )


def _shout(message: str) -> None:
    """A warning that must not be missed (learn mode): bold red, on its own lines."""
    err.print(safetext.labeled("WARNING:", "bold red", message), soft_wrap=True)


def _blocked(blocked: str | None) -> Blocked | None:
    try:
        return Blocked(blocked.lower()) if blocked else None
    except ValueError:
        raise UsageError(f"--blocked {blocked!r}", "use reject or drop") from None


def _print_ready(state: SandboxState) -> None:
    how = (
        f"warm VM, ready in {state.boot_seconds} s"
        if state.warm_id
        else f"booted in {state.boot_seconds} s"
    )
    err.print(f"sandbox [bold]{state.name}[/] is ready at {state.ip} ({state.accel.value}, {how})")


@app.command(name="exec", context_settings={"allow_interspersed_args": False})
def exec_(
    command: Annotated[list[str], typer.Argument(help="Command to run in the guest.")],
    name: NameOpt = "default",
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds before the command is stopped.")
    ] = None,
) -> None:
    """Run a command in the sandbox over SSH; its exit code is passed back."""
    ctx = _context()
    code = lifecycle.exec_command(
        ctx,
        name,
        command,
        stdout=_sink(sys.stdout),
        stderr=_sink(sys.stderr),
        timeout=timeout,
        on_warning=_warn,
    )
    raise typer.Exit(code)


def _xdebug_mode(text: str) -> xdebug.XdebugMode:
    try:
        return xdebug.XdebugMode(text.lower())
    except ValueError:
        choices = ", ".join(m.value for m in xdebug.XdebugMode)
        raise UsageError(f"--xdebug {text!r}", f"use one of {choices}") from None


class _RunCommand(typer.core.TyperCommand):
    """Remembers whether the arguments came after `--`: `sandbox run -- CMD` runs a command,
    `sandbox run SCRIPT.php` a PHP script."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        given = list(args)
        rest = super().parse_args(ctx, args)
        positional = ctx.params.get("command") or []
        n = len(positional)
        ctx.meta["dashdash"] = bool(n) and len(given) > n and given[-n - 1] == "--"
        return rest


@app.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str],
        typer.Argument(help="SCRIPT.php [ARGS...], or after --: CMD [ARGS...]", show_default=False),
    ],
    name: NameOpt = "default",
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Upload this directory; SCRIPT (or CMD) is inside it."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="NAME=VALUE for the target (repeatable)."),
    ] = None,
    root: Annotated[
        bool, typer.Option("--root", help="Run as root (default: user sandbox).")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds before the whole process tree is killed."),
    ] = None,
    xdebug_mode: Annotated[
        str | None,
        typer.Option(
            "--xdebug", help="xdebug mode for this run (default: the one `up` set, trace)."
        ),
    ] = None,
    debug_port: Annotated[
        int,
        typer.Option("--debug-port", help="Your IDE's DBGp port on 127.0.0.1 (--xdebug debug)."),
    ] = 9003,
    once: Annotated[
        bool,
        typer.Option(
            "--rm",
            help="One-shot: a new sandbox for this run, destroyed after it (implied by --allow "
            "or --policy when the sandbox does not exist).",
        ),
    ] = False,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", "-a", help="One-shot: allowed destination (as for `up`)."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="One-shot: a YAML policy file (as for `up`).")
    ] = None,
    dns: Annotated[
        bool | None, typer.Option("--dns/--no-dns", help="One-shot: as for `up`.")
    ] = None,
    blocked: Annotated[
        str | None, typer.Option("--blocked", help="One-shot: reject or drop (as for `up`).")
    ] = None,
    sinkhole: Annotated[
        bool | None,
        typer.Option("--sinkhole/--no-sinkhole", help="One-shot: sinkhole mode (as for `up`)."),
    ] = None,
    pcap: Annotated[
        bool,
        typer.Option(
            "--pcap", help="One-shot: capture the VM's packets on the host (kept with the logs)."
        ),
    ] = False,
    image: Annotated[str | None, typer.Option("--image", help="One-shot: base image name.")] = None,
    learn: Annotated[
        bool,
        typer.Option(
            "--learn",
            help="One-shot: learn mode: ALLOW ALL egress and record it, for "
            "`sandbox policy suggest`. Unconfined: only for software you would run unconfined. "
            "With --sinkhole: learn under the sinkhole (nothing leaves the machine).",
        ),
    ] = False,
) -> None:
    """Run a PHP script (or, after --, any command) in the sandbox; its exit code is passed back.

    With --rm (or --allow/--policy and no such sandbox) the run gets a sandbox of its own, made
    for it (warm when a warm VM is there) and destroyed after it; its logs are kept."""
    if timeout is not None and not timeout > 0:  # also refuses nan
        raise UsageError(f"--timeout {timeout:g}", "give a number of seconds above 0")
    check_range(debug_port, (1, 65535), "--debug-port")
    request = runs.RunRequest(
        argv=tuple(command),
        php=not ctx.meta.get("dashdash", False),
        workdir=workdir,
        env=runs.parse_env(env or ()),
        root=root,
        timeout=timeout,
        xdebug=_xdebug_mode(xdebug_mode) if xdebug_mode else None,
        debug_port=debug_port,
    )
    if request.php and not command[0].endswith(".php") and workdir is None:
        raise UsageError(
            f"{command[0]!r} is not a .php script",
            f"to run a command, put it after --: sandbox run -- {' '.join(command)}",
        )
    sandboxes = _context()
    one_shot = once or (
        (allow or policy is not None) and name not in lifecycle.known_names(sandboxes)
    )
    given = [
        flag
        for flag, value in (
            ("--allow", allow),
            ("--policy", policy is not None),
            ("--dns/--no-dns", dns is not None),
            ("--blocked", blocked),
            ("--sinkhole/--no-sinkhole", sinkhole is not None),
            ("--pcap", pcap),
            ("--image", image),
            ("--learn", learn),
        )
        if value
    ]
    if not one_shot and given:
        raise UsageError(
            f"{', '.join(given)} make a one-shot sandbox, and without --rm the run goes to "
            f"sandbox {name!r}, which keeps the policy and image `up` gave it",
            "add --rm to run in a new sandbox of its own, or leave those options out",
        )
    if one_shot:
        egress = lifecycle.make_policy(
            sandboxes,
            allow or (),
            policy_file=policy,
            dns=dns,
            blocked=_blocked(blocked),
            learn=_learn(learn, sinkhole),
            sinkhole=sinkhole,
        )
        _say_learning("(one-shot)", egress.learn)
        once_outcome = lifecycle.run_once(
            sandboxes,
            request,
            policy=egress,
            image=image,
            capture=pcap,
            stdout=_sink(sys.stdout),
            stderr=_sink(sys.stderr),
            on_warning=_warn,
            on_ready=lambda made: err.print(
                f"[dim]one-shot sandbox {made}: destroyed after the run, logs kept[/]"
            ),
        )
        assert once_outcome.outcome is not None
        name = once_outcome.name
        outcome = once_outcome.outcome
        for warning in once_outcome.destroyed.warnings:
            _warn(warning)
        err.print(
            safetext.text(f"destroyed {name}: {', '.join(once_outcome.destroyed.removed)}"),
            style="dim",
            soft_wrap=True,
        )
    else:
        outcome = lifecycle.run_target(
            sandboxes,
            name,
            request,
            stdout=_sink(sys.stdout),
            stderr=_sink(sys.stderr),
            on_warning=_warn,
        )
    record = outcome.result.record
    if record.timed_out:
        err.print(
            f"[bold red]timed out[/] after {timeout:g} s: the run's whole process tree was killed"
        )
    if record.leftovers:
        err.print(
            f"the target left {record.leftovers} process(es) running when it exited; "
            "they were killed"
        )
    if outcome.result.fetched and record.xdebug != xdebug.XdebugMode.TRACE.value:
        where = outcome.result.fetched[0].parent
        err.print(safetext.text(f"xdebug {record.xdebug} output: {where}"), soft_wrap=True)
    summary = f"run {record.id}: exit {record.exit_code}"
    if outcome.collected is not None:
        summary += f", {outcome.collected.new_attempts} new connection record(s)"
    if outcome.result.skipped:
        summary += f", {len(outcome.result.skipped)} output file(s) refused (see the warnings)"
    if one_shot:
        chosen = logview.Filter.from_options(run=record.id)
        attempts: list[Any] = lifecycle.read_logs(sandboxes, name, chosen, dns=False)
        out.print(logview.render_table(attempts))
        summary += f", {len(attempts)} connection record(s)"
    err.print(
        f"[dim]{summary}; see `sandbox logs --name {name} --run {record.id}`[/]", soft_wrap=True
    )
    if lifecycle.learned(sandboxes, name):
        _say_learning(name, lifecycle.learned_mode(sandboxes, name))
        err.print(
            f"suggest a policy from it: sandbox policy suggest --name {name} --run {record.id}",
            soft_wrap=True,
        )
    raise typer.Exit(record.exit_code if record.exit_code is not None else 1)


@app.command()
def serve(
    name: NameOpt = "default",
    workdir: Annotated[
        Path, typer.Option("--workdir", help="The application's directory, uploaded.")
    ] = Path("."),
    port: Annotated[
        int, typer.Option("--port", "-p", help="Port on this machine's 127.0.0.1 (0: any free).")
    ] = 8080,
    docroot: Annotated[
        str, typer.Option("--docroot", help="Web root inside --workdir (e.g. public).")
    ] = ".",
    router: Annotated[
        str | None,
        typer.Option("--router", help="Script inside --workdir that every request goes through."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="NAME=VALUE for the server (repeatable)."),
    ] = None,
    xdebug_mode: Annotated[
        str | None,
        typer.Option("--xdebug", help="xdebug mode (default: the one `up` set, trace)."),
    ] = None,
) -> None:
    """Serve a PHP web application from the sandbox (PHP's built-in server) on this machine's
    127.0.0.1:PORT; each attempt names the request it served. Ctrl-C stops it."""
    check_range(port, (0, 65535), "--port")
    outcome = lifecycle.serve_target(
        _context(),
        name,
        workdir,
        port=port,
        docroot=docroot,
        router=router,
        env=runs.parse_env(env or ()),
        mode=_xdebug_mode(xdebug_mode) if xdebug_mode else None,
        on_ready=lambda url: err.print(
            safetext.text(f"serving {workdir} at {url} (Ctrl-C to stop)"), soft_wrap=True
        ),
        stdout=_escaped_lines(err),
        stderr=_escaped_lines(err),
        on_warning=_warn,
    )
    record = outcome.run.result.record
    summary = f"served {len(outcome.requests)} request(s) in run {record.id}"
    if outcome.run.collected is not None:
        summary += f", {outcome.run.collected.new_attempts} new connection record(s)"
    err.print(
        safetext.text(
            f"{summary}; see `sandbox logs --name {name} --run {record.id}`", style="dim"
        ),
        soft_wrap=True,
    )
    code = record.exit_code
    # Stopped with Ctrl-C, as meant: success. A server that died on its own passes its code on.
    raise typer.Exit(0 if code == runs.EXIT_INTERRUPTED else (code if code is not None else 1))


def _escaped_lines(console: Console) -> Any:
    """A sink for guest output that is a log, not the user's data: whole lines, printed with
    control characters escaped (the application's own log lines are guest text)."""
    pending = bytearray()

    def sink(data: bytes) -> None:
        pending.extend(data)
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest[-65536:]
        for line in lines:
            console.print(safetext.text(line.decode(errors="replace")), soft_wrap=True)

    return sink


def _sink(stream: Any) -> Any:
    def sink(data: bytes) -> None:
        stream.buffer.write(data)
        stream.buffer.flush()

    return sink


def _warn(message: str) -> None:
    err.print(safetext.labeled("warning:", "yellow", message), soft_wrap=True)


@app.command(context_settings={"allow_interspersed_args": False})
def ssh(
    command: Annotated[list[str] | None, typer.Argument(help="Optional command.")] = None,
    name: NameOpt = "default",
) -> None:
    """Open an SSH session to the sandbox (OpenSSH, pinned host key)."""
    argv = lifecycle.ssh_argv(_context(), name, command or [])
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise SandboxError(
            "the ssh client is not installed", "apt-get install openssh-client"
        ) from None


def _status_dict(st: lifecycle.Status) -> dict[str, Any]:
    s = st.state
    return {
        "name": st.name,
        "status": st.summary,
        "host": st.host or None,
        "domain": st.domain,
        "ip": s.ip if s else None,
        "image": s.image if s else None,
        "accel": s.accel.value if s else None,
        "created": s.created if s else None,
        "boot_seconds": s.boot_seconds if s else None,
        "allow": _allow_shown(s) if s else [],
        "dns": s.policy.get("dns") if s else None,
        "learn": s.policy.get("learn", Learn.OFF.value) if s else None,
        "problems": list(st.problems),
    }


def _allow_shown(state: SandboxState) -> list[str]:
    """The allow list `status` shows: allow-all learn mode's wide entries as one line (learning
    under the sinkhole allows nothing: its list is shown as it is)."""
    if state.policy.get("learn", Learn.OFF.value) != Learn.ALLOW_ALL.value:
        return list(state.allow)
    own = [a.describe() for a in EgressPolicy.from_dict(state.policy).allow if a.source != "learn"]
    return ["EVERYTHING outside the sandbox networks (learn mode)", *own]


@app.command()
def status(
    name: NameOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Show one sandbox's status, derived from what exists."""
    st = lifecycle.inspect(_context(), name)
    if st.state is None and st.domain in ("missing", "unknown"):
        hint = f"create it with `sandbox up --name {name}`"
        if st.problems:  # hosts that could not be searched
            hint = f"{'; '.join(st.problems)}; or {hint}"
        raise SandboxError(f"sandbox {name!r} does not exist on any host that answered", hint)
    data = _status_dict(st)
    if data["learn"] not in (None, Learn.OFF.value):
        _say_learning(name, _learn_value(data["learn"]))
    if as_json:
        # rich re-dumps print_json with ensure_ascii=False by default, which would let C1 and
        # bidi controls from a problem message through raw.
        out.print_json(json.dumps(data), ensure_ascii=True)
        return
    for key, value in data.items():
        if value not in (None, []):
            shown = ", ".join(value) if isinstance(value, list) else value
            out.print(safetext.text(f"{key:>13}: {shown}"))


@app.command(name="list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False) -> None:
    """List sandboxes on every configured host (with state on disk, or our VMs without it), and
    the hosts that did not answer."""
    listing = lifecycle.list_status(_context())
    rows = [_status_dict(s) for s in listing.sandboxes]
    # A host that is down is a row of its own: its sandboxes without state cannot be known.
    rows += [
        {"name": None, "status": "host down", "host": d.uri, "problems": [d.error]}
        for d in listing.down
    ]
    if as_json:
        out.print_json(json.dumps(rows), ensure_ascii=True)
        return
    table = Table("name", "status", "host", "ip", "image", "accel", "created", "problems")
    for r in rows:
        table.add_row(
            *(
                safetext.text(r.get(key) or "-")
                for key in ("name", "status", "host", "ip", "image", "accel", "created")
            ),
            safetext.text("; ".join(r["problems"])),
        )
    out.print(table)


@warm_app.command("fill")
def warm_fill(
    count: Annotated[
        int,
        typer.Option(
            "--count", "-n", help="How many warm VMs to keep (default: config warm, or 1)."
        ),
    ] = 0,
    image: Annotated[str | None, typer.Option("--image", help="Base image name.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until every warm VM has booted.")
    ] = True,
) -> None:
    """Boot warm VMs for the current settings and image (and remove unfit ones: another image
    version, memory, vCPUs)."""
    ctx = _context()
    want = count or ctx.settings.warm or 1
    check_range(want, WARM_RANGE, "--count")
    report = lifecycle.warm_fill(ctx, want, image, wait=wait)
    for domain in report.removed:
        err.print(safetext.text(f"removed {domain} (gone, or built for other settings or image)"))
    ready = f", {report.ready} booted" if wait else " (booting)"
    err.print(f"{report.kept + len(report.started)} warm VM(s){ready}; {len(report.started)} new")


@warm_app.command("status")
def warm_status() -> None:
    """The warm VMs and how far each has booted."""
    table = Table("domain", "image", "accel", "memory", "created", "state", box=None)
    for item in lifecycle.warm_status(_context()):
        vm = item.vm
        table.add_row(
            vm.domain,
            f"{vm.image} ({vm.image_hash[:12]})",
            vm.accel.value,
            f"{vm.memory_mib} MiB",
            vm.created,
            item.state,
        )
    out.print(table)


@warm_app.command("drain")
def warm_drain() -> None:
    """Remove every warm VM."""
    removed = lifecycle.warm_drain(_context())
    err.print(f"removed {len(removed)} warm VM(s)")


@app.command()
def destroy(
    name: Annotated[str | None, typer.Option("--name", "-n", help="Sandbox name.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Destroy every sandbox.")] = False,
) -> None:
    """Destroy a sandbox: VM, disks, seed, keys and network go; logs stay."""
    if name and all_:
        raise UsageError("--name and --all exclude each other", "give one of them")
    ctx = _context()
    reports = (
        lifecycle.destroy_all(ctx)
        if all_
        else [lifecycle.destroy(ctx, name or "default", detach=True)]
    )
    for report in reports:
        for warning in report.warnings:
            err.print(safetext.labeled("warning:", "yellow", warning))
        if report.failed is not None:
            err.print(safetext.labeled("error:", "bold red", f"{report.name}: {report.failed}"))
        elif report.existed:
            # Text, not markup: a host's URI may hold brackets ([2001:db8::1]).
            err.print(safetext.text(f"destroyed {report.name}: {', '.join(report.removed)}"))
        else:
            err.print(safetext.text(f"nothing to destroy for {report.name}"))
    if any(r.failed is not None for r in reports):
        raise typer.Exit(1)


@app.command()
def logs(
    name: NameOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, as stored.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Live view, every second.")
    ] = False,
    blocked: Annotated[bool, typer.Option("--blocked", help="Only blocked attempts.")] = False,
    allowed: Annotated[bool, typer.Option("--allowed", help="Only allowed attempts.")] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only since: 10m, 2h, 1d or an ISO time.")
    ] = None,
    process: Annotated[
        str | None, typer.Option("--process", help="Only this pid, or executable/command text.")
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Only this run's attempts (a run id, or last).")
    ] = None,
    dns: Annotated[bool, typer.Option("--dns", help="The resolver's queries instead.")] = False,
    probes: Annotated[
        bool,
        typer.Option(
            "--probes", help="Also glibc's address-sorting probes (UDP connects never sent on)."
        ),
    ] = False,
    host: Annotated[
        bool,
        typer.Option("--host", help="The flows the host saw the guest start (its own record)."),
    ] = False,
    sockets: Annotated[
        bool, typer.Option("--sockets", help="The guest's current sockets (like lsof -i -nP).")
    ] = False,
    purge: Annotated[bool, typer.Option("--purge", help="Delete the stored logs.")] = False,
) -> None:
    """Every connection attempt: when, which process, where, allowed or blocked.

    dns: a query to the sandbox's resolver (the name and types asked in the dns name column).

    unsent: a UDP socket connected outside that sent nothing (the software's intent).

    probe: glibc's getaddrinfo sorting a lookup's answers (hidden unless --probes).

    loopback, boot, unlogged, host-blocked, tamper: see README.md."""
    ctx = _context()
    if purge:
        gone = lifecycle.purge_logs(ctx, name)
        err.print(f"{'purged' if gone else 'no logs for'} {name}")
        return
    if sockets:
        out.print(logview.render_sockets(lifecycle.sockets(ctx, name)))
        return
    lifecycle.require_logs(ctx, name)
    _say_learning(name, lifecycle.learned_mode(ctx, name))
    chosen = logview.Filter.from_options(
        blocked=blocked,
        allowed=allowed,
        since=since,
        process=process,
        run=lifecycle.last_run_id(ctx, name) if run_id == "last" else run_id,
        probes=probes,
    )
    seen: set[str] = set()
    while True:
        collected_at = lifecycle.refresh_logs(ctx, name, _warn)
        if host and not follow:
            _print_host_flows(lifecycle.host_flows(ctx, name, before=collected_at), as_json)
            return
        records: list[Any] = lifecycle.read_logs(ctx, name, chosen, dns=dns)
        fresh = logview.new_records(records, seen) if follow else records
        if as_json:
            for line in logview.json_lines(fresh):
                out.print(line, soft_wrap=True, markup=False, highlight=False)
        elif fresh or not follow:
            out.print(logview.render_dns_table(fresh) if dns else logview.render_table(fresh))
        if not follow:
            for loss in lifecycle.recorded_losses(ctx, name):
                err.print(safetext.labeled("warning:", "yellow", f"records were lost: {loss}"))
            for missing in lifecycle.host_flows(ctx, name, before=collected_at).unrecorded:
                err.print(
                    safetext.labeled(
                        "warning:",
                        "yellow",
                        "the host saw flows the guest's record lacks (the guest may have blinded "
                        f"its capture): {missing.describe()}; see `sandbox logs --name {name} "
                        "--host`",
                    ),
                    soft_wrap=True,
                )
            return
        time.sleep(1.0)


def _print_host_flows(report: lifecycle.HostFlowReport, as_json: bool) -> None:
    if as_json:
        for flow in report.flows:
            out.print(json.dumps(flow.to_dict()), soft_wrap=True, markup=False, highlight=False)
        return
    table = Table("time", "proto", "from", "destination", box=None, header_style="bold")
    for flow in report.flows:
        table.add_row(
            iso_time(flow.time),
            flow.proto,
            logview.destination(flow.src, flow.sport),
            logview.destination(flow.dst, flow.dport),
        )
    out.print(table)
    for missing in report.unrecorded:
        err.print(safetext.labeled("not in the guest's record:", "yellow", missing.describe()))


@app.command()
def report(
    name: NameOpt = "default",
    run_id: Annotated[
        str,
        typer.Option(
            "--run",
            help="The run: an id, last, or SANDBOX:RUN (an id is also looked for in the logs of "
            "every sandbox, destroyed ones included).",
        ),
    ] = "last",
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write the report as one self-contained HTML file."),
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option(
            "--json", help=f"Write the same data as JSON ({reports.SCHEMA}; - for stdout)."
        ),
    ] = None,
    diff: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--diff",
            metavar="RUN_A RUN_B",
            help="Compare two runs (RUN_A RUN_B, each named like --run, or a FILE.json that "
            "--json saved): destinations new, gone or with another verdict.",
        ),
    ] = None,
    all_rows: Annotated[
        bool, typer.Option("--all", help="With --diff: also the destinations that are the same.")
    ] = False,
) -> None:
    """A report of one run (timeline, destinations, processes, DNS, policy) to share, or two runs
    compared. Without --html or --json, the destinations as a table."""
    ctx = _context()
    model: reports.Report | reports.Diff
    if diff is not None:
        model = lifecycle.diff_runs(ctx, diff[0], diff[1], name, _warn)
    else:
        model = lifecycle.run_report(ctx, run_id, name, _warn)
        _say_learning(model.run.sandbox, _report_learning(ctx, model))
    to_stdout = json_file is not None and str(json_file) == "-"
    written = lifecycle.save_report(model, html=html, json=None if to_stdout else json_file)
    for path in written:
        err.print(safetext.text(f"wrote {path}"), soft_wrap=True)
    if to_stdout:
        out.print(reports.to_json(model), end="", soft_wrap=True, markup=False, highlight=False)
    elif isinstance(model, reports.Diff):
        out.print(reports.render_diff(model, all_rows=all_rows))
    elif not written:
        out.print(reports.render_summary(model))


def _learn_value(value: object) -> Learn:
    """A learn mode as recorded; one this version does not know counts as allow-all (the loud
    side of a doubt)."""
    try:
        return Learn(value)
    except ValueError:
        return Learn.ALLOW_ALL


def _report_learning(ctx: lifecycle.Context, model: reports.Report) -> Learn:
    """The learn mode a report's run was made in: its logs' record, else the policy the report
    holds (a mode this version does not know counts as allow-all: the loud side of a doubt)."""
    mode = lifecycle.learned_mode(ctx, model.run.sandbox)
    if mode is not Learn.OFF or model.policy is None:
        return mode
    return _learn_value(model.policy.learn)


@policy_app.command("show")
def policy_show(name: NameOpt = "default") -> None:
    """Print the effective egress policy and both layers' rules (guest and host)."""
    report = lifecycle.policy_report(_context(), name)
    p = report.policy
    out.print(f"[bold]sandbox {report.name}[/]: egress denied except:")
    for entry in p.allow:
        out.print(safetext.text(f"  allow {entry.describe()}"))
    if not p.allow:
        out.print("  (nothing)")
    out.print(f"  dns: {'the sandbox resolver only' if p.dns else 'none'}")
    for host, addrs in p.names:
        out.print(safetext.text(f"  name {host} -> {', '.join(addrs)}"))
    for wildcard in p.wildcards:
        out.print(
            safetext.text(
                f"  allow {wildcard.describe()}: names under {wildcard.domain}, each answer's "
                "addresses allowed when the resolver hands them out"
            )
        )
    for handed in report.handed_out:
        out.print(
            safetext.text(
                f"    handed out {handed.address} {handed.proto}/{handed.port} for {handed.name}"
            )
        )
    out.print(f"  blocked attempts: {p.blocked.value}")
    if p.sinkhole:
        out.print(
            "  sinkhole: every other name resolves to the gateway, where nothing is forwarded"
        )
    if p.learn is Learn.SINKHOLE:
        out.print("  learn mode under the sinkhole: nothing is let out, everything is recorded")
    elif p.learn is Learn.ALLOW_ALL:
        out.print("  learn mode: ALL egress allowed (both layers), everything is recorded")
    for version, rules in sorted(report.guest_rules.items()):
        out.print(f"\n[bold]guest: ip{'6' if version == 6 else ''}tables-save -t filter[/]")
        out.print(safetext.text(rules.rstrip(), multiline=True))
    out.print("\n[bold]host: libvirt nwfilter[/]")
    out.print(safetext.text(report.host_filter.rstrip(), multiline=True))
    for problem in report.problems:
        err.print(safetext.labeled("warning:", "yellow", problem))
    if report.problems:
        raise typer.Exit(1)


@policy_app.command("suggest")
def policy_suggest(
    name: NameOpt = "default",
    run_id: Annotated[
        str | None,
        typer.Option("--run", help="Only this run's attempts (a run id, or last)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the policy here (default: stdout).")
    ] = None,
) -> None:
    """A YAML policy that allows what the sandbox's software tried (best learned with --learn):
    names where it asked for one, ports and protocols as seen, each entry commented with the
    process and PHP line behind it. `sandbox up --policy FILE` loads it unchanged."""
    ctx = _context()
    _say_learning(name, lifecycle.learned_mode(ctx, name))
    text = lifecycle.suggest_policy(ctx, name, run_id, _warn)
    if output is None:
        out.print(text, end="", soft_wrap=True, markup=False, highlight=False)
        return
    lifecycle.write_policy(text, output)
    err.print(safetext.text(f"wrote {output}; use it with: sandbox up --policy {output}"))


@image_app.command("build")
def image_build(
    name: Annotated[str | None, typer.Option("--name", help="Image name.")] = None,
    package: Annotated[
        list[str] | None, typer.Option("--package", "-p", help="Extra Debian package.")
    ] = None,
    sources: Annotated[
        Path | None, typer.Option("--sources", help="APT sources file to build from.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
) -> None:
    """Build (or reuse) a base image from Debian packages."""
    ctx = _context()
    conf = ctx.settings.image
    extra = tuple(package or ()) or conf.packages
    image_name = name or conf.name or images.default_image_name(extra)
    recipe = images.ImageRecipe(
        name=image_name, extra_packages=extra, sources=sources or conf.sources
    )
    start = time.monotonic()
    with err.status("building image") if err.is_terminal else contextlib.nullcontext():
        img = images.build_image(
            recipe,
            ctx.dirs.images,
            force=force,
            progress=lambda m: err.print(safetext.text(f"  {m}")),
        )
    err.print(
        f"image [bold]{img.name}[/] ready in {img.directory} "
        f"({time.monotonic() - start:.0f} s); use it with `sandbox up --image {img.name}`"
    )


@image_app.command("list")
def image_list() -> None:
    """List built images."""
    table = Table("name", "recipe", "created", "extra packages")
    for img in images.list_images(paths.Dirs.from_env().images):
        m = img.manifest
        table.add_row(img.name, m.recipe_hash[:12], m.created, " ".join(m.extra_packages))
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every error into a message, a hint and an exit code."""
    try:
        # Standalone mode: typer reports usage errors itself (exit 2) and exits via SystemExit.
        app(args=argv, prog_name="sandbox")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except SandboxError as exc:
        if OPTIONS.debug:
            traceback.print_exc()
        err.print(safetext.labeled("error:", "bold red", exc.message), soft_wrap=True)
        if exc.hint:
            err.print(safetext.labeled("hint:", "yellow", exc.hint), soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except PermissionError as exc:
        if OPTIONS.debug:
            traceback.print_exc()
        err.print(
            safetext.labeled("error:", "bold red", f"permission denied: {exc.filename or exc}")
        )
        err.print(
            "[yellow]hint:[/] run as the user that created the sandbox (or root), or fix the "
            "ownership of that path"
        )
        return 9
    except Exception as exc:
        if OPTIONS.debug:
            raise
        err.print(
            safetext.labeled("internal error:", "bold red", f"{type(exc).__name__}: {exc}"),
            soft_wrap=True,
        )
        err.print("[yellow]hint:[/] run again with --debug for the traceback and report it")
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())

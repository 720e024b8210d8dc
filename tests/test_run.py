"""`sandbox run`'s pure half: what is uploaded, the guest scripts, the run records, and which
attempt belongs to which run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator import paths
from orchestrator.capture.records import Attempt, Verdict, guest_seconds, iso_time, parse_time
from orchestrator.errors import GuestError, NotFoundError, UsageError
from orchestrator.run import target as runs
from orchestrator.run import xdebug

from .conftest import Golden

RUN_ID = "20261123-140000-ab12"


def _request(*argv: str, php: bool = True, workdir: Path | None = None) -> runs.RunRequest:
    return runs.RunRequest(argv=argv, php=php, workdir=workdir)


def test_a_php_script_is_uploaded_by_its_name(tmp_path: Path) -> None:
    script = tmp_path / "dir" / "x.php"
    script.parent.mkdir()
    script.write_text("<?php echo 1;")
    plan = runs.plan(_request(str(script), "a b", "--flag"))
    assert plan == runs.Plan(script, None, False, ("php", "x.php", "a b", "--flag"))


def test_a_missing_script_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"no such PHP script: .*nope\.php"):
        runs.plan(_request(str(tmp_path / "nope.php")))


def test_nothing_to_run_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nothing to run"):
        runs.plan(_request())


def test_a_workdir_entry_is_found_relative_to_the_directory_or_as_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app"
    (app / "public").mkdir(parents=True)
    (app / "public" / "index.php").write_text("<?php")
    expected = runs.Plan(None, app, False, ("php", "public/index.php", "x"))
    assert runs.plan(_request("public/index.php", "x", workdir=app)) == expected
    monkeypatch.chdir(tmp_path)
    assert runs.plan(_request("app/public/index.php", "x", workdir=app)) == expected


def test_a_workdir_entry_must_be_inside_it(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    outside = tmp_path / "outside.php"
    outside.write_text("<?php")
    with pytest.raises(NotFoundError, match="not a file inside --workdir"):
        runs.plan(_request(str(outside), workdir=tmp_path / "app"))
    with pytest.raises(NotFoundError, match="not a file inside --workdir"):
        runs.plan(_request("../outside.php", workdir=tmp_path / "app"))


def test_a_missing_workdir_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such directory"):
        runs.plan(_request("x.php", workdir=tmp_path / "gone"))


def test_commands_from_the_image_and_local_executables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runs.plan(_request("curl", "-s", php=False)).argv == ("curl", "-s")
    # An absolute path that is not a local file names a program in the guest.
    assert runs.plan(_request("/opt/guest-only/tool", php=False)) == runs.Plan(
        None, None, False, ("/opt/guest-only/tool",)
    )
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    assert runs.plan(_request("./tool", "x", php=False)) == runs.Plan(
        Path("./tool"), None, True, ("./tool", "x")
    )
    with pytest.raises(NotFoundError, match=r"no such file: \./missing"):
        runs.plan(_request("./missing", php=False))
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "start.sh").write_text("#!/bin/sh\n")
    assert runs.plan(_request("./start.sh", php=False, workdir=tmp_path / "app")).argv == (
        "./start.sh",
    )


def test_env_pairs() -> None:
    assert runs.parse_env(["A=1", "B_2=x=y", "EMPTY="]) == (
        ("A", "1"),
        ("B_2", "x=y"),
        ("EMPTY", ""),
    )
    for bad in ("NOEQUALS", "1A=x", "A-B=x", "=x"):
        with pytest.raises(UsageError):
            runs.parse_env([bad])


def test_guest_scripts(golden: Golden, tmp_path: Path) -> None:
    plan = runs.Plan(None, tmp_path, False, ("php", "public/index.php", "it's"))
    env = {**runs.base_env(root=False), "PHP_INI_SCAN_DIR": ":/etc/sandbox/php", "A": "b c"}
    text = "\n".join(
        [
            "# prepare",
            runs.prepare_script(RUN_ID, root=False, output_dir="/var/lib/sandbox/xdebug/" + RUN_ID),
            "# run as the run user",
            runs.run_script(RUN_ID, plan, env, root=False),
            "# run as root",
            runs.run_script(
                RUN_ID, runs.Plan(None, None, False, ("id",)), runs.base_env(root=True), root=True
            ),
            "# finish",
            runs.finish_script(RUN_ID, "/var/lib/sandbox/xdebug/" + RUN_ID),
            "# kill",
            runs.kill_command(RUN_ID),
            "",
        ]
    )
    golden.check("run-scripts.sh", text)
    # Every script is valid shell.
    for script in text.split("# ")[1:]:
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)


def test_the_upload_tarball_has_the_tree_and_no_host_owners(tmp_path: Path) -> None:
    import io
    import tarfile

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.php").write_text("<?php")
    with tarfile.open(fileobj=io.BytesIO(runs.upload_tar(tmp_path))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"./sub", "./sub/a.php"} <= members.keys()
    assert all(m.uid == 0 and m.uname == "" for m in members.values())


def test_run_ids_are_unique_and_named_after_the_time() -> None:
    ids = {runs.new_run_id(0) for _ in range(50)}
    assert len(ids) > 40
    assert all(i.startswith("19700101-000000-") for i in ids)


def _record(
    run_id: str, started: float, ended: float | None, user: str = "sandbox"
) -> runs.RunRecord:
    return runs.RunRecord(
        id=run_id, argv=("x.php",), php=True, user=user, xdebug="off", started=started, ended=ended
    )


def test_run_records_round_trip_and_skip_damaged_ones(tmp_path: Path) -> None:
    record = _record(RUN_ID, 100.0, 110.5)
    runs.save_record(tmp_path, record)
    assert runs.RunRecord.from_json(record.to_json()) == record
    damaged = runs.runs_dir(tmp_path) / "20261123-140001-ffff"
    damaged.mkdir()
    (damaged / paths.RUN_FILE).write_text("{")
    assert runs.load_records(tmp_path) == [record]


def _attempt(ident: str, moment: float, *, uid: int | None, pid: int = 4242) -> Attempt:
    return Attempt(
        id=ident,
        time=iso_time(moment),
        verdict=Verdict.BLOCKED,
        proto="tcp",
        family=4,
        dst="198.51.100.9",
        dport=80,
        uid=uid,
        pid=pid,
    )


def test_attempts_of_the_run_user_during_a_run_are_the_runs(tmp_path: Path) -> None:
    runs.save_record(tmp_path, _record("20261123-140000-aaaa", 1000.0, 1010.0))
    runs.save_record(tmp_path, _record("20261123-140100-bbbb", 1060.0, None))  # still going
    runs.save_record(tmp_path, _record("20261123-140200-cccc", 1200.0, 1210.0, user="root"))
    attempts = [
        _attempt("during", 1005.0, uid=1000),
        _attempt("root-process", 1005.0, uid=0),
        _attempt("just-after", 1013.0, uid=1000),  # the settle window
        _attempt("between", 1030.0, uid=1000),
        _attempt("open-run", 1100.0, uid=1000),
        _attempt("root-run", 1205.0, uid=1000),  # a root run's own attempts need its trace
    ]
    tied = {a.id: a.run for a in runs.annotate(attempts, tmp_path)}
    assert tied == {
        "during": "20261123-140000-aaaa",
        "root-process": None,
        "just-after": "20261123-140000-aaaa",
        "between": None,
        "open-run": "20261123-140100-bbbb",
        "root-run": None,
    }


def test_overlapping_runs_leave_the_run_user_attempts_untied(tmp_path: Path) -> None:
    runs.save_record(tmp_path, _record("20261123-140000-aaaa", 1000.0, 1010.0))
    runs.save_record(tmp_path, _record("20261123-140001-bbbb", 1001.0, 1011.0))
    (attempt,) = runs.annotate([_attempt("x", 1005.0, uid=1000)], tmp_path)
    assert attempt.run is None


def test_attempts_already_tied_stay_as_they_are(tmp_path: Path) -> None:
    runs.save_record(tmp_path, _record("20261123-140000-aaaa", 1000.0, 1010.0))
    tied = _attempt("x", 1005.0, uid=1000)
    import dataclasses

    tied = dataclasses.replace(tied, run="earlier")
    assert runs.annotate([tied], tmp_path) == [tied]


# ---- a hostile guest's output names -----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "trace.1234.5f3a1b.xt",
        "trace.1234.5f3a1b.xt.gz",
        "cachegrind.out.77.ab12",
        "coverage.4242.a1b2c3.json",
    ],
)
def test_output_names_of_the_expected_shapes_stay_inside(name: str, tmp_path: Path) -> None:
    assert runs.local_output_path(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize(
    "name",
    [
        "../../x",
        "/etc/cron.d/x",
        "trace.1.ab.xt/../../../etc/passwd",
        "..",
        "trace.1.ab.xt\n",
        "trace.1.ab.xt.sh",
        "evil",
        "",
        "trace.1.AB.xt",
        "coverage.1.abc.json..",
    ],
)
def test_other_names_are_never_fetched(name: str, tmp_path: Path) -> None:
    assert runs.local_output_path(tmp_path, name) is None


def test_guest_clock_and_counts_are_parsed_strictly() -> None:
    assert guest_seconds("1796461664.068816\n", "x") == 1796461664.068816
    for bad in ("nan", "inf", "1e400", "²", "1" * 5000, "-5"):
        with pytest.raises(GuestError):
            guest_seconds(bad, "finishing the run")


# --- sandbox serve -----------------------------------------------------------------------------


def test_serve_request_runs_the_built_in_server_on_the_guest_loopback(tmp_path: Path) -> None:
    (tmp_path / "public").mkdir()
    (tmp_path / "router.php").write_text("<?php return false;")
    request = runs.serve_request(
        tmp_path, guest_port=24567, docroot="public/", router="router.php", env=(("A", "b"),)
    )
    assert request.argv == (
        "php",
        "-d",
        f"auto_prepend_file={xdebug.SERVE_PREPEND_PATH}",
        "-S",
        "127.0.0.1:24567",
        "-t",
        "public",
        xdebug.SERVE_ROUTER,
    )
    assert not request.php and request.workdir == tmp_path and request.env == (("A", "b"),)
    assert request.interrupt_ends
    assert dict(request.extra_files) == {
        xdebug.SERVE_PREPEND_PATH: xdebug.SERVE_PREPEND,
        xdebug.SERVE_ROUTER: xdebug.serve_router("router.php"),
    }
    assert "return require __DIR__ . '/router.php';" in xdebug.serve_router("router.php")
    assert xdebug.serve_router("it's.php").endswith("'/it\\'s.php';\n")
    # The whole directory goes up; the server runs in the run's directory.
    plan = runs.plan(request)
    assert plan.upload_dir == tmp_path and plan.argv == request.argv
    assert runs.serve_request(tmp_path, guest_port=1).argv[-2:] == ("-t", ".")


@pytest.mark.parametrize(
    ("docroot", "router", "message"),
    [
        ("..", None, "is not a directory inside"),
        ("missing", None, "is not a directory inside"),
        (".", "../outside.php", "is not a file inside"),
        (".", "missing.php", "is not a file inside"),
    ],
)
def test_serve_request_keeps_to_the_workdir(
    tmp_path: Path, docroot: str, router: str | None, message: str
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (tmp_path / "outside.php").write_text("<?php")
    with pytest.raises(NotFoundError, match=message):
        runs.serve_request(app, guest_port=1, docroot=docroot, router=router)
    with pytest.raises(NotFoundError, match="no such directory"):
        runs.serve_request(tmp_path / "nope", guest_port=1)


def test_attempts_tied_while_the_run_went_on_get_their_stack_once_its_traces_are_here(
    tmp_path: Path,
) -> None:
    """A collection during the run ties the run user's attempts to it before any trace is
    fetched; the collection after the run, with the traces here, gives them their stacks. Real
    attempts and traces of a Composer run (tests/data/xdebug/composer)."""
    import dataclasses
    import shutil

    sample = Path(__file__).parent / "data" / "xdebug" / "composer"
    attempts = [
        Attempt.from_json(line) for line in (sample / "attempts.jsonl").read_text().splitlines()
    ]
    moments = [parse_time(a.time).timestamp() for a in attempts]
    run_id = "20261205-174515-e1a5"
    runs.save_record(tmp_path, _record(run_id, min(moments) - 7.0, None))  # still going
    during = runs.annotate(attempts, tmp_path)
    assert {a.run for a in during} == {run_id} and not any(a.stack for a in during)
    assert runs.annotate(during, tmp_path) == during  # no trace yet: nothing to redo

    runs.save_record(tmp_path, _record(run_id, min(moments) - 7.0, max(moments) + 1.0))
    directory = runs.runs_dir(tmp_path) / run_id / paths.XDEBUG_DIR
    directory.mkdir(parents=True)
    for trace in sample.glob("trace.*"):
        shutil.copy(trace, directory / trace.name)
    after = runs.annotate(during, tmp_path)
    assert [a.stack[0].function for a in after] == ["curl_setopt"] * 4
    assert [dataclasses.replace(a, stack=()) for a in after] == during
    # Attempts of processes with no trace, tied to the run, stay as they are.
    other = dataclasses.replace(during[0], pid=1)
    assert runs.annotate([other], tmp_path) == [other]

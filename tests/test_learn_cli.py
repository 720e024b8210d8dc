"""Learn mode at the command line: which learn mode `--learn` with `--sinkhole` (or without)
asks for on `up` and on the one-shot `run --rm`, the one-shot's policy options, the combinations
refused, and what `logs`, `report`, `policy suggest` and `status` say of logs made in each mode.
The core is patched where it would boot a VM; the recorded sandboxes of tests/data/report stand
in for a learning sandbox's logs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cli, lifecycle, paths
from orchestrator.config import Settings
from orchestrator.egress.policy import Blocked, EgressPolicy, Learn, build_policy
from orchestrator.errors import SandboxError

from .test_report import DATA, RUN_1

SCRIPT = Path(__file__).resolve().parent / "data" / "learn" / "learn_me.php"
SHOUT = "allows ALL egress"
SAID = "learn mode under the sinkhole"


class Stop(SandboxError):
    """Raised by the patched core once it has what the test asserts: nothing boots."""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("SANDBOX_CONFIG", raising=False)
    monkeypatch.delenv("SANDBOX_CONNECT", raising=False)
    return tmp_path


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every lifecycle.up and lifecycle.run_once the CLI made."""
    seen: list[dict[str, Any]] = []

    def record(*args: object, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise Stop("stopped by the test", "")

    monkeypatch.setattr(lifecycle, "up", record)
    monkeypatch.setattr(lifecycle, "run_once", record)
    return seen


def last_policy(calls: list[dict[str, Any]]) -> EgressPolicy:
    policy = calls[-1]["policy"]
    assert isinstance(policy, EgressPolicy)
    return policy


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("verb", [["up"], ["run", "--rm"]])
def test_learn_with_sinkhole_learns_under_the_sinkhole_and_does_not_shout(
    verb: list[str],
    env: Path,
    calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*verb, "--learn", "--sinkhole", *([str(SCRIPT)] if "run" in verb else [])]
    code, err = _main(argv, capsys)
    assert code == Stop.exit_code and "stopped by the test" in err, err
    policy = last_policy(calls)
    assert (policy.learn, policy.sinkhole, policy.allow, policy.dns) == (
        Learn.SINKHOLE,
        True,
        (),
        True,
    )
    assert SAID in err and "LEARN MODE (sinkhole):" in err
    assert SHOUT not in err and "WARNING:" not in err


@pytest.mark.parametrize("verb", [["up"], ["run", "--rm"]])
@pytest.mark.parametrize("extra", [[], ["--no-sinkhole"]])
def test_learn_alone_is_allow_all_and_loud(
    verb: list[str],
    extra: list[str],
    env: Path,
    calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*verb, "--learn", *extra, *([str(SCRIPT)] if "run" in verb else [])]
    code, err = _main(argv, capsys)
    assert code == Stop.exit_code, err
    policy = last_policy(calls)
    assert policy.learn is Learn.ALLOW_ALL and not policy.sinkhole
    assert policy.allows("tcp", "203.0.113.7", 443)
    assert "WARNING:" in err and SHOUT in err and SAID not in err


def test_the_one_shot_takes_sinkhole_blocked_and_pcap_like_up(
    env: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--rm", "--sinkhole", "--blocked", "drop", "--pcap", str(SCRIPT)]
    code, err = _main(argv, capsys)
    assert code == Stop.exit_code, err
    policy = last_policy(calls)
    assert policy.sinkhole and policy.blocked is Blocked.DROP and policy.learn is Learn.OFF
    assert calls[-1]["capture"] is True
    assert "LEARN" not in err
    code, err = _main(["run", "--rm", str(SCRIPT)], capsys)
    plain = calls[-1]
    assert plain["capture"] is False and not last_policy(calls).sinkhole
    assert last_policy(calls).blocked is Blocked.REJECT


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["--learn", "--no-dns"], "learn mode learns names at the sandbox's resolver", "--no-dns"),
        (["--learn", "--sinkhole", "--no-dns"], "--no-dns turns it off", "drop --no-dns"),
        (
            ["--learn", "--sinkhole", "--allow", "203.0.113.7:443"],
            "would let these out: 203.0.113.7:443",
            "without --learn",
        ),
        (["--blocked", "sideways"], "--blocked 'sideways'", "use reject or drop"),
    ],
)
@pytest.mark.parametrize("verb", [["up"], ["run", "--rm"]])
def test_combinations_that_would_not_learn_what_they_say_are_usage_errors(
    verb: list[str],
    argv: list[str],
    message: str,
    hint: str,
    env: Path,
    calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = _main([*verb, *argv, *([str(SCRIPT)] if "run" in verb else [])], capsys)
    assert code == 2, err
    assert message in err and "hint:" in err and hint in err, err
    assert calls == []  # refused before anything was made


def test_learn_without_sinkhole_and_a_policy_file_that_sinkholes_asks_which(
    env: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = env / "p.yaml"
    policy.write_text("sinkhole: true\n")
    code, err = _main(["up", "--learn", "--policy", str(policy)], capsys)
    assert code == 2 and "the policy file turns sinkhole mode on" in err, err
    assert "--no-sinkhole" in err and calls == []
    # Said which: under the sinkhole, or allow-all.
    _main(["up", "--learn", "--sinkhole", "--policy", str(policy)], capsys)
    assert last_policy(calls).learn is Learn.SINKHOLE
    _main(["up", "--learn", "--no-sinkhole", "--policy", str(policy)], capsys)
    assert last_policy(calls).learn is Learn.ALLOW_ALL and not last_policy(calls).sinkhole


@pytest.mark.parametrize("option", [["--sinkhole"], ["--blocked", "drop"], ["--pcap"]])
def test_the_one_shot_options_need_a_one_shot(
    option: list[str], env: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main(["run", *option, str(SCRIPT)], capsys)
    assert code == 2 and f"{option[0]}" in err and "make a one-shot sandbox" in err, err
    assert "add --rm" in err and calls == []


# ---- what the views say of learned logs ----------------------------------------------------


@pytest.fixture
def logs(env: Path) -> Path:
    """A destroyed sandbox's logs (tests/data/report/rpa) where the CLI finds them."""
    dirs = paths.Dirs(data=env / "data", state=env / "state" / paths.APP, config=env / "cfg")
    shutil.copytree(DATA / "rpa", dirs.sandbox("rpa"))
    return dirs.sandbox("rpa") / paths.LOGS_DIR


def _ctx(env: Path) -> lifecycle.Context:
    dirs = paths.Dirs(data=env / "data", state=env / "state" / paths.APP, config=env / "cfg")
    return lifecycle.Context(settings=Settings(), dirs=dirs)


@pytest.mark.parametrize(
    ("record", "mode"),
    [
        (None, Learn.OFF),
        ('{"learn": "sinkhole", "since": "x"}', Learn.SINKHOLE),
        ('{"learn": "allow-all", "since": "x"}', Learn.ALLOW_ALL),
        # Damaged, or a mode this version does not know: the loud side of a doubt.
        ("{not json", Learn.ALLOW_ALL),
        ('{"learn": "teleport"}', Learn.ALLOW_ALL),
        ('{"learn": "off"}', Learn.ALLOW_ALL),
    ],
)
def test_the_learn_record_names_the_mode(
    record: str | None, mode: Learn, logs: Path, env: Path
) -> None:
    if record is not None:
        (logs / paths.LEARN_RECORD).write_text(record)
    assert lifecycle.learned_mode(_ctx(env), "rpa") is mode
    assert lifecycle.learned(_ctx(env), "rpa") is (record is not None)


def test_views_of_logs_learned_under_the_sinkhole_say_so_plainly(
    logs: Path, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (logs / paths.LEARN_RECORD).write_text(json.dumps({"learn": "sinkhole", "since": "x"}))
    for argv in (
        ["logs", "--name", "rpa"],
        ["report", "--name", "rpa", "--run", RUN_1],
        ["policy", "suggest", "--name", "rpa"],
    ):
        code, err = _main(argv, capsys)
        assert code == 0, (argv, err)
        assert SAID in err and "LEARN MODE (sinkhole):" in err, (argv, err)
        assert SHOUT not in err and "WARNING:" not in err, (argv, err)
    _main(["policy", "suggest", "--name", "rpa"], capsys)
    (logs / paths.LEARN_RECORD).write_text(json.dumps({"learn": "allow-all", "since": "x"}))
    for argv in (["logs", "--name", "rpa"], ["policy", "suggest", "--name", "rpa"]):
        code, err = _main(argv, capsys)
        assert code == 0 and SHOUT in err and "WARNING:" in err and SAID not in err, err


def test_a_suggestion_says_which_mode_its_logs_were_made_in(logs: Path, env: Path) -> None:
    def header() -> str:
        text = lifecycle.suggest_policy(_ctx(env), "rpa", None, lambda warning: None)
        return "\n".join(line for line in text.splitlines() if line.startswith("# from "))

    assert "not made in learn mode" in header()
    (logs / paths.LEARN_RECORD).write_text(json.dumps({"learn": "sinkhole"}))
    assert "made in learn mode under the sinkhole" in header()
    (logs / paths.LEARN_RECORD).write_text(json.dumps({"learn": "allow-all"}))
    assert "made in learn mode (allow-all)" in header()


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (Learn.SINKHOLE, "learn mode under the sinkhole: nothing is let out"),
        (Learn.ALLOW_ALL, "learn mode: ALL egress allowed"),
        (Learn.OFF, None),
    ],
)
def test_policy_show_says_the_learn_mode(
    mode: Learn,
    said: str | None,
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = dataclasses.replace(build_policy([], sinkhole=True), learn=mode)
    report = lifecycle.PolicyReport("p", policy, {4: "*filter\n"}, "<filter/>", ())
    monkeypatch.setattr(lifecycle, "policy_report", lambda ctx, name: report)
    assert cli.main(["policy", "show", "--name", "p"]) == 0
    shown = capsys.readouterr().out
    if said is None:
        assert "learn mode" not in shown
    else:
        assert said in shown

"""The chaos runner's command line without Kafka: --resume (which runs it skips, the
options it takes from the report, the options it refuses), the --plan arithmetic and the
report's line on the code the runs ran."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import collect, plan
from tests.chaos.cluster import sweep
from tests.chaos.report import code_line, commits, write
from tests.chaos.runner import (
    DEFAULTS,
    USAGE_ERROR,
    main,
    parse_args,
    remaining,
    resolve,
    run_key,
    scheduled,
)


def report(tmp_path: Path, runs: list[dict[str, Any]], **options: Any) -> Path:
    recorded = {
        **DEFAULTS,
        "scenario": ["poison", "agent_raises"],
        "runs": 2,
        "messages": 3000,
        "seed": 7,
        **options,
    }
    doc = {"meta": {"messages": recorded["messages"], "options": recorded}, "runs": runs}
    (tmp_path / "report.json").write_text(json.dumps(doc))
    return tmp_path


def run(scenario: str, guarantee: str, number: int, ok: bool = True) -> dict[str, Any]:
    return {"scenario": scenario, "guarantee": guarantee, "run": number, "ok": ok}


def test_resume_takes_the_reports_options_and_skips_its_runs(tmp_path: Path) -> None:
    done = [run("poison", "at_least_once", 1), run("poison", "at_least_once", 2, ok=False)]
    args = resolve(parse_args(["--resume", str(report(tmp_path, done))]))
    assert (args.messages, args.runs, args.seed) == (3000, 2, 7)
    assert args.scenario == ["poison", "agent_raises"] and args.out == tmp_path
    assert len(scheduled(args)) == 8
    left = [(sc.name, g, n) for sc, g, n in remaining(args)]
    # a recorded run is not made again, failed or not
    assert left == [
        ("poison", "exactly_once", 1),
        ("poison", "exactly_once", 2),
        ("agent_raises", "at_least_once", 1),
        ("agent_raises", "at_least_once", 2),
        ("agent_raises", "exactly_once", 1),
        ("agent_raises", "exactly_once", 2),
    ]


def test_resume_accepts_explicit_options_that_agree(tmp_path: Path) -> None:
    out = report(tmp_path, [])
    argv = ["--resume", str(out), "--messages", "3000", "--scenario", "poison"]
    argv += ["--scenario", "agent_raises", "--guarantee", "both"]
    args = resolve(parse_args(argv))
    assert args.messages == 3000 and len(remaining(args)) == 8


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--messages", "5000"], "--messages 5000 conflicts with 3000"),
        (["--scenario", "poison"], "--scenario poison conflicts with poison,agent_raises"),
        (["--guarantee", "exactly_once"], "--guarantee exactly_once conflicts with both"),
        (["--runs", "3"], "--runs 3 conflicts with 2"),
    ],
)
def test_resume_refuses_conflicting_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    out = report(tmp_path, [])
    assert main(["--resume", str(out), *extra]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and str(out) in err


def test_resume_refuses_a_dir_without_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--resume", str(tmp_path), "--plan"]) == USAGE_ERROR
    assert "no report.json" in capsys.readouterr().err


def test_resume_of_an_older_report_reads_its_meta_and_run_dirs(tmp_path: Path) -> None:
    old = {
        "scenario": "poison",
        "guarantee": "exactly_once",
        "dir": str(tmp_path / "poison" / "exactly_once" / "run2"),
    }
    doc = {"meta": {"messages": 1500, "session_timeout_s": 10.0}, "runs": [old]}
    (tmp_path / "report.json").write_text(json.dumps(doc))
    args = resolve(parse_args(["--resume", str(tmp_path), "--scenario", "poison"]))
    assert args.messages == 1500 and run_key(old) == ("poison", "exactly_once", 2)
    assert ("poison", "exactly_once", 2) not in [(s.name, g, n) for s, g, n in remaining(args)]


def test_redo_makes_a_scenarios_runs_again_and_keeps_the_old_ones_as_superseded(
    tmp_path: Path,
) -> None:
    failed = {**run("poison", "at_least_once", 2, ok=False), "commit": "a" * 40}
    done = [
        run("poison", "at_least_once", 1),
        failed,
        run("poison", "exactly_once", 1),
        run("agent_raises", "at_least_once", 1),
    ]
    out = report(tmp_path, done)
    args = resolve(parse_args(["--resume", str(out), "--redo", "poison:at_least_once"]))
    left = [(sc.name, g, n) for sc, g, n in remaining(args)]
    # both at-least-once poison runs again (the passed one too: one commit per row)
    assert left[:2] == [("poison", "at_least_once", 1), ("poison", "at_least_once", 2)]
    assert ("poison", "exactly_once", 1) not in left
    assert [run_key(r) for r in args.superseded] == [
        ("poison", "at_least_once", 1),
        ("poison", "at_least_once", 2),
    ]
    assert all("superseded_at" in r for r in args.superseded)
    # the report counts only the runs kept, and lists the superseded ones
    summary = write(tmp_path / "w", args.previous, {}, {}, superseded=args.superseded)
    rows = {(r["scenario"], r["guarantee"]): r for r in summary["rows"]}
    assert ("poison", "at_least_once") not in rows
    md = (tmp_path / "w" / "report.md").read_text()
    assert (
        "## Superseded runs" in md and f"| poison | at_least_once | 2 | {'a' * 12} | **no** |" in md
    )
    kept = json.loads((tmp_path / "w" / "report.json").read_text())
    assert len(kept["superseded"]) == 2 and len(kept["runs"]) == 2


def test_a_resumed_report_keeps_its_superseded_runs(tmp_path: Path) -> None:
    out = report(tmp_path, [run("poison", "exactly_once", 1)])
    doc = json.loads((out / "report.json").read_text())
    doc["superseded"] = [{**run("poison", "at_least_once", 1, ok=False), "superseded_at": "x"}]
    (out / "report.json").write_text(json.dumps(doc))
    args = resolve(parse_args(["--resume", str(out), "--redo", "poison:exactly_once"]))
    assert [(r["guarantee"], r["run"]) for r in args.superseded] == [
        ("at_least_once", 1),
        ("exactly_once", 1),
    ]
    assert args.previous == []


@pytest.mark.parametrize(
    ("redo", "said"),
    [
        ("nosuch", "no scenario 'nosuch'"),
        ("poison:maybe", "not 'maybe'"),
        ("agent_raises", "records no such run"),
    ],
)
def test_redo_refuses_what_it_cannot_redo_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redo: str, said: str
) -> None:
    out = report(tmp_path, [run("poison", "at_least_once", 1)])
    assert main(["--resume", str(out), "--redo", redo, "--plan"]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err


def test_redo_needs_resume(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redo", "poison", "--plan"]) == USAGE_ERROR
    assert "--redo needs --resume" in capsys.readouterr().err


def test_the_plan_is_runs_times_load_plus_overhead() -> None:
    rows = plan.plan([("x", 100.0, 3), ("y", 50.0, 1)], 2, 10_000, fixed={"x": 10.0, "y": 20.0})
    x, y = rows
    per_msg = plan.PER_MESSAGE_S * 10_000
    assert (x.runs, x.load_s, x.overhead_s) == (6, 100.0, 10.0 + per_msg)
    assert x.total_s == pytest.approx(6 * (110.0 + per_msg))
    assert (y.runs, y.load_s) == (2, 200.0)
    assert y.total_s == pytest.approx(2 * (220.0 + per_msg))
    # runs already made are left out
    (left,) = plan.plan([("x", 100.0, 3)], 2, 10_000, done={"x": 4})
    assert left.runs == 2
    text = plan.render(rows, 10_000, 2)
    assert text.splitlines()[-1].split()[:2] == ["total", "8"]


def test_the_overhead_of_a_recorded_run(tmp_path: Path) -> None:
    r = {"ok": True, "scenario": "x", "messages": 10_000, "rate": 100.0, "wall_s": 150.0}
    assert plan.run_overhead_s(r) == pytest.approx(50.0 - plan.PER_MESSAGE_S * 10_000)
    r2 = {**r, "wall_s": 160.0, "broker_start_s": 10.0}
    bad = {**r, "wall_s": 900.0, "ok": False}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"runs": [r, r2, bad]}))
    assert plan.measured_overheads([path]) == {"x": round(60.0 - plan.PER_MESSAGE_S * 10_000, 1)}
    assert plan.overhead_s("x", 0, {"x": 5.0}) == 5.0
    # a fault that outlasted the load: the run's overhead starts after the fault
    spill = {**r, "load_phase_s": 130.0}
    assert plan.run_overhead_s(spill) == pytest.approx(20.0 - plan.PER_MESSAGE_S * 10_000)


def test_the_plan_of_a_resumed_run_counts_the_runs_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = report(tmp_path, [run("poison", "at_least_once", 1), run("poison", "exactly_once", 1)])
    assert main(["--resume", str(out), "--plan"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["poison"][1] == "2" and rows["agent_raises"][1] == "4"
    assert rows["total"][1] == "6"


def test_the_report_says_when_the_runs_span_several_commits() -> None:
    same = commits([{"commit": "a" * 40, "dirty": False}] * 2)
    assert code_line(same) == f"Code: every run on {'a' * 12}."
    mixed = commits([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}])
    assert [m["runs"] for m in mixed] == [1, 1]
    line = code_line(mixed)
    assert "span 2 different versions" in line and "(uncommitted changes)" in line


def test_sweep_kills_only_processes_of_ours(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run1").mkdir()
        (tmp_path / "run1" / "w0.pid").write_text(f"{other.pid}\n")
        (tmp_path / "run1" / "broker.pid").write_text("not a pid\n")
        assert sweep(tmp_path) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert sweep(tmp_path / "missing") == []


async def test_stopping_a_task_that_swallows_its_cancellation_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reading task that loses its cancellation (as `asyncio.wait_for` can on 3.11)
    once hung a run's tear-down for good; and the wait for it swallowed the runner's
    own cancellation, so a SIGTERM did not stop the run."""
    monkeypatch.setattr(collect, "STOP_WAIT_S", 0.2)
    done = asyncio.Event()

    async def stubborn() -> None:
        while not done.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # lost

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    try:
        error = await asyncio.wait_for(collect.stop_task(task), 5)
        assert isinstance(error, RuntimeError)
        # the caller's own cancellation is not swallowed while it waits
        stopper = asyncio.create_task(collect.stop_task(task))
        await asyncio.sleep(0.05)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
    finally:
        done.set()
        await task


SWITCH = "AGENTSTREAM_DELIVERY"


def test_the_delivery_path_is_native_unless_asked_or_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SWITCH, raising=False)
    assert resolve(parse_args(["--out", str(tmp_path)])).delivery == "native"
    assert resolve(parse_args(["--delivery", "per-record"])).delivery == "per-record"
    # the setting in the runner's environment, as a worker's would be
    monkeypatch.setenv(SWITCH, "per-record")
    assert resolve(parse_args([])).delivery == "per-record"
    assert resolve(parse_args(["--delivery", "native"])).delivery == "native"


def test_resume_keeps_the_reports_delivery_path_and_refuses_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(SWITCH, raising=False)
    (tmp_path / "native").mkdir()
    (tmp_path / "older").mkdir()
    native = report(tmp_path / "native", [], delivery="native")
    assert resolve(parse_args(["--resume", str(native)])).delivery == "native"
    assert main(["--resume", str(native), "--delivery", "per-record"]) == USAGE_ERROR
    assert "--delivery per-record conflicts with native" in capsys.readouterr().err
    # a report written before the option was made per record: neither the default nor
    # the setting in the environment turns its remaining runs native
    older = report(tmp_path / "older", [])
    doc = json.loads((older / "report.json").read_text())
    del doc["meta"]["options"]["delivery"]
    (older / "report.json").write_text(json.dumps(doc))
    assert resolve(parse_args(["--resume", str(older)])).delivery == "per-record"
    monkeypatch.setenv(SWITCH, "native")  # exported for the workers, say
    assert resolve(parse_args(["--resume", str(older)])).delivery == "per-record"
    assert main(["--resume", str(older), "--delivery", "native", "--plan"]) == USAGE_ERROR
    assert "--delivery native conflicts with per-record" in capsys.readouterr().err
    # and one from before the options were recorded at all
    oldest = tmp_path / "oldest"
    oldest.mkdir()
    (oldest / "report.json").write_text(json.dumps({"meta": {"messages": 1500}, "runs": []}))
    assert resolve(parse_args(["--resume", str(oldest)])).delivery == "per-record"
    # a native report resumed with the variable saying per-record stays native too
    monkeypatch.setenv(SWITCH, "per-record")
    assert resolve(parse_args(["--resume", str(native)])).delivery == "native"


@pytest.mark.parametrize("value", ["per_record", "Per-Record", " per-record", "batch"])
def test_a_delivery_path_no_worker_would_take_is_refused_not_run_as_the_default(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SWITCH, value)
    assert main(["--plan"]) == USAGE_ERROR
    assert f"AGENTSTREAM_DELIVERY={value!r} is not a delivery path" in capsys.readouterr().err


def test_a_run_fails_when_its_workers_did_not_run_the_path_it_names() -> None:
    from tests.chaos.harness import NATIVE_MARK, delivery_check

    native_log = f"... INFO {NATIVE_MARK} agentstream.agents.security ...\n"
    assert delivery_check(True, {"w0": native_log, "w1": native_log}) is None
    assert delivery_check(False, {"w0": "Ready\n", "w1": "Ready\n"}) is None
    missing = delivery_check(True, {"w0": native_log, "w1": "Ready\n"})
    assert missing is not None and "['w1'] never logged it" in missing
    stray = delivery_check(False, {"w0": native_log, "w1": "Ready\n"})
    assert stray is not None and "['w0'] logged the native one" in stray


def test_the_workers_environment_follows_the_runs_delivery_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.chaos.harness import RunOptions, _base_env

    monkeypatch.setenv(SWITCH, "per-record")
    opts = RunOptions("poison", "at_least_once", 10, tmp_path, "127.0.0.1:1")
    assert _base_env(opts, "ns").get(SWITCH) == "per-record"  # None: the caller's
    opts.delivery = "native"
    assert _base_env(opts, "ns")[SWITCH] == "native"
    monkeypatch.delenv(SWITCH)
    opts.delivery = "per-record"
    assert _base_env(opts, "ns")[SWITCH] == "per-record"

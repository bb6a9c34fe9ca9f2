"""The chaos report's failure-rate bound and its rewriting (no Kafka)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.report import failure_rate_bound, rewrite, write


@pytest.mark.parametrize(
    ("failed", "runs", "bound"),
    [
        (
            0,
            3,
            1 - 0.05 ** (1 / 3),
        ),  # no failure: 1 - alpha^(1/n), the "rule of three"'s exact form
        (0, 10, 1 - 0.05 ** (1 / 10)),
        (0, 92, 1 - 0.05 ** (1 / 92)),
        (1, 10, 0.3942),  # Clopper-Pearson tables
        (2, 100, 0.0616),
    ],
)
def test_the_bound_is_the_exact_one_sided_binomial_bound(
    failed: int, runs: int, bound: float
) -> None:
    assert failure_rate_bound(failed, runs) == pytest.approx(bound, abs=5e-5)


def test_more_runs_without_failure_bound_the_rate_tighter_and_failures_loosen_it() -> None:
    assert failure_rate_bound(0, 30) < failure_rate_bound(0, 10) < failure_rate_bound(0, 3)
    assert failure_rate_bound(1, 30) > failure_rate_bound(0, 30)
    assert failure_rate_bound(3, 3) == 1.0 and failure_rate_bound(0, 0) == 1.0


def _run(scenario: str, ok: bool) -> dict[str, object]:
    return {
        "scenario": scenario,
        "guarantee": "exactly_once",
        "ok": ok,
        "messages": 100,
        "check": {"lost": 0 if ok else 5, "duplicates": 0},
        "drained": True,
        "drain_s": 1.0,
        "failures": [] if ok else ["lost 5"],
    }


def test_the_report_states_the_bound_per_row_and_for_all_runs(tmp_path: Path) -> None:
    runs = [_run("worker_kill", True) for _ in range(9)] + [_run("worker_kill", False)]
    runs += [_run("poison", True) for _ in range(3)]
    summary = write(tmp_path, runs, {}, {"messages": 100})
    rows = {r["scenario"]: r for r in summary["rows"]}
    assert rows["worker_kill"]["failed_runs"] == 1
    assert rows["worker_kill"]["failure_rate_bound"] == pytest.approx(0.3942, abs=1e-4)
    assert rows["poison"]["failure_rate_bound"] == pytest.approx(0.6316, abs=1e-4)
    assert summary["total"]["runs"] == 13 and summary["total"]["failed_runs"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "All scenarios: 13 run(s), 1 failed; pooled, a failure rate of at most" in md
    assert "| worker_kill | exactly_once | 10 | 1 | 39.4% |" in md


def test_a_recorded_report_is_rewritten_from_its_runs(tmp_path: Path) -> None:
    runs = [_run("poison", True) for _ in range(3)]
    write(tmp_path, runs, {"leader_kill": "a cluster"}, {"messages": 100})
    doc = json.loads((tmp_path / "report.json").read_text())
    del doc["total"]  # a report written before the bound existed
    (tmp_path / "report.json").write_text(json.dumps(doc))
    (tmp_path / "report.md").write_text("old\n")
    summary = rewrite(tmp_path)
    assert summary["total"]["runs"] == 3
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["runs"] == doc["runs"] and again["skipped"] == {"leader_kill": "a cluster"}
    assert "failure rate" in (tmp_path / "report.md").read_text()

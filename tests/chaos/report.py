"""report.json and report.md: per scenario and guarantee, the runs, failed runs, the
failure rate they bound, lost, duplicates, resume_after_kill_s p50/max, drain time and
notes."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.chaos.checker import percentile

#: the confidence of the failure-rate bounds the report gives (one-sided)
CONFIDENCE = 0.95


def failure_rate_bound(failed: int, runs: int, confidence: float = CONFIDENCE) -> float:
    """The highest failure rate still consistent with `failed` failures in `runs` runs:
    the exact (Clopper-Pearson) one-sided upper bound, i.e. the p at which seeing at most
    `failed` failures has probability 1 - `confidence`. No failure in 3 runs bounds it
    only at 63 %, in 92 at 3.2 %: how many runs a claim stands on is what it says."""
    if runs <= 0:
        return 1.0
    if failed >= runs:
        return 1.0
    alpha = 1.0 - confidence

    def at_most(p: float) -> float:  # P(X <= failed) for X ~ Binomial(runs, p)
        return sum(math.comb(runs, i) * p**i * (1.0 - p) ** (runs - i) for i in range(failed + 1))

    lo, hi = failed / runs, 1.0
    for _ in range(60):  # at_most falls as p grows: bisect to ~1e-18
        mid = (lo + hi) / 2
        if at_most(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def summarise(runs: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["scenario"], r["guarantee"])].append(r)
    rows = []
    for (name, guarantee), rs in groups.items():
        resumes = [x for r in rs for x in r.get("resume_after_kill_s", [])]
        drains = [r["drain_s"] for r in rs if r.get("drain_s") is not None]
        checks = [r.get("check", {}) for r in rs]
        notes: list[str] = []
        for r in rs:
            for n in r.get("notes", []):
                if n not in notes:
                    notes.append(n)
            for f in r.get("failures", []):
                line = f"failed: {f}"
                if line not in notes:
                    notes.append(line)
            for w in r.get("check", {}).get("warnings", []):
                if w not in notes:
                    notes.append(w)
        rows.append(
            {
                "scenario": name,
                "guarantee": guarantee,
                "runs": len(rs),
                "failed_runs": sum(1 for r in rs if not r.get("ok")),
                "failure_rate_bound": round(
                    failure_rate_bound(sum(1 for r in rs if not r.get("ok")), len(rs)), 4
                ),
                "messages_per_run": rs[0].get("messages"),
                "lost": sum(c.get("lost", 0) for c in checks),
                "lost_per_run": [c.get("lost") for c in checks],
                #: runs whose pipeline had not drained at the deadline (stalled or crash-
                #: looping workers): their "lost" inputs were not processed in time
                "not_drained_runs": sum(1 for r in rs if not r.get("drained")),
                "duplicates": sum(c.get("duplicates", 0) for c in checks),
                "duplicates_per_run": [c.get("duplicates") for c in checks],
                "decision_duplicates": sum(c.get("decision_duplicates", 0) for c in checks),
                "dup_bound_per_run": [c.get("dup_bound") for c in checks],
                "order_violations": sum(c.get("order_violations", 0) for c in checks),
                "faults": sum(len(r.get("faults", [])) for r in rs),
                "resume_after_kill_s": {
                    "n": len(resumes),
                    "p50": _round(percentile(resumes, 50)),
                    "max": _round(max(resumes) if resumes else None),
                },
                "drain_s": {
                    "p50": _round(percentile(drains, 50)),
                    "max": _round(max(drains) if drains else None),
                    "timed_out": sum(1 for r in rs if r.get("drain_s") is None),
                },
                "cpu_s_per_run": _round(sum(r.get("cpu_s", 0) for r in rs) / len(rs)),
                "wall_s_per_run": _round(sum(r.get("wall_s", 0) for r in rs) / len(rs)),
                "notes": notes,
            }
        )
    failed = sum(1 for r in runs if not r.get("ok"))
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "total": {
            "runs": len(runs),
            "failed_runs": failed,
            "failure_rate_bound": round(failure_rate_bound(failed, len(runs)), 4),
            "confidence": CONFIDENCE,
        },
        "skipped": skipped,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def write(
    out: Path,
    runs: list[dict[str, Any]],
    skipped: dict[str, str],
    meta: dict[str, Any],
    superseded: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """report.json and report.md in `out`. `superseded`: runs made again (`--redo`), which
    the table no longer counts but the report still lists."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, skipped)
    summary["meta"] = meta
    summary["commits"] = commits(runs)
    summary["superseded"] = [
        {k: v for k, v in r.items() if k != "events"} for r in superseded or []
    ]
    brief = [{k: v for k, v in r.items() if k != "events"} for r in runs]
    _replace(out / "report.json", json.dumps({**summary, "runs": brief}, indent=1, default=str))
    _replace(out / "report.md", markdown(summary))
    return summary


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a runner killed mid-write leaves the last one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commits(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The code the runs ran: each (commit, dirty) with its number of runs, in order."""
    found: dict[tuple[str | None, bool], int] = {}
    for r in runs:
        key = (r.get("commit"), bool(r.get("dirty")))
        found[key] = found.get(key, 0) + 1
    return [{"commit": c, "dirty": d, "runs": n} for (c, d), n in found.items()]


def code_line(spans: list[dict[str, Any]]) -> str:
    """One line on the code the runs ran; says so plainly when it was not one commit."""

    def name(s: dict[str, Any]) -> str:
        c = (s["commit"] or "unknown commit")[:12]
        return f"{c}{' (uncommitted changes)' if s['dirty'] else ''}"

    if not spans:
        return "Code: no run yet."
    if len(spans) == 1:
        return f"Code: every run on {name(spans[0])}."
    parts = ", ".join(f"{name(s)}: {s['runs']} run(s)" for s in spans)
    return f"**Code: the runs span {len(spans)} different versions** — {parts}."


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Chaos report",
        "",
        f"Generated {summary['generated_at']}. "
        + ", ".join(f"{k}: {v}" for k, v in summary.get("meta", {}).items() if k != "options"),
        "",
        "Options: "
        + ", ".join(
            f"{k} {v}"
            for k, v in summary.get("meta", {}).get("options", {}).items()
            if v is not None
        ),
        "",
        code_line(summary.get("commits", [])),
        "",
        total_line(summary.get("total")),
        "",
        "| scenario | guarantee | runs | failed | failure rate ≤ | msgs/run | lost "
        "| duplicates (outcomes/decisions) "
        "| order viol. | faults | resume_after_kill_s p50 / max | drain s p50 / max | CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        res, dr = r["resume_after_kill_s"], r["drain_s"]
        drain = f"{_fmt(dr['p50'])} / {_fmt(dr['max'])}"
        if dr["timed_out"]:
            drain += f" ({dr['timed_out']} not drained)"
        lost = str(r["lost"])
        if r["not_drained_runs"] and r["lost"]:
            lost += " (unprocessed at the drain deadline)"
        lines.append(
            f"| {r['scenario']} | {r['guarantee']} | {r['runs']} | {r['failed_runs']} "
            f"| {_pct(r.get('failure_rate_bound'))} | {r['messages_per_run']} | {lost} "
            f"| {r['duplicates']} / "
            f"{r['decision_duplicates']} | {r['order_violations']} | {r['faults']} "
            f"| {_fmt(res['p50'])} / {_fmt(res['max'])} (n={res['n']}) | {drain} "
            f"| {_fmt(r['cpu_s_per_run'])} |"
        )
    for r in summary["rows"]:
        if r["notes"]:
            lines += ["", f"**{r['scenario']} / {r['guarantee']}**", ""]
            lines += [f"- {n}" for n in r["notes"]]
            lines.append(
                f"- per run: lost {r['lost_per_run']}, duplicates {r['duplicates_per_run']}, "
                f"at-least-once bound {[_fmt(b) for b in r['dup_bound_per_run']]}"
            )
    if summary.get("superseded"):
        lines += [
            "",
            "## Superseded runs (made again with `--redo`; not counted above)",
            "",
            "| scenario | guarantee | run | code | passed | first failure | superseded at |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in summary["superseded"]:
            failures = r.get("failures") or []
            first = " ".join(str(failures[0]).split())[:160] if failures else "-"
            code = str(r.get("commit") or "unknown")[:12] + (" (dirty)" if r.get("dirty") else "")
            lines.append(
                f"| {r.get('scenario')} | {r.get('guarantee')} | {r.get('run', '-')} | {code} "
                f"| {'yes' if r.get('ok') else '**no**'} | {first.replace('|', '/')} "
                f"| {r.get('superseded_at', '-')} |"
            )
    if summary.get("skipped"):
        lines += ["", "## Not run (hooks waiting for infrastructure)", ""]
        lines += [f"- `{k}`: {v}" for k, v in summary["skipped"].items()]
    return "\n".join(lines) + "\n"


def total_line(total: dict[str, Any] | None) -> str:
    """The report's runs in one sentence, with the failure rate they bound."""
    if not total or not total["runs"]:
        return "No run recorded yet."
    return (
        f"All scenarios: {total['runs']} run(s), {total['failed_runs']} failed; pooled, a failure "
        f"rate of at most {_pct(total['failure_rate_bound'])} per run "
        f'({total["confidence"]:.0%} confidence, one-sided, exact binomial). "failure rate '
        '≤" below is the same bound per scenario and guarantee.'
    )


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def rewrite(out: Path) -> dict[str, Any]:
    """report.json's summary and report.md of the report in `out` made again from the
    runs it records, by this code (after the report's format changed); runs nothing."""
    doc = json.loads((out / "report.json").read_text())
    return write(
        out,
        list(doc.get("runs", [])),
        dict(doc.get("skipped", {})),
        dict(doc.get("meta", {})),
        superseded=list(doc.get("superseded", [])),
    )


if __name__ == "__main__":  # python -m tests.chaos.report DIR ...
    import sys

    for arg in sys.argv[1:]:
        total = rewrite(Path(arg))["total"]
        print(f"{arg}: {total_line(total)}")

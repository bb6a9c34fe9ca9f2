"""How long a chaos run takes: per scenario, the runs, the load (messages / rate) and the
estimated wall time, load plus the per-run overhead.

The overhead of a run is everything but the load: the broker or cluster a scenario
starts for itself, the workers' start, the drain, the checks (`rebuild`, `audit verify`)
and the tear-down. It is modelled as a fixed part per scenario plus a part per input (the
checks read every output): `FIXED_OVERHEAD_S` holds the fixed parts measured on the
2-core development machine; `measured_overheads` replaces them with the median of the
passing runs of existing reports (`var/chaos/*/report.json`) that recorded their
scenario, rate and wall time."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: seconds of a run that grow with its inputs (reading every output, rebuild, audit)
PER_MESSAGE_S = 0.0003
#: fixed overhead of a run per scenario (s), from measured runs: wall time (with the
#: start of a broker or cluster of the run's own) minus the load's duration minus
#: PER_MESSAGE_S per input; for the network scenarios the fault window longer than a
#: short run's load is part of it, so these are upper bounds for a 100k run
FIXED_OVERHEAD_S: dict[str, float] = {
    "worker_kill": 23.0,
    "worker_stop": 27.0,
    "broker_restart": 40.0,  # no measured run yet: its own broker plus a restart, guessed
    "poison": 18.0,
    "output_refused": 28.0,
    "agent_raises": 21.0,
    "llm_saturated": 25.0,
    "network_latency": 22.0,
    "network_bandwidth": 29.0,
    "network_reset": 21.0,
    "network_blackhole": 41.0,
    "leader_kill": 34.0,
    "coordinator_kill": 64.0,
}
DEFAULT_FIXED_OVERHEAD_S = 40.0


@dataclass(frozen=True)
class PlanRow:
    scenario: str
    #: runs still to make (over every guarantee)
    runs: int
    rate: float
    #: the load's duration of one run (messages / rate)
    load_s: float
    #: the rest of one run (start, drain, checks)
    overhead_s: float

    @property
    def run_s(self) -> float:
        return self.load_s + self.overhead_s

    @property
    def total_s(self) -> float:
        return self.runs * self.run_s


def overhead_s(scenario: str, messages: int, fixed: Mapping[str, float] | None = None) -> float:
    table = FIXED_OVERHEAD_S if fixed is None else {**FIXED_OVERHEAD_S, **fixed}
    return table.get(scenario, DEFAULT_FIXED_OVERHEAD_S) + PER_MESSAGE_S * messages


def run_overhead_s(run: Mapping[str, Any]) -> float | None:
    """A recorded run's fixed overhead (None when it lacks what it takes)."""
    wall, messages, rate = run.get("wall_s"), run.get("messages"), run.get("rate")
    if wall is None or not messages or not rate:
        return None
    wall = float(wall) + float(run.get("broker_start_s") or 0.0)
    # a fault window longer than a short run's load makes its load phase the longer one
    phase = max(messages / rate, float(run.get("load_phase_s") or 0.0))
    return max(0.0, wall - phase - PER_MESSAGE_S * messages)


def measured_overheads(reports: Iterable[Path]) -> dict[str, float]:
    """Per scenario, the median fixed overhead of the passing runs in `reports`."""
    found: dict[str, list[float]] = defaultdict(list)
    for path in reports:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for run in doc.get("runs", []):
            over = run_overhead_s(run) if run.get("ok") else None
            if over is not None:
                found[run["scenario"]].append(over)
    return {name: round(statistics.median(xs), 1) for name, xs in found.items()}


def plan(
    scenarios: Iterable[tuple[str, float, int]],
    guarantees: int,
    messages: int,
    fixed: Mapping[str, float] | None = None,
    done: Mapping[str, int] | None = None,
) -> list[PlanRow]:
    """Rows for `scenarios` ((name, rate, runs per guarantee)) under `guarantees`
    guarantees, less the runs `done` already (per scenario)."""
    rows = []
    for name, rate, runs in scenarios:
        left = max(0, runs * guarantees - (done or {}).get(name, 0))
        load = messages / rate if rate > 0 else 0.0
        rows.append(PlanRow(name, left, rate, load, overhead_s(name, messages, fixed)))
    return rows


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(rows: list[PlanRow], messages: int, guarantees: int) -> str:
    lines = [
        f"{messages} inputs per run, {guarantees} guarantee(s); estimated wall time = runs x "
        "(load + overhead)",
        f"{'scenario':<18} {'runs':>4} {'rate/s':>7} {'load s':>7} {'overhead s':>10} "
        f"{'run s':>6} {'total':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.scenario:<18} {r.runs:>4} {r.rate:>7.0f} {r.load_s:>7.0f} {r.overhead_s:>10.0f} "
            f"{r.run_s:>6.0f} {_hms(r.total_s):>8}"
        )
    total = sum(r.total_s for r in rows)
    lines.append(f"{'total':<18} {sum(r.runs for r in rows):>4} {'':>42} {_hms(total):>8}")
    return "\n".join(lines)

"""Component health, decided without I/O: aggregation and transition tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agentstream.schemas.health import ComponentHealthChanged

Status = Literal["ok", "degraded", "down"]
#: how bad each status is; also the value agentstream_ready_component exports for it
RANK: dict[Status, int] = {"ok": 0, "degraded": 1, "down": 2}


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    status: Status
    detail: str = ""


def overall(components: list[Component]) -> Status:
    """The worst status; "ready" means nothing is down (degraded is visible, not fatal)."""
    worst: Status = "ok"
    for c in components:
        if RANK[c.status] > RANK[worst]:
            worst = c.status
    return worst


def lag_status(lags: dict[str, int], max_lag: int) -> Component:
    total = sum(lags.values())
    worst = max(lags.values(), default=0)
    if worst > max_lag:
        top = max(lags, key=lambda k: lags[k])
        return Component("consumer_lag", "down", f"{top} is {worst} records behind (max {max_lag})")
    return Component("consumer_lag", "ok", f"{total} record(s) behind in total")


class HealthTracker:
    """Remembers each component's last status and says when it changed. A component seen
    for the first time only counts as a change if it is not ok (startup is not news)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.last: dict[str, Status] = {}

    def observe(self, c: Component) -> ComponentHealthChanged | None:
        prev = self.last.get(c.name)
        self.last[c.name] = c.status
        if prev == c.status or (prev is None and c.status == "ok"):
            return None
        return ComponentHealthChanged(
            component=c.name,
            worker_id=self.worker_id,
            previous=prev,
            current=c.status,
            detail=c.detail[:4096],
        )

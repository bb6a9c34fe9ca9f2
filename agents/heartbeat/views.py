"""Web views of agent status: ``GET /agents/status`` and ``GET /agents/status/{agent_id}``.

Both answer for the whole cluster (see `streams.web_cluster`): one agent is answered by
the worker owning its partition (forwarded there), the list merges every worker's share
and says which workers answered (``workers``, ``partial``, ``missing``). ``?local=1``
answers from this worker's own partitions only.
"""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View

from agentstream.agents.heartbeat.agent import gate, monitor, writer
from agentstream.streams.app import app
from agentstream.streams.web_cluster import (
    MalformedShare,
    check_counts,
    check_rows,
    gather,
    is_local,
    key_route,
    local_answer,
    owned,
)


def get_agent_status(agent_id: str) -> dict[str, Any] | None:
    """The status of one agent as this worker sees it, or None if it never beat here."""
    return monitor.describe(agent_id)


def list_agent_status(state: str | None = None) -> list[dict[str, Any]]:
    """Agents of the partitions this worker owns (standby copies are another's answer)."""
    mine = owned(writer.table)
    out = []
    for agent_id in sorted(monitor.state.keys()):
        if not mine(agent_id):
            continue
        d = monitor.describe(agent_id)
        if d is not None and (state is None or d["status"] == state):
            out.append(d)
    return out


def _counts(agents: list[dict[str, Any]]) -> dict[str, int]:
    c = {"up": 0, "down": 0}
    for d in agents:
        if d["status"] in c:
            c[d["status"]] += 1
    return c


def _status_share(b: dict[str, Any]) -> None:
    """A worker's /agents/status share is what the merge reads (`Gathered.shares`)."""
    check_rows(b["agents"], "agents", agent_id=str)
    check_counts(b["counts"])
    if not isinstance(b["deciding"], bool):
        raise MalformedShare("deciding is not a boolean")


@app.page("/agents/status")
class AgentsStatusView(View):
    async def get(self, request: Request) -> Response:
        state = request.query.get("state") or None
        every = list_agent_status()
        body: dict[str, Any] = {
            "deciding": gate.open,
            "counts": _counts(every),
            "agents": [d for d in every if state is None or d["status"] == state],
        }
        if is_local(request):
            return local_answer(self, body)
        got = await gather(request, body, writer.table)
        got.shares(_status_share)
        agents = sorted((d for b in got.bodies for d in b["agents"]), key=lambda d: d["agent_id"])
        counts = {"up": 0, "down": 0}
        for b in got.bodies:
            for k in counts:
                counts[k] += int(b["counts"].get(k, 0))
        return self.json(
            {
                # one worker still catching up is enough for "not deciding everywhere"
                "deciding": all(b["deciding"] for b in got.bodies),
                "counts": counts,
                "agents": agents,
                **got.meta(),
            }
        )


@app.page("/agents/status/{agent_id}")
class AgentStatusView(View):
    @key_route(writer.table, match_info="agent_id")
    async def get(self, request: Request, agent_id: str) -> Response:
        found = get_agent_status(agent_id)
        if found is None:
            return self.json({"error": "unknown agent", "agent_id": agent_id}, status=404)
        return self.json(found)

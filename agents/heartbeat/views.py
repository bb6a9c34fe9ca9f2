"""Web views of agent status: ``GET /agents/status`` and ``GET /agents/status/{agent_id}``.

A worker answers for the agents in its table (its assigned partitions, plus standby
copies); with several workers ask each, or read `agent.status`.
"""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View

from agents.heartbeat.agent import gate, monitor
from streams.app import app


def get_agent_status(agent_id: str) -> dict[str, Any] | None:
    """The status of one agent as this worker sees it, or None if it never beat here."""
    return monitor.describe(agent_id)


def list_agent_status(state: str | None = None) -> list[dict[str, Any]]:
    out = []
    for agent_id in sorted(monitor.state.keys()):
        d = monitor.describe(agent_id)
        if d is not None and (state is None or d["status"] == state):
            out.append(d)
    return out


@app.page("/agents/status")
class AgentsStatusView(View):
    async def get(self, request: Request) -> Response:
        state = request.query.get("state") or None
        agents = list_agent_status(state)
        counts = monitor.counts()
        return self.json({"deciding": gate.open, "counts": counts, "agents": agents})


@app.page("/agents/status/{agent_id}")
class AgentStatusView(View):
    async def get(self, request: Request, agent_id: str) -> Response:
        found = get_agent_status(agent_id)
        if found is None:
            return self.json({"error": "unknown agent", "agent_id": agent_id}, status=404)
        return self.json(found)

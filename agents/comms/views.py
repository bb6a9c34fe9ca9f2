"""``GET /comms?agent=&kind=&since=&until=&limit=`` → records and per-agent counts.

Cluster-wide (see `streams.web_cluster`): with ``agent`` the worker owning that agent's
partition answers; without, every worker's records are merged (oldest first, the newest
`limit`) and the answer says which workers answered (``workers``, ``partial``,
``missing``). ``?local=1`` answers from this worker's own partitions only.
"""

from __future__ import annotations

import time
from typing import Any

from faust.web import Request, Response, View

from agentstream.agents.comms.agent import writer
from agentstream.agents.comms.tracker import COMM_KINDS, counts, query
from agentstream.streams.app import app, settings
from agentstream.streams.replay import TimeParseError, parse_time
from agentstream.streams.tables.monitoring import SEP
from agentstream.streams.web_cluster import (
    add_counts,
    check_rows,
    gather,
    is_local,
    local_answer,
    owned,
    route,
)

#: the most records one answer holds (and the default)
MAX_LIMIT = 1000


def _agent_of(key: str) -> str:
    # "r␟agent␟kind␟ms␟id" and "c␟agent": both live in the partition of the agent id
    parts = key.split(SEP, 2)
    return parts[1] if len(parts) > 1 else key


def owned_items() -> list[tuple[str, Any]]:
    mine = owned(writer.table)
    return [(k, v) for k, v in list(writer.items()) if mine(_agent_of(str(k)))]


@app.page("/comms")
class CommsView(View):
    async def get(self, request: Request) -> Response:
        q = request.query
        kind = q.get("kind") or None
        if kind is not None and kind not in COMM_KINDS:
            return self.json({"error": f"kind must be one of {', '.join(COMM_KINDS)}"}, status=400)
        try:
            since = parse_time(q["since"]).timestamp() if q.get("since") else None
            until = parse_time(q["until"]).timestamp() if q.get("until") else None
            limit = int(q.get("limit") or MAX_LIMIT)
        except (TimeParseError, ValueError) as exc:
            return self.json({"error": str(exc)}, status=400)
        if not 1 <= limit <= MAX_LIMIT:
            # 0 or a negative limit returned every retained record of every worker
            return self.json({"error": f"limit must be from 1 to {MAX_LIMIT}"}, status=400)
        agent = q.get("agent") or None
        if agent is not None:
            routed = await route(self, request, writer.table, agent)
            if routed is not None:
                return routed
        items = owned_items()
        body: dict[str, Any] = {
            "records": query(
                items,
                agent_id=agent,
                kind=kind,
                since=since,
                until=until,
                now=time.time(),
                retention_s=settings.comms_retention_s,
                limit=limit,
            ),
            "counts": counts(items, agent_id=agent),
            "retention_s": settings.comms_retention_s,
        }
        if agent is not None:  # routed to this worker, its owner (`route`)
            return self.json(body)
        if is_local(request):
            return local_answer(self, body)
        got = await gather(request, body, writer.table)
        merged_counts: dict[str, Any] = {}

        def take(b: dict[str, Any]) -> None:
            check_rows(
                b["records"], "records", recorded_at=(int, float), agent_id=str, record_id=str
            )
            add_counts(merged_counts, b["counts"])  # checks before it adds

        records = sorted(
            (r for b in got.shares(take) for r in b["records"]),
            key=lambda r: (r["recorded_at"], r["agent_id"], r["record_id"]),
        )
        return self.json(
            {
                "records": records[-limit:] if limit and len(records) > limit else records,
                "counts": merged_counts,
                "retention_s": settings.comms_retention_s,
                **got.meta(),
            }
        )

"""``GET /comms?agent=&kind=&since=&until=&limit=`` → records and per-agent counts."""

from __future__ import annotations

import time

from faust.web import Request, Response, View

from agents.comms.agent import writer
from agents.comms.tracker import COMM_KINDS, counts, query
from streams.app import app, settings
from streams.replay import TimeParseError, parse_time


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
            limit = int(q.get("limit") or 1000)
        except (TimeParseError, ValueError) as exc:
            return self.json({"error": str(exc)}, status=400)
        agent = q.get("agent") or None
        items = list(writer.items())
        records = query(
            items,
            agent_id=agent,
            kind=kind,
            since=since,
            until=until,
            now=time.time(),
            retention_s=settings.comms_retention_s,
            limit=limit,
        )
        return self.json(
            {
                "records": records,
                "counts": counts(items, agent_id=agent),
                "retention_s": settings.comms_retention_s,
            }
        )

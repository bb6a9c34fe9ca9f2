"""Web views of the LLM stage (JSON):

* ``GET /llm/breakers`` — per provider: this worker's live breaker and the last
  transition recorded in the `llm_breakers` table.
* ``GET /llm/usage`` — token totals per agent, provider and model (`llm_usage` table,
  summed over this worker's partitions).
* ``GET /llm/requests/{request_id}`` — in flight / answered (status) / cancelled.
"""

from __future__ import annotations

from faust.web import Request, Response, View

from agents.llm.runtime import runtime
from streams.app import app
from streams.tables import llm as tables


@app.page("/llm/breakers")
class BreakersView(View):
    async def get(self, request: Request) -> Response:
        rt = runtime()
        recorded = dict(tables.table(tables.BREAKERS.name).items())
        names = sorted(set(rt.registry.names()) | set(rt.processor.breakers) | set(recorded))
        out = {}
        for name in names:
            live = rt.processor.breakers.get(name)
            out[name] = {
                "live": live.snapshot() if live else {"state": "closed", "failures": 0},
                "recorded": recorded.get(name),
            }
        return self.json({"breakers": out})


@app.page("/llm/usage")
class UsageView(View):
    async def get(self, request: Request) -> Response:
        items = list(tables.table(tables.USAGE.name).items())
        return self.json(tables.summarise_usage(items))


@app.page("/llm/requests/{request_id}")
class RequestView(View):
    async def get(self, request: Request, request_id: str) -> Response:
        rt = runtime()
        return self.json(
            {
                "request_id": request_id,
                "in_flight": request_id in rt.inflight,
                "final": tables.table(tables.RESPONSES_DONE.name).get(request_id),
                "cancelled": tables.table(tables.CANCELLED.name).get(request_id),
                "deduplicated_total": rt.deduplicated,
            }
        )

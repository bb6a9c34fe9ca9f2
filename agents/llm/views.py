"""Web views of the LLM stage (JSON), answering for the whole cluster (see
`streams.web_cluster`; ``?local=1`` answers from this worker's own partitions only):

* ``GET /llm/breakers`` — per provider: the last transition recorded in the
  `llm_breakers` table (by the worker owning the provider's partition) and the live
  breaker — every worker running this stage keeps its own, so ``live`` is the most open
  one of the workers that answered and ``live_by_worker`` has each.
* ``GET /llm/usage`` — token totals per agent, provider and model (`llm_usage` table,
  summed over every worker's partitions), and ``budgets``: each budget of the providers
  file (per agent for ``*`` ones) with its current window, spend and what remains
  (`llm_budget_spend`, summed the same way).
* ``GET /llm/requests/{request_id}`` — in flight / answered (status) / cancelled, from the
  worker owning the request's partition.

Aggregates say which workers answered: ``workers``, ``partial``, ``missing``.
"""

from __future__ import annotations

import time
from typing import Any

from faust.web import Request, Response, View

from agentstream.agents.llm.runtime import runtime
from agentstream.streams import console, llm_budgets
from agentstream.streams.app import app
from agentstream.streams.tables import llm as tables
from agentstream.streams.web_cluster import (
    MalformedShare,
    add_counts,
    gather,
    is_local,
    key_route,
    local_answer,
    owned,
    owned_partition,
)

console.register_probe("llm", lambda: {"in_flight": len(runtime().inflight)})

#: how open a breaker is; a merged view shows the most open one
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}
_CLOSED = {"state": "closed", "failures": 0}


def _severity(live: dict[str, Any]) -> int:
    return _SEVERITY.get(str(live.get("state")), 0)


def _usage_partition(key: Any) -> int | None:
    head = str(key).split("|", 1)[0]
    return int(head) if head.isdigit() else None


@app.page("/llm/breakers")
class BreakersView(View):
    async def get(self, request: Request) -> Response:
        rt = runtime()
        table = tables.table(tables.BREAKERS.name)
        mine = owned(table)
        recorded = {k: v for k, v in list(table.items()) if mine(str(k))}
        names = sorted(set(rt.registry.names()) | set(rt.processor.breakers) | set(recorded))
        out = {}
        for name in names:
            live = rt.processor.breakers.get(name)
            out[name] = {
                "live": live.snapshot() if live else dict(_CLOSED),
                "recorded": recorded.get(name),
            }
        if is_local(request):
            return local_answer(self, {"breakers": out})
        # every worker calling providers has live breakers of its own: ask each one that
        # owns requests (the partitions of the LLM tables)
        got = await gather(request, {"breakers": out}, table)
        merged: dict[str, dict[str, Any]] = {}

        def breakers_share(b: dict[str, Any]) -> None:
            if not isinstance(b["breakers"], dict) or not all(
                isinstance(x, dict) and isinstance(x.get("live") or {}, dict)
                for x in b["breakers"].values()
            ):
                raise MalformedShare("breakers is not an object of objects")

        got.shares(breakers_share)
        for url, body in got.answers:
            for name, b in body["breakers"].items():
                m = merged.setdefault(name, {"live": None, "recorded": None, "live_by_worker": {}})
                theirs = b.get("live") or dict(_CLOSED)
                m["live_by_worker"][url] = theirs
                if m["live"] is None or _severity(theirs) > _severity(m["live"]):
                    m["live"] = theirs
                if b.get("recorded") is not None:
                    m["recorded"] = b["recorded"]
        return self.json({"breakers": dict(sorted(merged.items())), **got.meta()})


@app.page("/llm/usage")
class UsageView(View):
    async def get(self, request: Request) -> Response:
        table = tables.table(tables.USAGE.name)
        mine = owned_partition(table)
        items = [
            (k, v)
            for k, v in list(table.items())
            if (p := _usage_partition(k)) is not None and mine(p)
        ]
        body: dict[str, Any] = dict(tables.summarise_usage(items))
        config = runtime().registry.budgets
        now = time.time()
        spend_table = tables.table(tables.SPEND.name)
        spend_mine = owned_partition(spend_table)
        # this worker's own partitions only (no standby copies), without `until`: the
        # workers' answers are summed
        body["budget_spend"] = {
            k: {f: n for f, n in v.items() if f != "until"}
            for k, v in list(spend_table.items())
            if (sk := llm_budgets.parse_spend_key(k)) is not None and spend_mine(sk[0])
        }
        if is_local(request):
            body["budgets"] = llm_budgets.budget_report(config, body["budget_spend"].items(), now)
            return local_answer(self, body)
        got = await gather(request, body, table)
        merged: dict[str, Any] = {"agent": {}, "provider": {}, "model": {}, "budget_spend": {}}
        got.shares(lambda b: add_counts(merged, {k: v for k, v in b.items() if k != "budgets"}))
        spend = merged.pop("budget_spend")
        merged["budgets"] = llm_budgets.budget_report(config, spend.items(), now)
        return self.json({**merged, **got.meta()})


@app.page("/llm/requests/{request_id}")
class RequestView(View):
    @key_route(tables.table(tables.RESPONSES_DONE.name), match_info="request_id")
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

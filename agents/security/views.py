"""Web views: the policies in force on this worker, and decision counts.

``GET /security/policies/``  config, policies (with versions) and records that are invalid
``GET /security/decisions/`` {verdict: {rule: count}} ("*" = all decisions of a verdict),
                             over the agent.messages partitions this worker owns
"""

from __future__ import annotations

from typing import Any

from agents.security.agent import COUNTS, STORE
from streams.app import app
from streams.tables.security import summarise_counts


@app.page("/security/policies/")
async def policies_view(web: Any, request: Any) -> Any:
    policy_set = STORE.policy_set
    return web.json(
        {
            "ready": STORE.ready.is_set(),
            "enabled": policy_set.enabled,
            "default_action": policy_set.default_action.value,
            "updated_at": STORE.updated_at,
            "policies": [
                {**p.policy.model_dump(mode="json"), "broken": p.broken}
                for p in policy_set.policies
            ],
            "invalid": policy_set.invalid,
        }
    )


@app.page("/security/decisions/")
async def decisions_view(web: Any, request: Any) -> Any:
    items = list(COUNTS.data.items())
    partitions = sorted({str(k).split("|", 1)[0] for k, _ in items})
    return web.json({"counts": summarise_counts(items), "partitions": partitions})

"""Web views: the policies in force on this worker, and decision counts.

``GET /security/policies/``  config, policies (with versions and signers), records that
                             are invalid, rule-topic records ignored by reason (unsigned,
                             rollback ...), the number of identities and any problem with
                             the trusted admin keys (every worker holds all of it). The
                             patterns (and a broken pattern's error, which quotes it) only
                             for a token of scope admin: knowing exactly what is blocked is
                             how to get around them
``GET /security/decisions/`` {verdict: {rule: count}} ("*" = all decisions of a verdict),
                             summed over every worker's agent.messages partitions (see
                             `streams.web_cluster`: ``workers``, ``partial``, ``missing``;
                             ``?local=1``: this worker's own partitions only)
"""

from __future__ import annotations

from typing import Any

from agentstream.agents.security.agent import COUNTS, STORE
from agentstream.streams import console
from agentstream.streams.app import app
from agentstream.streams.tables.security import summarise_counts
from agentstream.streams.web_auth import is_admin
from agentstream.streams.web_cluster import (
    MalformedShare,
    add_counts,
    gather,
    is_local,
    local_answer,
    owned_partition,
)

#: what a read token does not see of a policy
PATTERNS = {"allowed_patterns", "blocked_patterns"}
HIDDEN_BROKEN = "a pattern does not compile (the error quotes it: scope admin sees it)"


@app.page("/security/policies/")
async def policies_view(web: Any, request: Any) -> Any:
    policy_set = STORE.policy_set
    admin = is_admin(request)
    return web.json(
        {
            "ready": STORE.ready.is_set(),
            "enabled": policy_set.enabled,
            "default_action": policy_set.default_action.value,
            "updated_at": STORE.updated_at,
            "patterns_shown": admin,
            "policies": [
                {
                    **p.policy.model_dump(mode="json", exclude=None if admin else PATTERNS),
                    "broken": p.broken if admin or p.broken is None else HIDDEN_BROKEN,
                    "signed_by": STORE.signers.get(p.id, ""),
                }
                for p in policy_set.policies
            ],
            "invalid": policy_set.invalid,
            "identities": len(STORE.identities),
            "ignored": dict(STORE.ignored),
            "problem": STORE.problem,
            "replay_window_s": policy_set.replay_window_s,
            "trust_claimed_roles": policy_set.trust_claimed_roles,
        }
    )


@app.page("/security/decisions/")
async def decisions_view(web: Any, request: Any) -> Any:
    mine = owned_partition(COUNTS)
    items = [(k, v) for k, v in list(COUNTS.data.items()) if mine(_partition(k))]
    partitions = sorted({str(k).split("|", 1)[0] for k, _ in items}, key=_partition)
    body = {"counts": summarise_counts(items), "partitions": partitions}
    if is_local(request):
        return local_answer(web, body)
    got = await gather(request, body, COUNTS)
    counts: dict[str, Any] = {}

    def take(b: dict[str, Any]) -> None:
        if not isinstance(b["partitions"], list):
            raise MalformedShare("partitions is not a list")
        add_counts(counts, b["counts"])  # checks before it adds

    every = sorted({str(p) for b in got.shares(take) for p in b["partitions"]}, key=_partition)
    return web.json({"counts": counts, "partitions": every, **got.meta()})


def policy_patterns() -> dict[str, dict[str, Any]]:
    """The patterns of every policy in force (every worker holds them all), for the
    console's admin snapshots: {policy_id: {allowed_patterns, blocked_patterns, broken}}."""
    return {
        p.id: {
            **p.policy.model_dump(mode="json", include=PATTERNS),
            "broken": p.broken,
        }
        for p in STORE.policy_set.policies
    }


console.register_patterns(policy_patterns)


def _partition(key: Any) -> int:
    head = str(key).split("|", 1)[0]
    try:
        return int(head)
    except ValueError:
        return -1

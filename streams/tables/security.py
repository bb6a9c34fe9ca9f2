"""Security tables: the policies in force, and decision counts.

``security_policies`` — folded from the compacted, single-partition `security.policies`.
Every worker needs *all* policies (not the partitions it happens to be assigned), so each
worker folds the whole topic into its own in-memory state with a consumer outside the
app's consumer group (`agents.security.store`); on start it reads the topic from the
beginning before deciding anything, so a restart loses nothing. State layout::

    {policy_id: SecurityPolicy JSON, "__config__": SecurityConfig JSON}

``security_decision_counts`` — a Faust table folded from `security.decisions` (kept live
by `enforce_policy`), keyed ``"<partition>|<verdict>|<rule>"`` with rule ``*`` for the total
of a verdict. The partition is part of the key because a Faust table's changelog is
partitioned like its source: the same key written from two partitions would overwrite
itself on recovery. Each counter is written (`streams.tables.write`) to the changelog
partition its key names, the partition of the messages it counts.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from functools import lru_cache
from typing import Any

from schemas import Event
from schemas.security import PolicyDecision, SecurityConfig, SecurityPolicy, SecurityPolicyRemoved
from streams.tables import TableSpec, register
from streams.topics import SECURITY_DECISIONS, SECURITY_POLICIES

CONFIG_KEY = "__config__"
ALL_RULES = "*"


def apply_policy_event(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    payload = event.payload
    if isinstance(payload, SecurityPolicy):
        state[payload.policy_id] = payload.model_dump(mode="json")
    elif isinstance(payload, SecurityPolicyRemoved):
        state.pop(payload.policy_id, None)
    elif isinstance(payload, SecurityConfig):
        state[CONFIG_KEY] = payload.model_dump(mode="json")


def counter_keys(decision: PolicyDecision) -> list[str]:
    """The counters one decision increments (its verdict total and each violated rule)."""
    part = decision.source_partition if decision.source_partition is not None else -1
    return keys_for(part, decision.verdict.value, decision.rules)


def keys_for(partition: int, verdict: str, rules: list[str]) -> list[str]:
    return [f"{partition}|{verdict}|{ALL_RULES}"] + [f"{partition}|{verdict}|{r}" for r in rules]


def apply_decision(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    payload = event.payload
    if isinstance(payload, PolicyDecision):
        for key in counter_keys(payload):
            state[key] = int(state.get(key, 0)) + 1


def summarise_counts(items: Any) -> dict[str, dict[str, int]]:
    """{verdict: {rule or "*": count}} summed over partitions, from table items."""
    out: dict[str, dict[str, int]] = {}
    for key, value in items:
        try:
            _part, verdict, rule = str(key).split("|", 2)
        except ValueError:
            continue
        bucket = out.setdefault(verdict, {})
        bucket[rule] = bucket.get(rule, 0) + int(value)
    return out


POLICIES = register(
    TableSpec(
        name="security_policies",
        sources=(SECURITY_POLICIES,),
        apply=apply_policy_event,
        description="Policies and the security config in force (every worker holds all)",
        types=frozenset({SecurityPolicy.TYPE, SecurityPolicyRemoved.TYPE, SecurityConfig.TYPE}),
    )
)

DECISION_COUNTS = register(
    TableSpec(
        name="security_decision_counts",
        sources=(SECURITY_DECISIONS,),
        apply=apply_decision,
        description="Decisions per source partition, verdict and violated rule",
        types=frozenset({PolicyDecision.TYPE}),
    )
)


@lru_cache(maxsize=1)
def decision_counts_table() -> Any:
    """The live Faust table (created on first use so that importing the folds stays free
    of the app)."""
    from streams.app import app

    return app.Table(
        DECISION_COUNTS.name,
        default=int,
        key_type=str,
        value_type=int,
        help=DECISION_COUNTS.description,
    )

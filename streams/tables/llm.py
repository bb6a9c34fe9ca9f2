"""LLM tables: final responses (dedup), cancellations, breaker states, token usage.

All four are folds over topics (see `streams.tables`), so `agentstream rebuild` can
recompute them from history:

``llm_responses_done`` — {request id: {"status", "event_id"}} from `llm.responses`: a
request id in here already has its final response and is never sent to a provider again.
``llm_cancelled`` — {request id: {"reason"}} from `llm.cancellations`: a request that
arrives after its cancellation is answered "cancelled" without calling the provider.
``llm_breakers`` — {provider: last transition} from `llm.breaker`.
``llm_usage`` — {"<partition>|agent|<id>", "<partition>|provider|<p>",
"<partition>|model|<p>|<m>": totals} from `llm.responses`.

Keys live in the changelog partition of the request they come from (the Kafka default
partitioner on the request id, exactly like the producer of `llm.requests`), and the usage
counters carry that partition in their key: so after a rebalance the worker that owns a
request's partition recovers exactly the dedup, cancellation and counter entries of that
partition, and two workers never read-modify-write the same counter.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from functools import cache
from typing import Any

from aiokafka.partitioner import murmur2

from schemas import Event
from schemas.llm import BreakerStateChanged, LLMCancelRequested, LLMResponse
from streams.tables import TableSpec, delete, register, write
from streams.topics import LLM_BREAKER, LLM_CANCELLATIONS, LLM_RESPONSES

USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def partitions() -> int:
    from streams.settings import get_settings

    return get_settings().topic_partitions


def partition_of(key: str, n: int | None = None) -> int:
    """The partition Kafka's default partitioner picks for `key` (murmur2, like Java's)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % (n or partitions())


def apply_response(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, LLMResponse):
        state[p.request_id] = {"status": p.status, "event_id": str(event.event_id)}


def apply_cancel(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, LLMCancelRequested):
        state[p.request_id] = {"reason": p.reason}


def apply_breaker(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, BreakerStateChanged):
        state[p.provider] = {
            "state": p.current,
            "previous": p.previous,
            "failures": p.failures,
            "changed_at": p.changed_at.isoformat(),
            "reason": p.reason,
            "source": event.source,
        }


def usage_keys(response: LLMResponse, n: int | None = None) -> list[str]:
    part = partition_of(response.request_id, n)
    provider = response.provider or "-"
    return [
        f"{part}|agent|{response.agent_id or '-'}",
        f"{part}|provider|{provider}",
        f"{part}|model|{provider}|{response.model or '-'}",
    ]


def usage_increments(responses: Iterable[LLMResponse], n: int | None = None) -> dict[str, Any]:
    """{usage key: {field: increment}} of some final responses, summed per key."""
    out: dict[str, dict[str, int]] = {}
    for p in responses:
        usage = p.usage
        for key in usage_keys(p, n):
            inc = out.setdefault(key, {})
            inc["requests"] = inc.get("requests", 0) + 1
            inc[p.status] = inc.get(p.status, 0) + 1
            if usage is not None:
                for f in USAGE_FIELDS:
                    inc[f] = inc.get(f, 0) + int(getattr(usage, f))
                if usage.estimated:
                    inc["estimated_requests"] = inc.get("estimated_requests", 0) + 1
    return out


def add_usage(state: MutableMapping[str, Any], increments: dict[str, Any]) -> None:
    """Add increments to the totals: one write per key, however many responses."""
    for key, inc in increments.items():
        cur = dict(state.get(key) or {})
        for f, v in inc.items():
            cur[f] = int(cur.get(f, 0)) + v
        state[key] = cur


def apply_usage(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, LLMResponse):
        add_usage(state, usage_increments([p]))


def summarise_usage(items: Any) -> dict[str, dict[str, dict[str, int]]]:
    """{"agent"|"provider"|"model": {name: totals}} summed over partitions."""
    out: dict[str, dict[str, dict[str, int]]] = {"agent": {}, "provider": {}, "model": {}}
    for key, value in items:
        try:
            _part, kind, name = str(key).split("|", 2)
        except ValueError:
            continue
        if kind == "model":
            name = name.replace("|", "/", 1)
        bucket = out.setdefault(kind, {}).setdefault(name, {})
        for f, v in (value or {}).items():
            bucket[f] = bucket.get(f, 0) + int(v)
    return out


RESPONSES_DONE = register(
    TableSpec(
        name="llm_responses_done",
        sources=(LLM_RESPONSES,),
        apply=apply_response,
        description="Request ids that have their final response (dedup on redelivery)",
        types=frozenset({LLMResponse.TYPE}),
    )
)
CANCELLED = register(
    TableSpec(
        name="llm_cancelled",
        sources=(LLM_CANCELLATIONS,),
        apply=apply_cancel,
        description="Request ids with a cancellation",
        types=frozenset({LLMCancelRequested.TYPE}),
    )
)
BREAKERS = register(
    TableSpec(
        name="llm_breakers",
        sources=(LLM_BREAKER,),
        apply=apply_breaker,
        description="Last circuit breaker transition per provider",
        types=frozenset({BreakerStateChanged.TYPE}),
    )
)
USAGE = register(
    TableSpec(
        name="llm_usage",
        sources=(LLM_RESPONSES,),
        apply=apply_usage,
        description="Token totals per partition and agent / provider / model",
        types=frozenset({LLMResponse.TYPE}),
    )
)


def _table_class() -> type:
    import faust

    class KeyPartitionedTable(faust.Table):
        """A table writable from tasks outside stream iteration (the LLM calls run as
        tasks): ``table[key] = value`` and ``del table[key]`` go through
        `streams.tables.write` / `delete` to the partition the key names, never the
        current event's."""

        def partition_for_key(self, key: Any) -> int:
            text = str(key)
            if self.name == USAGE.name:
                # usage keys carry the partition they are counted in ("<p>|agent|<id>");
                # the other tables are keyed by request ids, which are user input: a
                # request id "7|x" must hash like any other, never name a partition
                head, sep, _ = text.partition("|")
                if sep and head.isdigit() and int(head) < self.partitions:
                    return int(head)
            return partition_of(text, self.partitions)

        def __setitem__(self, key: Any, value: Any) -> None:
            write(self, key, value, partition=self.partition_for_key(key))

        def __delitem__(self, key: Any) -> None:
            delete(self, key, partition=self.partition_for_key(key))

    return KeyPartitionedTable


@cache
def table(spec_name: str) -> Any:
    """The live Faust table of a spec (created on first use, in the worker)."""
    from streams.app import app

    spec = {s.name: s for s in (RESPONSES_DONE, CANCELLED, BREAKERS, USAGE)}[spec_name]
    cls = _table_class()
    return app.tables.add(
        cls(
            app,
            name=spec.name,
            default=None,
            beacon=app.tables.beacon,
            partitions=partitions(),
            help=spec.description,
            key_type=str,
        )
    )

"""LLM tables: final responses (dedup), cancellations, breaker states, token usage.

All four are folds over topics (see `streams.tables`), so `agentstream rebuild` can
recompute them from history:

``llm_responses_done`` — {request id: {"status", "event_id", "at"}} from `llm.responses`: a
request id in here already has its final response and is not sent to a provider again.
``llm_cancelled`` — {request id: {"reason", "at"}} from `llm.cancellations`: a request that
arrives after its cancellation is answered "cancelled" without calling the provider.
Both keep an entry for `AGENTSTREAM_LLM_DEDUP_RETENTION_S` after its event time `at`
(default one day), then the worker owning its changelog partition deletes it
(`expired_keys`); without that they would grow with every request, in memory and in the
changelog.
``llm_breakers`` — {provider: last transition} from `llm.breaker`.
``llm_usage`` — {"<partition>|agent|<id>", "<partition>|provider|<p>",
"<partition>|model|<p>|<m>": totals} from `llm.responses`.
``llm_budget_spend`` — {"<partition>|<budget id>|<window start>|<agent>": {"requests",
"tokens", "cost_nusd", "unpriced", "until"}} from `llm.responses`: what each budget of the
providers file (`streams.llm_budgets`) has spent per agent and window. The fold reads the
budgets and prices of `AGENTSTREAM_LLM_PROVIDERS_FILE`, as the stage does, so a rebuild
equals the live table when both use the same file. An entry is deleted once its window
has ended (`until`).

Keys live in the changelog partition of the request they come from (the Kafka default
partitioner on the request id, exactly like the producer of `llm.requests`), and the usage
counters carry that partition in their key: so after a rebalance the worker that owns a
request's partition recovers exactly the dedup, cancellation and counter entries of that
partition, and two workers never read-modify-write the same counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from agentstream.schemas import Event
from agentstream.schemas.llm import BreakerStateChanged, LLMCancelRequested, LLMResponse
from agentstream.streams import llm_budgets
from agentstream.streams.tables import (
    Origin,
    TableSpec,
    delete,
    home_partition,
    refuse_misplaced,
    register,
    write,
)
from agentstream.streams.topics import LLM_BREAKER, LLM_CANCELLATIONS, LLM_RESPONSES

USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def partitions() -> int:
    from agentstream.streams.settings import get_settings

    return get_settings().topic_partitions


def partition_of(key: str, n: int | None = None) -> int:
    """The partition Kafka's default partitioner picks for `key` (murmur2, like Java's)."""
    return home_partition(key, n or partitions())


def done_entry(event: Event[Any]) -> dict[str, Any]:
    """The dedup entry of a final response event. `at` (its event time, whole seconds)
    dates the entry for the retention, the same in the live table and in a rebuild."""
    return {
        "status": event.payload.status,
        "event_id": str(event.event_id),
        "at": int(event.occurred_at.timestamp()),
    }


def apply_response(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    if isinstance(event.payload, LLMResponse):
        state[event.payload.request_id] = done_entry(event)


def apply_cancel(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, LLMCancelRequested):
        state[p.request_id] = {"reason": p.reason, "at": int(event.occurred_at.timestamp())}


def apply_cancel_at(state: MutableMapping[str, Any], event: Event[Any], origin: Origin) -> None:
    """`apply_cancel` of a cancellation read at `origin`; `InvalidEvent` (the live agent's
    dead letter, a rebuild's skip) when it is not under its request id in that id's
    partition (`streams.tables.misplaced`, `agents.llm.agent`)."""
    p = event.payload
    if isinstance(p, LLMCancelRequested):
        refuse_misplaced(
            f"{p.TYPE} of request {p.request_id!r}",
            p.request_id,
            origin,
            f"{origin.topic} is keyed by the request id",
            p.TYPE,
        )
    apply_cancel(state, event)


def retention_s() -> float:
    from agentstream.streams.settings import get_settings

    return get_settings().llm_dedup_retention_s


#: how far ahead of the worker's clock an entry's date is believed (clock skew between
#: producers and workers); a cancellation is dated by its sender's `occurred_at`
MAX_FUTURE_S = 300.0


def entry_expired(value: Any, now: float, retention: float | None = None) -> bool:
    """Whether a dedup or cancellation entry is past the retention at epoch time `now`
    (`AGENTSTREAM_LLM_DEDUP_RETENTION_S`; 0 keeps entries forever). An entry without
    `at` (written by a version before the retention) counts as expired: its age is
    unknown, and keeping it would keep it forever. So does one dated more than
    `MAX_FUTURE_S` ahead: a sender dating its cancellation in the year 9999 would
    otherwise cancel that request id for good, and grow the table with each such id."""
    r = retention_s() if retention is None else retention
    if r <= 0 or not isinstance(value, dict):
        return False
    at = value.get("at")
    return not isinstance(at, int | float) or at + r <= now or at > now + MAX_FUTURE_S


def cancelled(request_id: str, now: float | None = None) -> bool:
    """Is `request_id` cancelled in this worker's table (a cancellation that arrived
    before the request)? Not by an entry past the retention or dated too far ahead, which
    the next sweep removes."""
    entry = table(CANCELLED.name).get(request_id)
    return bool(entry) and not entry_expired(entry, time.time() if now is None else now)


def expired_keys(
    items: Iterable[tuple[str, Any]],
    now: float,
    retention: float,
    owned: Callable[[str], bool],
    *,
    limit: int = 10_000,
) -> list[str]:
    """Keys of owned entries past the retention, in table order, at most `limit`.

    Entries are scanned in insertion order, which is event-time order for what this
    worker wrote and per-partition order for what it recovered, and the scan stops at
    the first owned entry that is within the retention: a sweep costs about what it
    removes, not the table's size. So an entry lives at least `retention` and, when a
    recovered partition sits behind younger entries, at most about twice that. An entry
    dated a little in the future (a cancellation's event time comes from its producer's
    clock) is passed over, not stopped at; one dated further ahead is removed. Entries
    of partitions this worker does not own (standby copies) are skipped, never removed:
    their owner writes their tombstones.
    """
    out: list[str] = []
    if retention <= 0:
        return out
    for key, value in items:
        if not owned(key):
            continue
        if not entry_expired(value, now, retention):
            if value["at"] > now:
                continue
            break
        out.append(key)
        if len(out) >= limit:
            break
    return out


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


#: the usage name of every provider the providers file does not declare, and of "no
#: model" (the metrics' label for both, `agents.llm.runtime.CallRuntime.provider_label`)
UNDECLARED_PROVIDER = "-"
#: the usage name of every model of a declared provider that the file does not name (the
#: metrics' label, `agents.llm.providers.base.model_label`)
OTHER_MODEL = "other"
#: the `local` provider's model when it is configured with none (the one definition:
#: `agents.llm.providers.base.LOCAL_MODEL` is this)
LOCAL_MODEL = "local-echo"


@dataclass(frozen=True)
class UsageNames:
    """The provider and model names usage is counted under: those the providers file
    declares. A request may name any provider or model (and `local` answers with the
    model it was asked for): a counter per such name would grow the table, its changelog
    and every standby copy without bound."""

    #: declared provider → the model names the file gives it
    models: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def provider(self, name: str) -> str:
        return name if name in self.models else UNDECLARED_PROVIDER

    def model(self, provider: str, candidates: Iterable[str]) -> str:
        """The first of `candidates` the file names for `provider`, else `other` (`-`
        for an undeclared provider or no model at all)."""
        named = [m for m in candidates if m]
        if provider not in self.models or not named:
            return UNDECLARED_PROVIDER
        return next((m for m in named if m in self.models[provider]), OTHER_MODEL)


def usage_names(data: Mapping[str, Any]) -> UsageNames:
    """The names of a providers file's content (`llm_budgets.read_file`): its providers
    (and `local`, always there), each with the models the file names for it — its
    `model`, `deployment`, `models`, and those its `prices` and `budgets` name."""
    providers = data.get("providers") if isinstance(data.get("providers"), dict) else {}
    entries: dict[str, Any] = {str(k): v for k, v in (providers or {}).items()}
    entries.setdefault("local", {"kind": "local", "model": LOCAL_MODEL})
    out: dict[str, set[str]] = {}
    for name, cfg in entries.items():
        cfg = cfg if isinstance(cfg, dict) else {}
        models = out.setdefault(name, set())
        for key in ("model", "deployment"):
            if isinstance(cfg.get(key), str) and cfg[key]:
                models.add(cfg[key])
        if cfg.get("kind") == "local" and not models:
            models.add(LOCAL_MODEL)  # what `ProviderConfig.default_model` sends
        if isinstance(cfg.get("models"), dict):
            models.update(str(m) for m in cfg["models"].values())
    prices = data.get("prices")
    for name, priced in prices.items() if isinstance(prices, dict) else ():
        if str(name) in out and isinstance(priced, dict):
            out[str(name)].update(str(m) for m in priced)
    budgets = data.get("budgets")
    for b in budgets if isinstance(budgets, list) else ():
        if isinstance(b, dict) and str(b.get("provider")) in out and b.get("model"):
            out[str(b["provider"])].add(str(b["model"]))
    return UsageNames({p: frozenset(m) for p, m in out.items()})


@cache
def configured_names() -> UsageNames:
    """The usage names of `AGENTSTREAM_LLM_PROVIDERS_FILE` (without one: `local`), for
    the live stage and `rebuild` alike."""
    from agentstream.streams.settings import get_settings

    path = get_settings().llm_providers_file
    return usage_names(llm_budgets.read_file(path) if path is not None else {})


def sent_model(response: LLMResponse) -> str:
    """The model the stage sent the response's provider last (the providers file's name,
    which prices, budgets and usage use), "" when none."""
    return next(
        (
            a.model
            for a in reversed(response.attempts)
            if a.provider == response.provider and a.model
        ),
        "",
    )


def usage_keys(
    response: LLMResponse, n: int | None = None, names: UsageNames | None = None
) -> list[str]:
    """The counters a final response adds to: its agent's, its provider's and its
    model's, under the declared names only (`UsageNames`; the model: the one the
    provider answered with if declared, else the one it was sent)."""
    names = configured_names() if names is None else names
    part = partition_of(response.request_id, n)
    provider = names.provider(response.provider)
    model = names.model(provider, (response.model, sent_model(response)))
    return [
        f"{part}|agent|{response.agent_id or '-'}",
        f"{part}|provider|{provider}",
        f"{part}|model|{provider}|{model}",
    ]


def usage_increments(
    responses: Iterable[LLMResponse], n: int | None = None, names: UsageNames | None = None
) -> dict[str, Any]:
    """{usage key: {field: increment}} of some final responses, summed per key."""
    names = configured_names() if names is None else names
    out: dict[str, dict[str, int]] = {}
    for p in responses:
        usage = p.usage
        for key in usage_keys(p, n, names):
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


def charge_of(response: LLMResponse, at: int) -> llm_budgets.Charge:
    """What a final response spends, at its event time `at` (epoch seconds). Its models:
    the one the stage sent (the providers file's name, which prices and budgets use) and
    the one the provider answered with."""
    sent = sent_model(response)
    models = tuple(dict.fromkeys(m for m in (sent, response.model) if m))
    usage = response.usage
    return llm_budgets.Charge(
        agent=response.agent_id or "-",
        provider=response.provider or "-",
        models=models,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        total_tokens=usage.total_tokens if usage else 0,
        at=at,
    )


def spend_increments(
    dated: Iterable[tuple[LLMResponse, int]],
    config: llm_budgets.BudgetConfig | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    """{spend key: increments} of final responses with their event times. A response
    refused for its budget spent nothing and is not counted."""
    cfg = llm_budgets.configured() if config is None else config
    if not cfg.budgets:
        return {}
    return llm_budgets.spend_increments(
        cfg,
        (
            (partition_of(r.request_id, n), charge_of(r, at))
            for r, at in dated
            if r.status != "budget_exceeded"
        ),
    )


def apply_spend(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    p = event.payload
    if isinstance(p, LLMResponse):
        llm_budgets.add_spend(state, spend_increments([(p, int(event.occurred_at.timestamp()))]))


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
        expired=entry_expired,
    )
)
CANCELLED = register(
    TableSpec(
        name="llm_cancelled",
        sources=(LLM_CANCELLATIONS,),
        apply_at=apply_cancel_at,
        description="Request ids with a cancellation",
        types=frozenset({LLMCancelRequested.TYPE}),
        expired=entry_expired,
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
SPEND = register(
    TableSpec(
        name="llm_budget_spend",
        sources=(LLM_RESPONSES,),
        apply=apply_spend,
        description="Tokens and cost spent per partition, budget, window and agent",
        types=frozenset({LLMResponse.TYPE}),
        expired=llm_budgets.spend_expired,
    )
)
#: tables whose keys name their partition ("<partition>|...")
PARTITIONED_KEYS = frozenset({USAGE.name, SPEND.name})


def _table_class() -> type:
    import faust

    class KeyPartitionedTable(faust.Table):
        """A table writable from tasks outside stream iteration (the LLM calls run as
        tasks): ``table[key] = value`` and ``del table[key]`` go through
        `streams.tables.write` / `delete` to the partition the key names, never the
        current event's."""

        def partition_for_key(self, key: Any) -> int:
            text = str(key)
            if self.name in PARTITIONED_KEYS:
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
    from agentstream.streams.app import app

    spec = {s.name: s for s in (RESPONSES_DONE, CANCELLED, BREAKERS, USAGE, SPEND)}[spec_name]
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

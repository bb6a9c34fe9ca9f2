"""call_llm: every request on `llm.requests` ends with exactly one final response.

* Requests are admitted in order; each call runs as its own task, at most
  `llm_max_concurrency` per provider. When a provider's slots are all busy the agent
  waits for one before taking more (backpressure; Faust pauses fetching when its buffer
  fills), so no unbounded queue builds up and the stream is never blocked by one call.
* Acking: the request's offset is committed only after its final response was produced
  (the agent holds a reference on the message until then). A crash replays uncommitted
  requests; those already answered are skipped via the `llm_responses_done` table.
* cancel_llm: `llm.cancellations` is co-partitioned with `llm.requests` (same key, same
  partition count), so the worker running a request also sees its cancellation.
* Placement: both hold only on records under their request id in the partition that id
  hashes to (murmur2). A request elsewhere would reach a worker that does not hold its
  dedup entry and be called again (a second final response, a second bill); a
  cancellation elsewhere would reach one that does not run it. Either is refused, a
  dead letter saying why (`streams.tables.misplaced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from agentstream.agents.llm.runtime import CANCEL_CONSUMER, CONSUMER, runtime
from agentstream.schemas.errors import InvalidEvent
from agentstream.schemas.llm import LLMCancelRequested, LLMRequest
from agentstream.streams.app import app, catalogue_topic, settings
from agentstream.streams.health import Status, register_check
from agentstream.streams.processing import Inbound, dead_letter, decoded_batches, guarded
from agentstream.streams.tables import llm as tables
from agentstream.streams.tables import misplaced, origin_of
from agentstream.streams.topics import LLM_CANCELLATIONS, LLM_REQUESTS

for _spec in (
    tables.RESPONSES_DONE,
    tables.CANCELLED,
    tables.BREAKERS,
    tables.USAGE,
    tables.SPEND,
):
    tables.table(_spec.name)


#: seconds the agents wait to fill a batch after its first event. The shared default
#: (AGENTSTREAM_BATCH_WITHIN_S, 20 ms) trades latency for throughput in cheap stages; here
#: every request waited for it before its call started — most of the added latency of a
#: lone request. A burst is still taken in one batch: what is already queued is drained
#: without waiting.
ADMIT_WITHIN_S = 0.0001


@contextlib.contextmanager
def _ends_at_shutdown() -> Iterator[None]:
    """At worker shutdown Faust throws StopAsyncIteration into the stream's queue, which
    the batching generator turns into a RuntimeError (PEP 479); Faust would count that as
    a crash and restart the agent while the worker stops, hanging the shutdown. It is the
    end of the stream, so end the agent."""
    try:
        yield
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, StopAsyncIteration):
            raise


#: Exactly-once: a batch holds the worker's commit gate from when it is taken until it is
#: finished, and every commit waits for the gate while new batches of every agent wait
#: behind the commit. A request waiting for a provider slot inside its batch would hold
#: back `enforce_policy` and every commit for as long as the provider stays saturated
#: (chaos `llm_saturated`: 200 -> 72 decisions/s, pauses of 5.8 s). So under exactly-once
#: requests are taken one at a time, each only once a slot of its provider is free
#: (`_wait_for_slot`, before the gate); the admit inside the gate then finds it free.
_ONE_AT_A_TIME = settings.processing_guarantee == "exactly_once"


async def _wait_for_slot(batch: list[Inbound]) -> None:
    rt = runtime()
    for inbound in batch:
        if _misplaced(inbound, LLM_REQUESTS) is not None:
            continue  # refused by `_admit`: it takes no slot, so it waits for none
        request: LLMRequest = inbound.event.payload
        sem = rt.slot_for(request)  # the one `admit` takes
        await sem.acquire()  # only this agent acquires slots: it stays free until admit
        sem.release()


@app.agent(catalogue_topic(LLM_REQUESTS), name=CONSUMER)
async def call_llm(stream: Any) -> None:
    with _ends_at_shutdown():
        async for batch in decoded_batches(
            stream,
            consumer=CONSUMER,
            accept=[LLMRequest.TYPE],
            within_s=ADMIT_WITHIN_S,
            max_batch=1 if _ONE_AT_A_TIME else None,
            prepare=_wait_for_slot if _ONE_AT_A_TIME else None,
        ):
            for inbound in batch:
                await guarded(inbound, CONSUMER, _admit)


def _misplaced(inbound: Inbound, topic: str) -> str | None:
    """Why `inbound` is not under its request id in the partition that id hashes to (see
    the module docstring), or None."""
    payload = inbound.event.payload
    return misplaced(
        f"{payload.TYPE} of request {payload.request_id!r}",
        payload.request_id,
        origin_of(inbound.message, topic),
        f"{topic} is keyed by the request id",
    )


async def _refused_elsewhere(inbound: Inbound, topic: str, consumer: str) -> bool:
    """Dead-letter `inbound` and say True when it is misplaced (`_misplaced`)."""
    problem = _misplaced(inbound, topic)
    if problem is None:
        return False
    payload = inbound.event.payload
    await dead_letter(inbound.message, InvalidEvent(problem, type=payload.TYPE), consumer)
    return True


async def _admit(inbound: Inbound) -> None:
    if await _refused_elsewhere(inbound, LLM_REQUESTS, CONSUMER):
        return
    rt = runtime()
    rid = inbound.event.payload.request_id
    done = tables.table(tables.RESPONSES_DONE.name).get(rid)
    cancelled = tables.cancelled(rid)
    if done is None and not rt.answered_or_inflight(rid) and cancelled:
        await rt.answer_cancelled_early(inbound)  # never reaches a provider
        return
    await rt.admit(inbound)


@app.agent(catalogue_topic(LLM_CANCELLATIONS), name=CANCEL_CONSUMER)
async def cancel_llm(stream: Any) -> None:
    with _ends_at_shutdown():
        async for batch in decoded_batches(
            stream,
            consumer=CANCEL_CONSUMER,
            accept=[LLMCancelRequested.TYPE],
            within_s=ADMIT_WITHIN_S,
        ):
            for inbound in batch:
                await guarded(inbound, CANCEL_CONSUMER, _cancel)


async def _cancel(inbound: Inbound) -> None:
    if await _refused_elsewhere(inbound, LLM_CANCELLATIONS, CANCEL_CONSUMER):
        return
    payload: LLMCancelRequested = inbound.event.payload
    runtime().cancel(payload.request_id, payload.reason, inbound.event)


@app.task
async def _publish_breaker_transitions() -> None:
    await runtime().publish_transitions()


#: seconds between sweeps for dedup entries past their retention: often enough that an
#: entry outlives its retention by little, rarely enough to cost nothing
EXPIRE_EVERY_S = max(1.0, min(60.0, settings.llm_dedup_retention_s / 4 or 60.0))


@app.timer(interval=EXPIRE_EVERY_S)
async def _expire_dedup_entries() -> None:
    runtime().expire()
    runtime().expire_spend()  # windows that have ended


@app.on_partitions_revoked.connect
async def _revoke_calls(app: Any, revoked: Any, **kwargs: Any) -> None:
    runtime().revoke(set(revoked))


@app.on_before_shutdown.connect
async def _write_tables(app: Any, **kwargs: Any) -> None:
    runtime().write_tables()  # entries of answered requests, before the final commit


#: seconds a provider's setup check result is reused: /ready is polled often, and a
#: check is a real HTTP request to the provider (a billed API for some)
SETUP_CHECK_TTL_S = 30.0


def _provider_check(name: str) -> Any:
    cached: list[tuple[float, bool]] = []
    # one setup check at a time: callers arriving while it runs wait for its result
    # (each would otherwise make its own request to the provider)
    checking = asyncio.Lock()

    async def check() -> tuple[Status, str]:
        rt = runtime()
        breaker = rt.processor.breakers.get(name)
        if breaker is not None and breaker.state == "open":
            return "degraded", f"circuit open, probe in {breaker.retry_in_s():.1f}s"
        async with checking:
            now = time.monotonic()
            if not cached or now - cached[0][0] > SETUP_CHECK_TTL_S:
                cached[:] = [(now, await rt.registry.check_provider_setup(name))]
        ok = cached[0][1]
        return ("ok", "reachable") if ok else ("degraded", "setup check failed")

    return check


for _name in runtime().registry.names():
    register_check(f"provider:{_name}", _provider_check(_name))

from agentstream.agents.llm import views as _views  # noqa: E402,F401 - registers the web views

__all__ = ["call_llm", "cancel_llm", "settings"]

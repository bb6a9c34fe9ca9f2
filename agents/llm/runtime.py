"""Per-worker state of the call_llm stage: the processor, per-provider slots, in-flight
calls and their cancel switches. Kept out of the agent module so the agent stays thin and
the views and health checks can read the same objects."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from agentstream.agents.llm.adapter import WebSearchService
from agentstream.agents.llm.chunks import ChunkCoalescer, chunk_record
from agentstream.agents.llm.models import Hop, Route
from agentstream.agents.llm.processor import AgentProcessor, Outcome
from agentstream.agents.llm.providers.base import model_label
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.schemas import Event, encode
from agentstream.schemas.base import MAX_ID_LENGTH
from agentstream.schemas.llm import (
    BreakerStateChanged,
    ErrorInfo,
    LLMRequest,
    LLMResponse,
    ToolCallDelta,
    Usage,
)
from agentstream.streams import llm_budgets
from agentstream.streams.app import app, settings
from agentstream.streams.audit_chain import chain_writer
from agentstream.streams.delivery import processing_failed
from agentstream.streams.errors import ProviderRequestError
from agentstream.streams.observability import (
    BREAKER_STATE,
    EVENTS_OUT,
    LLM_BUDGET_DENIED,
    LLM_CALLS,
    LLM_LATENCY,
    LLM_TOKENS,
)
from agentstream.streams.processing import (
    Inbound,
    _producer,
    dead_letter,
    emit,
    hold,
    release,
    watch_delivery,
)
from agentstream.streams.resilience import RetryPolicy, Transition
from agentstream.streams.settings import output_limit
from agentstream.streams.tables import llm as tables
from agentstream.streams.topics import LLM_BREAKER, LLM_CHUNKS, LLM_RESPONSES
from agentstream.streams.web_cluster import active_partitions

log = logging.getLogger(__name__)

CONSUMER = "call_llm"
CANCEL_CONSUMER = "cancel_llm"
BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}
#: seconds final responses wait for their dedup/usage table entries (written together)
TABLE_WRITE_DELAY_S = 0.01


@dataclass
class Flight:
    request: LLMRequest
    inbound: Inbound
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    revoked: bool = False
    #: the route, with the providers whose budget is spent skipped
    plan: Route | None = None
    started: float = field(default_factory=time.perf_counter)


class CallRuntime:
    def __init__(self) -> None:
        self.registry = LLMRegistry.from_settings(settings)
        search = WebSearchService(settings.web_search_url) if settings.web_search_url else None
        self.processor = AgentProcessor(
            self.registry,
            policy=RetryPolicy(
                max_attempts=settings.llm_max_attempts,
                base_delay_s=settings.llm_backoff_base_s,
                max_delay_s=settings.llm_backoff_max_s,
            ),
            default_provider=settings.llm_default_provider,
            timeout_s=settings.llm_timeout_s,
            breaker_failures=settings.llm_breaker_failures,
            breaker_window_s=settings.llm_breaker_window_s,
            breaker_reset_s=settings.llm_breaker_reset_s,
            on_transition=self._on_transition,
            search=search,
        )
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.inflight: dict[str, Flight] = {}
        self.transitions: asyncio.Queue[Transition] = asyncio.Queue()
        self.deduplicated = 0
        #: request ids whose final response is out but whose table entries (dedup,
        #: usage) are not written yet; they count as answered for dedup
        self.answered: set[str] = set()
        #: request id -> its record, for responses handed to the producer and not yet
        #: confirmed by the broker (`_response_sent`)
        self._unconfirmed: dict[str, Any] = {}
        self._unwritten: list[tuple[LLMResponse, dict[str, Any], Any]] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    # -- admission -------------------------------------------------------------------------
    def slot(self, provider: str) -> asyncio.Semaphore:
        sem = self.slots.get(provider)
        if sem is None:
            limit = settings.llm_max_concurrency
            with contextlib.suppress(Exception):
                limit = self.registry.config(provider).max_concurrency or limit
            sem = self.slots[provider] = asyncio.Semaphore(limit)
        return sem

    def slot_for(self, request: LLMRequest) -> asyncio.Semaphore:
        """The slot a request waits for: that of the first provider of its chain the
        operator declared (a name the request made up gets no slot of its own, nor a
        lasting entry here: it is never called). A chain with no declared provider calls
        nothing and shares one slot."""
        known = (h.provider for h in self.processor.route(request).hops)
        return self.slot(next((p for p in known if self.registry.knows(p)), ""))

    def provider_label(self, provider: str) -> str:
        """A metric label: the provider's name if the operator declared it, else `-`
        (names from requests would make a series each)."""
        return provider if provider and self.registry.knows(provider) else "-"

    def model_label(self, provider: str, model: str | None) -> str:
        """A metric label for a model: one the providers file names for `provider`, else
        `other` (a request may name any model; each would make a series)."""
        if provider == "-" or not model:
            return "-"
        try:
            cfg = self.registry.config(provider)
        except ProviderRequestError:  # registered without a config (tests)
            return model
        return model_label(cfg, model)

    async def admit(self, inbound: Inbound) -> None:
        """Start the call for one request, after waiting for a slot of its provider (the
        backpressure: the agent takes no more requests while every slot is busy)."""
        request: LLMRequest = inbound.event.payload
        rid = request.request_id
        if self.answered_or_inflight(rid) or tables.table(tables.RESPONSES_DONE.name).get(rid):
            self.deduplicated += 1
            log.info("request %r already answered or in flight: not calling again", rid)
            return
        plan, denial = self.budget_plan(request)
        if denial is not None:
            await self.refuse(inbound, request, plan, denial)  # never reaches a provider
            return
        flight = Flight(request, inbound, plan=plan)
        if tables.cancelled(rid):
            flight.cancel.set()
        self.inflight[rid] = flight
        sem = self.slot_for(request)
        try:
            await sem.acquire()
        except BaseException:
            self.inflight.pop(rid, None)
            raise
        if not app.consumer.counts_ack(inbound.message):
            # its partition was revoked while the request waited for a slot: its owner
            # now consumes it again from the committed offset
            self._flight_over(flight, sem, None)
            log.info("request %r: partition revoked while it waited; not calling", rid)
            return
        # the offset may be committed only once the final response is out: hold a ref
        hold(inbound.message)
        flight.task = task = asyncio.create_task(self._run(flight, sem), name=f"llm:{rid}")
        # not in `_run`'s finally: a task cancelled before its first step (a revoke in
        # the same loop turn) never runs it, and would keep its slot and its entry
        task.add_done_callback(functools.partial(self._flight_over, flight, sem))

    def _flight_over(self, flight: Flight, sem: asyncio.Semaphore, _task: Any) -> None:
        sem.release()
        rid = flight.request.request_id
        if self.inflight.get(rid) is flight:
            del self.inflight[rid]

    # -- budgets ----------------------------------------------------------------------------
    def spent(self, budget: llm_budgets.Budget, agent: str, start: int) -> llm_budgets.Spent:
        """What `agent` spent of `budget` in the window starting at `start`, over every
        partition this worker holds: its own and its standby copies of the others' (with
        their changelog's delay). With `AGENTSTREAM_STANDBY_REPLICAS` at least the number
        of workers minus one every worker holds all of them; with fewer, only part."""
        data = tables.table(tables.SPEND.name).data
        total = llm_budgets.Spent()
        for p in range(tables.partitions()):
            value = data.get(llm_budgets.spend_key(p, budget, start, agent))
            if value is not None:
                total += llm_budgets.spent_of(value)
        return total

    def budget_plan(
        self, request: LLMRequest, now: float | None = None
    ) -> tuple[Route, llm_budgets.Denial | None]:
        """The request's route with each provider whose budget is spent skipped, and the
        denial when that leaves none to call. Check-then-spend: the spend is what final
        responses recorded, so calls in flight (and responses not yet written, a few ms)
        are not in it and can take a window past its limit by their own usage."""
        plan = self.processor.route(request)
        config = self.registry.budgets
        if not config.budgets:
            return plan, None
        now = time.time() if now is None else now
        hops: list[Hop] = []
        first: llm_budgets.Denial | None = None
        for hop in plan.hops:
            denial = None
            if not hop.skip:
                denial = llm_budgets.over_budget(
                    config, self.spent, request.agent_id, hop.provider, hop.model, now
                )
            if denial is None:
                hops.append(hop)
                continue
            first = first or denial
            hops.append(Hop(hop.provider, hop.model, skip=denial.reason))
        if first is None:
            return plan, None
        limited = Route(tuple(hops), plan.alias)
        callable_left = any(not h.skip for h in hops)
        return limited, None if callable_left else first

    async def refuse(
        self, inbound: Inbound, request: LLMRequest, plan: Route, denial: llm_budgets.Denial
    ) -> None:
        """The final response `budget_exceeded`, naming the budget; no provider called."""
        _denied(denial.limit, denial.budget.window).inc()
        provider = next(
            (h.provider for h in plan.hops if h.skip == denial.reason), plan.declared_head
        )
        outcome = Outcome(
            "budget_exceeded",
            provider=provider,
            model=plan.model_of(provider),
            alias=plan.alias,
            error=ErrorInfo(error_class="BudgetExceeded", message=denial.reason[:2000]),
        )
        await self.finish_without_call(inbound, request, outcome)

    async def finish_without_call(
        self, inbound: Inbound, request: LLMRequest, outcome: Outcome
    ) -> None:
        """`finish` for a request answered without any provider call (cancelled before
        it started, refused by a budget): its message is held like a call's request and
        acked by write_tables, or at once if the answer cannot be sent."""
        hold(inbound.message)
        try:
            await self.finish(inbound, request, outcome)
        except BaseException:
            release(inbound.message, app.consumer)
            raise

    def answered_or_inflight(self, request_id: str) -> bool:
        return request_id in self.inflight or request_id in self.answered

    def cancel(self, request_id: str, reason: str, event: Event[Any]) -> None:
        tables.apply_cancel(tables.table(tables.CANCELLED.name), event)
        flight = self.inflight.get(request_id)
        if flight is not None:
            flight.cancel.set()

    def revoke(self, revoked: set[Any]) -> None:
        """Partitions moved to another worker: stop their calls without a final response;
        the new owner replays the uncommitted requests."""
        for flight in list(self.inflight.values()):
            if flight.inbound.message.tp in revoked and flight.task is not None:
                flight.revoked = True
                flight.task.cancel()
        # a response not yet confirmed no longer answers its request here: a copy of the
        # request consumed after the rebalance (this worker may get the partition back)
        # would be acked as answered while that response may still fail
        for rid, message in list(self._unconfirmed.items()):
            if message.tp in revoked:
                self.answered.discard(rid)
        self.write_tables()

    # -- one call --------------------------------------------------------------------------
    async def _run(self, flight: Flight, sem: asyncio.Semaphore) -> None:
        request, inbound = flight.request, flight.inbound
        partition = inbound.message.partition
        ack = True
        chunk_topic = settings.topic(LLM_CHUNKS)
        key = request.request_id.encode()
        source = f"{CONSUMER}@{settings.worker_id}"
        request_event = inbound.event
        causation = str(request_event.event_id)
        correlation = request_event.correlation_id or causation
        # the producer Faust's Topic.send uses (cached: app.maybe_start_producer() can
        # yield to the loop, a wasted turn per call)
        producer = await _producer()
        chunks_out = _chunks_out()

        async def publish(
            sequence: int,
            delta: str,
            provider: str,
            attempt: int,
            tool_calls: list[ToolCallDelta],
        ) -> None:
            # straight to the producer Faust's Topic.send would use (so flush-before-
            # commit covers it), without Topic.send's per-message overhead: a chunk is
            # the hottest path of this stage
            value = chunk_record(
                request_id=request.request_id,
                sequence=sequence,
                delta=delta,
                provider=provider,
                attempt=attempt,
                source=source,
                correlation_id=correlation,
                causation_id=causation,
                tool_calls=tool_calls,
            )
            fut = await producer.send(chunk_topic, key, value, partition, None, None)
            watch_delivery(fut, LLM_CHUNKS)
            chunks_out.inc()

        chunks = ChunkCoalescer(publish, settings.llm_chunk_coalesce_ms / 1000)

        try:
            outcome = await self.processor.process_request(
                request, on_chunk=chunks.add, cancel=flight.cancel, plan=flight.plan
            )
            await chunks.flush()  # every chunk before the final response
            outcome.chunks = chunks.published
            await self.finish(inbound, request, outcome)
            ack = False  # acked once its table entries are written (write_tables)
        except asyncio.CancelledError:
            chunks.discard()
            # the worker is stopping or lost the partition (user cancellation sets
            # flight.cancel instead): no final response, no ack — the request is replayed
            ack = False
            if flight.revoked:
                return
            raise
        except Exception as exc:  # publishing failed: keep a trace rather than lose it
            chunks.discard()
            log.exception("call_llm could not finish %r", request.request_id)
            try:
                await dead_letter(inbound.message, exc, CONSUMER)
            except BaseException as failed:
                # neither a response nor a dead letter: the request must be consumed
                # again, so no commit may pass it (the worker restarts)
                ack = False
                if not isinstance(failed, asyncio.CancelledError):
                    processing_failed(failed)
                raise
        finally:
            if ack:
                release(inbound.message, app.consumer)

    async def finish(self, inbound: Inbound, request: LLMRequest, outcome: Outcome) -> None:
        event = self.final_event(inbound.event, request, outcome)
        response: LLMResponse = event.payload
        sealed, sent = await chain_writer(LLM_RESPONSES).emit_sent(
            event, partition=inbound.message.partition
        )
        label = self.provider_label(outcome.provider)
        _calls(label, response.status).inc()
        _latency(label).observe(outcome.latency_ms / 1000)
        if outcome.usage is not None and outcome.usage.estimated:
            # provider-reported usage is counted by the adapter; estimates only here
            LLM_TOKENS.labels(label, self.model_label(label, outcome.model), "estimated").inc(
                outcome.usage.total_tokens
            )
        # last: from here on the request's ack is `_response_sent`'s, then write_tables'
        self.answered.add(request.request_id)
        self._unconfirmed[request.request_id] = inbound.message
        sent.add_done_callback(functools.partial(self._response_sent, sealed, inbound.message))

    def final_event(
        self, request_event: Event[Any], request: LLMRequest, outcome: Outcome
    ) -> Event[Any]:
        """The final response event of `outcome`, caused by the request's event."""
        response = LLMResponse(
            request_id=request.request_id,
            agent_id=request.agent_id,
            status=outcome.status,
            content=outcome.content,
            usage=outcome.usage,
            provider=outcome.provider,
            model=outcome.model,
            alias=outcome.alias,
            schema_valid=outcome.schema_valid,
            schema_error=outcome.schema_error,
            tool_calls=outcome.tool_calls,
            finish_reason=outcome.finish_reason,
            attempts=outcome.attempts,
            latency_ms=outcome.latency_ms,
            chunks=outcome.chunks,
            error=outcome.error,
        )
        source = f"{CONSUMER}@{settings.worker_id}"
        event = request_event.caused(response, source=source)
        limit = output_limit(settings.max_event_bytes, len(event.key.encode()))

        def size_of(r: LLMResponse) -> int:
            return final_size(event if r is response else request_event.caused(r, source=source))

        fitted = fit_response(response, size_of, limit)
        if fitted is response:
            return event
        log.warning(
            "call_llm: the final response of %r is too large to send; sent as failed: %s",
            request.request_id,
            fitted.error.message if fitted.error else "",
        )
        return request_event.caused(fitted, source=source)

    def _response_sent(self, sealed: Event[Any], message: Any, sent: Any) -> None:
        """The final response reached the broker: its dedup and usage entries may be
        written (write_tables, batched), then the request acked. Not before: a dedup
        entry that outlived an undelivered response (it goes to another partition) made
        the restarted worker skip the request, which was then never answered. A failed
        delivery leaves the request held: `delivery_failed` stops every commit and the
        worker restarts and consumes it again."""
        rid = sealed.payload.request_id
        if self._unconfirmed.get(rid) is message:
            del self._unconfirmed[rid]
        if sent.cancelled() or sent.exception() is not None:
            self.answered.discard(rid)
            return
        self._unwritten.append((sealed.payload, tables.done_entry(sealed), message))
        if self._flush_handle is None:
            # in a context of its own: the writes are no batch's (this callback runs in
            # the context of the call that armed it, whose batch may be stale by now,
            # and the table writer would drop every entry of the flush with it)
            self._flush_handle = asyncio.get_running_loop().call_later(
                TABLE_WRITE_DELAY_S, self.write_tables, context=contextvars.Context()
            )

    def write_tables(self) -> None:
        """Write the dedup and usage entries of the responses produced since the last
        call, then ack their requests. Batched: a burst of responses shares its usage
        counters (a handful of keys), so one changelog record per counter instead of
        three per response. The ack waits for the writes, so a request's offset is never
        committed before its entries are in the producer (Faust flushes it before
        committing) — the guarantee of writing them one by one."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._unwritten = self._unwritten, []
        if not batch:
            return
        # a response of a partition revoked since: its owner answers the request again
        # (its record is consumed again); no entry goes to a partition this worker left
        stale = [b for b in batch if not app.consumer.counts_ack(b[2])]
        if stale:
            batch = [b for b in batch if app.consumer.counts_ack(b[2])]
            for response, _, message in stale:
                self.answered.discard(response.request_id)
                release(message, app.consumer)  # counts for nothing (`counts_ack`)
        if not batch:
            return
        try:
            done = tables.table(tables.RESPONSES_DONE.name)
            for response, entry, _ in batch:
                done[response.request_id] = entry
            tables.add_usage(
                tables.table(tables.USAGE.name), tables.usage_increments(r for r, _, _ in batch)
            )
            if self.registry.budgets.budgets:
                llm_budgets.add_spend(
                    tables.table(tables.SPEND.name),
                    tables.spend_increments(
                        ((r, e["at"]) for r, e, _ in batch), self.registry.budgets
                    ),
                )
        except Exception:  # keep acking: a stuck offset would stall the partition
            log.exception("call_llm could not write dedup/usage entries of %d", len(batch))
        finally:
            for response, _, message in batch:
                self.answered.discard(response.request_id)
                release(message, app.consumer)

    async def answer_cancelled_early(self, inbound: Inbound) -> None:
        request: LLMRequest = inbound.event.payload
        plan = self.processor.route(request)
        head = plan.declared_head
        outcome = Outcome(
            "cancelled",
            provider=head,
            model=plan.model_of(head) if head else "",
            usage=Usage(estimated=True),
            alias=plan.alias,
        )
        await self.finish_without_call(inbound, request, outcome)

    # -- retention of the dedup and cancellation entries ----------------------------------
    def expire(self, now: float | None = None) -> int:
        """Delete the dedup and cancellation entries past `AGENTSTREAM_LLM_DEDUP_RETENTION_S`
        in the partitions this worker owns (tombstones in the changelog, so a recovering
        worker does not bring them back). Returns how many were deleted."""
        retention = settings.llm_dedup_retention_s
        if retention <= 0 or app.rebalancing or getattr(app, "in_recovery", False):
            # partitions are moving: a tombstone could go to a partition this worker is
            # losing (under exactly-once, to a transaction that no longer exists), or
            # overtake a newer value still being recovered; the next sweep catches up
            return 0
        now = time.time() if now is None else now
        n = tables.partitions()
        removed = 0
        for spec in (tables.RESPONSES_DONE, tables.CANCELLED):
            table = tables.table(spec.name)
            # the worker actively owning a key's changelog partition writes its tombstone
            owned = active_partitions(table)
            if not owned:
                continue
            keys = tables.expired_keys(
                table.items(),
                now,
                retention,
                lambda k, owned=owned: tables.partition_of(k, n) in owned,  # type: ignore[misc]
            )
            for key in keys:
                if not self.answered_or_inflight(key):
                    del table[key]
                    removed += 1
        if removed:
            log.info("call_llm: deleted %d dedup/cancellation entries past retention", removed)
        return removed

    def expire_spend(self, now: float | None = None) -> int:
        """Delete the budget spend entries whose window has ended, in the partitions this
        worker owns (the others' owners delete theirs). Returns how many were deleted."""
        if app.rebalancing or getattr(app, "in_recovery", False):
            return 0  # as for the dedup entries: the next sweep catches up
        now = time.time() if now is None else now
        table = tables.table(tables.SPEND.name)
        owned = active_partitions(table)
        stale = [
            key
            for key, value in list(table.items())
            if (parsed := llm_budgets.parse_spend_key(key)) is not None
            and parsed[0] in owned
            and llm_budgets.spend_expired(value, now)
        ]
        for key in stale:
            del table[key]
        return len(stale)

    # -- breaker transitions -----------------------------------------------------------------
    def _on_transition(self, t: Transition) -> None:
        BREAKER_STATE.labels(t.name).set(BREAKER_LEVEL[t.current])
        self.transitions.put_nowait(t)

    async def publish_transitions(self) -> None:
        while True:
            t = await self.transitions.get()
            event = Event.of(
                BreakerStateChanged(
                    provider=t.name,
                    previous=t.previous,
                    current=t.current,
                    failures=t.failures,
                    changed_at=t.at,
                    reason=t.reason[:1000],
                ),
                source=f"{CONSUMER}@{settings.worker_id}",
            )
            try:
                await emit(LLM_BREAKER, event)
                tables.apply_breaker(tables.table(tables.BREAKERS.name), event)
            except Exception:  # keep publishing later transitions
                log.exception("could not publish breaker transition %s", t)


#: what sealing (`streams.audit_chain.seal`) adds to a final response's encoding, at
#: most: `prev_hash` and `hash` (64 hex digits each), `signed_by` and `signature` (at most
#: MAX_ID_LENGTH and 256 characters), each character JSON-escaped to at most 6 bytes
SEAL_ROOM = 6 * (64 + 64 + MAX_ID_LENGTH + 256)
TOO_LARGE = "ResponseTooLarge"


def final_size(event: Event[Any]) -> int:
    """An unsealed final response event's encoded size once sealed, at most."""
    return len(encode(event)) + SEAL_ROOM


def fit_response(
    response: LLMResponse, size_of: Callable[[LLMResponse], int], limit: int
) -> LLMResponse:
    """`response` if its encoding (`size_of`) is within the producer's `limit`, else a
    `failed` one that is: the content, tool calls and schema verdict dropped, and the
    attempts and the model's name cut too if that is not enough. It keeps the usage —
    the call happened and was billed, so usage, spend and budgets count it — and the
    `chunks` already published, which stand: the final response says they are void.
    Sending the large one failed, and the request ended with no final response."""
    size = size_of(response)
    if size <= limit:
        return response
    message = (
        f"the final {response.status} response of {size} bytes exceeded the limit of "
        f"{limit} bytes: its content and tool calls are dropped"
        + (f" (its {response.chunks} chunks stand, void)" if response.chunks else "")
    )
    failed = response.model_copy(
        update={
            "status": "failed",
            "content": "",
            "tool_calls": [],
            "schema_valid": None,
            "schema_error": "",
            "metadata": {},
            "error": ErrorInfo(error_class=TOO_LARGE, message=message[:2000]),
        }
    )
    if size_of(failed) <= limit:
        return failed
    # the attempts (each error up to 2000 characters) or a provider's model name: every
    # field left is bounded
    return failed.model_copy(
        update={
            "attempts": [],
            "model": response.model[:256],
            "error": ErrorInfo(
                error_class=TOO_LARGE, message=(message + "; so are its attempts")[:2000]
            ),
        }
    )


@cache
def _calls(provider: str, status: str) -> Any:
    return LLM_CALLS.labels(provider, status)


@cache
def _denied(limit: str, window: str) -> Any:
    return LLM_BUDGET_DENIED.labels(limit, window)


@cache
def _latency(provider: str) -> Any:
    return LLM_LATENCY.labels(provider)


@cache
def _chunks_out() -> Any:
    return EVENTS_OUT.labels(LLM_CHUNKS)


@cache
def runtime() -> CallRuntime:
    return CallRuntime()

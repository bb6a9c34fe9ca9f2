"""call_llm's requests are acked only once answered for good: its delivery bookkeeping.

Each test drives `CallRuntime` with Faust's real messages, a fake consumer that records
acks, and the runtime's own slots and flights (no Kafka, no provider):

* a call cancelled before its first step (a revoke in the same loop turn) gives back its
  slot and its in-flight entry (else: one slot gone for good, and the request, consumed
  again later, skipped as "in flight" and acked unanswered);
* a request whose final response and dead letter both fail is not acked, and no commit
  passes it (else: committable with neither sent);
* a request's dedup entry is written, and the request acked, only once its final
  response reached the broker (else: a dedup entry that outlived an undelivered
  response made the restarted worker skip the request);
* a request admitted after its partition was revoked is not called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from faust.transport.consumer import ConsumerMessage
from faust.types import TP

from agentstream.agents.llm import runtime as rtmod
from agentstream.agents.llm.runtime import CallRuntime
from agentstream.schemas import Event
from agentstream.schemas.llm import ChatMessage, LLMContext, LLMRequest
from agentstream.streams.delivery import HOLDS
from agentstream.streams.processing import Inbound

PART = TP("llm.requests", 0)
SOON_S = 5.0


class FakeConsumer:
    """What the runtime asks of the worker's consumer: whether an ack counts, and acks."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.current = True

    def counts_ack(self, message: Any) -> bool:
        return self.current

    def ack(self, message: Any) -> bool:
        if not self.current:
            return False
        self.acked.append(message.offset)
        return True


class FakeApp:
    def __init__(self) -> None:
        self.consumer = FakeConsumer()


def inbound(rid: str, offset: int) -> Inbound:
    request = LLMRequest(
        request_id=rid,
        agent_id="a",
        provider="local",
        context=LLMContext(messages=[ChatMessage(role="user", content="hi")]),
    )
    message = ConsumerMessage(
        PART.topic, 0, offset, 0.0, 0, [], rid.encode(), b"v", None, 1, 1, PART
    )
    return Inbound(Event.of(request, source="test"), message)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApp]:
    tables: dict[str, dict[str, Any]] = {}
    fake = FakeApp()
    monkeypatch.setattr(rtmod.tables, "table", lambda name: tables.setdefault(name, {}))
    monkeypatch.setattr(rtmod.tables, "cancelled", lambda rid, now=None: False)
    monkeypatch.setattr(rtmod.tables, "add_usage", lambda *a, **k: None)
    monkeypatch.setattr(rtmod, "app", fake)

    async def producer() -> Any:
        return object()

    monkeypatch.setattr(rtmod, "_producer", producer)
    HOLDS.forget({PART})
    yield fake
    HOLDS.forget({PART})


async def test_a_call_cancelled_before_its_first_step_gives_back_its_slot(
    fake_app: FakeApp,
) -> None:
    rt = CallRuntime()
    request = inbound("r1", 10)
    sem = rt.slot_for(request.event.payload)
    free = sem._value
    await rt.admit(request)
    rt.revoke({PART})  # in the same loop turn: the call's task never took a step
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sem._value == free and "r1" not in rt.inflight
    assert fake_app.consumer.acked == []  # not answered, not acked: consumed again


async def test_a_request_whose_response_and_dead_letter_both_fail_is_not_acked(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[BaseException] = []
    monkeypatch.setattr(rtmod, "processing_failed", failures.append)

    async def finish(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the response's send failed")

    async def dead_letter(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the dead letter's send failed too")

    monkeypatch.setattr(rtmod, "dead_letter", dead_letter)
    rt = CallRuntime()
    monkeypatch.setattr(rt, "finish", finish)
    request = inbound("r2", 20)
    await rt.admit(request)
    task = rt.inflight["r2"].task
    assert task is not None
    with pytest.raises(RuntimeError, match="dead letter"):
        await asyncio.wait_for(task, SOON_S)
    assert fake_app.consumer.acked == []
    assert HOLDS.floor(PART) == 20  # no commit passes it
    assert [str(e) for e in failures] == ["the dead letter's send failed too"]


class PendingWriter:
    """`chain_writer(...)` whose sends wait for the test to settle them."""

    def __init__(self) -> None:
        self.sent: list[asyncio.Future[Any]] = []

    async def emit_sent(self, event: Any, partition: int) -> tuple[Any, Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append(fut)
        return event, fut


async def test_a_requests_dedup_entry_and_ack_wait_for_its_response_to_be_delivered(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = PendingWriter()
    monkeypatch.setattr(rtmod, "chain_writer", lambda topic: writer)
    rt = CallRuntime()
    done = rtmod.tables.table(rtmod.tables.RESPONSES_DONE.name)
    first, second = inbound("r3", 30), inbound("r4", 31)
    for request in (first, second):
        await rt.admit(request)
        flight = rt.inflight[request.event.payload.request_id]
        assert flight.task is not None
        await asyncio.wait_for(flight.task, SOON_S)
    await asyncio.sleep(rtmod.TABLE_WRITE_DELAY_S * 5)
    # neither response has reached the broker: no dedup entry, no ack, held
    assert "r3" not in done and "r4" not in done
    assert fake_app.consumer.acked == [] and HOLDS.floor(PART) == 30
    assert rt.answered_or_inflight("r3")  # not called twice meanwhile
    writer.sent[0].set_result(None)  # r3 delivered
    writer.sent[1].set_exception(RuntimeError("r4 refused"))  # delivery_failed's
    await asyncio.sleep(rtmod.TABLE_WRITE_DELAY_S * 5)
    assert "r3" in done and "r4" not in done
    assert fake_app.consumer.acked == [30]
    assert HOLDS.floor(PART) == 31  # r4 stays held: consumed again after the restart


async def test_a_request_admitted_after_its_partition_was_revoked_is_not_called(
    fake_app: FakeApp,
) -> None:
    rt = CallRuntime()
    request = inbound("r5", 50)
    sem = rt.slot_for(request.event.payload)
    free = sem._value
    fake_app.consumer.current = False  # revoked while the batch waited for the slot
    await rt.admit(request)
    assert "r5" not in rt.inflight and sem._value == free
    assert HOLDS.floor(PART) is None


async def test_a_response_not_yet_confirmed_answers_no_copy_after_a_revoke(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its response is confirmed a request counts as answered in this process. A
    copy consumed after a rebalance that gave the partition back was then acked as
    answered, and when the first response's send failed nothing answered it."""
    writer = PendingWriter()
    monkeypatch.setattr(rtmod, "chain_writer", lambda topic: writer)
    rt = CallRuntime()
    request = inbound("r6", 60)
    await rt.admit(request)
    flight = rt.inflight["r6"]
    assert flight.task is not None
    await asyncio.wait_for(flight.task, SOON_S)
    assert rt.answered_or_inflight("r6")  # not called twice while it is on its way
    rt.revoke({PART})
    assert not rt.answered_or_inflight("r6")  # a copy is called again, not acked
    writer.sent[0].set_exception(RuntimeError("refused"))
    await asyncio.sleep(0)
    assert not rt.answered_or_inflight("r6") and rt._unconfirmed == {}


async def test_the_table_writes_of_responses_are_no_batchs(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer that writes the dedup and usage entries ran in the context of the call
    that armed it, i.e. with its admitting batch as the writer of every entry of the
    flush: under exactly-once, that batch gone stale, the table writer dropped them all,
    a current request's entries too."""
    from agentstream.streams import processing

    writer = PendingWriter()
    monkeypatch.setattr(rtmod, "chain_writer", lambda topic: writer)
    seen: list[Any] = []
    monkeypatch.setattr(
        rtmod.tables, "add_usage", lambda *a, **k: seen.append(processing.written_by())
    )
    rt = CallRuntime()
    token = processing._TAKEN.set(("batch", None, 0, 1))  # the admitting batch's
    try:
        request = inbound("r7", 70)
        await rt.admit(request)
    finally:
        processing._TAKEN.reset(token)
    flight = rt.inflight["r7"]
    assert flight.task is not None
    await asyncio.wait_for(flight.task, SOON_S)
    writer.sent[0].set_result(None)
    await asyncio.sleep(rtmod.TABLE_WRITE_DELAY_S * 5)
    assert seen == [None]

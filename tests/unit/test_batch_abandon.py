"""A batch its agent leaves by an exception is never acked (streams.delivery, invariant 1;
the agent side is streams.processing): before, `event_batches` acked it in a `finally`, so
an exception outside `guarded` (e.g. in `enforce_policy._publish`) lost the batch's
inputs. Under exactly-once a batch taken before a revoke is abandoned: no output of it may
leave its transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import agentstream.streams.processing as processing
from agentstream.streams.processing import (
    BatchAbandoned,
    abandon_open_batch,
    decoded_batches,
    event_batches,
)
from tests.unit.test_decoded_batches import Gate, message
from tests.unit.test_event_batches import App, Ev, Msg, Stream, events


@pytest.fixture
def failures(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """What `abandon_open_batch` reported as a worker failure (instead of crashing)."""
    seen: list[BaseException] = []
    monkeypatch.setattr(processing, "processing_failed", seen.append)
    monkeypatch.setattr(processing, "refuse_commits", lambda exc: seen.append(exc))
    return seen


async def agent(stream: Stream, fail_on: int, exc: BaseException, seen: list[int]) -> None:
    """An agent body that raises on its `fail_on`-th batch, as BatchAgent runs it."""
    try:
        n = 0
        async for batch in event_batches(stream, max_batch=100, within_s=0.001):
            n += 1
            seen += [e.message.offset for e in batch]
            if n == fail_on:
                raise exc
    except BaseException as caught:
        await abandon_open_batch(caught, stopping=False)
        raise


async def test_a_batch_left_by_an_exception_is_not_acked_and_fails_the_worker(
    failures: list[BaseException],
) -> None:
    stream = Stream(App())
    first, second = events([0, 1]), events([2, 3])
    for ev in first:
        stream.channel.queue.put_nowait(ev)
    seen: list[int] = []
    task = asyncio.create_task(agent(stream, 2, RuntimeError("publish failed"), seen))
    await asyncio.sleep(0.05)
    for ev in second:
        stream.channel.queue.put_nowait(ev)
    with pytest.raises(RuntimeError, match="publish failed"):
        await asyncio.wait_for(task, 2)
    assert seen == [0, 1, 2, 3]
    assert [e.acks for e in first] == [[0], [1]]  # finished: the agent came back for more
    assert [e.acks for e in second] == [[], []]  # was acked in a `finally` before
    assert [type(f) for f in failures] == [RuntimeError]


async def test_closing_the_iterator_does_not_ack_its_open_batch() -> None:
    stream = Stream(App())
    batch_events = events([5, 6])
    for ev in batch_events:
        stream.channel.queue.put_nowait(ev)
    gen = event_batches(stream, max_batch=100, within_s=0.001)
    batch = await asyncio.wait_for(gen.__anext__(), 2)
    assert [e.message.offset for e in batch] == [5, 6]
    await gen.aclose()
    assert [e.acks for e in batch_events] == [[], []]


async def test_no_batch_in_hand_is_no_failure(failures: list[BaseException]) -> None:
    task = asyncio.create_task(abandon_open_batch(RuntimeError("before any batch"), stopping=False))
    await task
    assert failures == []


async def test_exactly_once_a_batch_taken_before_a_revoke_is_abandoned_unacked(
    monkeypatch: pytest.MonkeyPatch, failures: list[BaseException]
) -> None:
    log: list[str] = []
    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", Gate(log))
    app = App()
    app.consumer._revokes = 0  # type: ignore[attr-defined]
    stream = Stream(app)
    taken = [Ev(Msg("in", 0, 0, 1), message(0)), Ev(Msg("in", 0, 1, 1), message(1))]
    for ev in taken:
        stream.channel.queue.put_nowait(ev)

    async def body() -> None:
        try:
            async for _batch in decoded_batches(stream, consumer="c", max_batch=10, within_s=0.01):
                processing.check_batch_current()  # an output before the revoke: allowed
                log.append("sent")
                app.consumer._revokes += 1  # type: ignore[attr-defined]  # the revoke
                processing.check_batch_current()  # the next output: abandoned
                log.append("sent after the revoke")
        except BaseException as exc:
            await abandon_open_batch(exc, stopping=False)
            raise

    with pytest.raises(BatchAbandoned):
        await asyncio.wait_for(asyncio.create_task(body()), 2)
    assert log == ["enter", "sent", "leave"]  # the gate is released at once
    assert [e.acks for e in taken] == [[], []]
    assert failures == []  # a rebalance, not a failure: Faust restarts the agent


async def test_exactly_once_a_batch_waiting_at_the_gate_through_a_revoke_is_abandoned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = App()
    app.consumer._revokes = 0  # type: ignore[attr-defined]

    class RevokingGate(Gate):
        async def enter(self) -> None:
            app.consumer._revokes += 1  # type: ignore[attr-defined]
            self.log.append("enter")

    log: list[str] = []
    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", RevokingGate(log))
    stream = Stream(app)
    stream.channel.queue.put_nowait(Ev(Msg("in", 0, 0, 1), message(0)))
    body: list[Any] = []

    async def run() -> None:
        async for batch in decoded_batches(stream, consumer="c", max_batch=10, within_s=0.01):
            body.append(batch)

    with pytest.raises(BatchAbandoned):
        await asyncio.wait_for(asyncio.create_task(run()), 2)
    assert body == [] and log == ["enter", "leave"]

"""A worker frozen past its session timeout (SIGSTOP, a paused VM) wakes up while another
worker owns its partitions and has continued their hash chains from the topic. Under
at-least-once nothing fences its producer: it went on writing with its old chain heads
until its consumer noticed the rebalance, and `audit verify` reported the new owner's
hundreds of records as inserted (chaos worker_stop). Now it writes no chain record after
the freeze and restarts (`streams.processing.check_not_frozen`, `watch_freezes`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

import agentstream.streams.processing as processing
from agentstream.streams.audit_chain import ChainWriter
from agentstream.streams.processing import WorkerFroze, check_not_frozen


@pytest.fixture(autouse=True)
def _watched() -> Iterator[None]:
    """As in a worker, where `watch_freezes` ticks; put back afterwards (nothing watches
    in the other tests)."""
    saved = processing._LAST_TICK[0], processing._LAST_FREEZE[0]
    processing._LAST_TICK[0] = time.monotonic()
    processing._LAST_FREEZE[0] = 0.0
    yield
    processing._LAST_TICK[0], processing._LAST_FREEZE[0] = saved


def _freeze(seconds: float) -> None:
    """The loop's last tick `seconds` ago, as after a SIGSTOP that long."""
    processing._LAST_TICK[0] = time.monotonic() - seconds


async def test_after_a_freeze_no_chain_record_is_written() -> None:
    check_not_frozen()  # fine while the loop ticks
    _freeze(processing._freeze_limit() + 1)
    with pytest.raises(WorkerFroze):
        check_not_frozen()
    # and it stays so (the worker is crashing), for batches taken after the wake-up too
    with pytest.raises(WorkerFroze):
        check_not_frozen()
    # the chain writer refuses before it reads or writes any head
    with pytest.raises(WorkerFroze):
        async with ChainWriter("security.decisions").head(0):
            pass


async def test_a_short_stall_is_no_freeze() -> None:
    _freeze(processing._freeze_limit() / 2)  # a slow stretch: heartbeats still went out
    check_not_frozen()


async def test_nothing_counts_as_frozen_while_nothing_watches() -> None:
    processing._LAST_TICK[0] = None  # no worker: agents run in a test context
    check_not_frozen()


async def test_the_watchdog_fails_the_worker_after_a_freeze(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed: list[BaseException] = []
    monkeypatch.setattr(processing, "processing_failed", failed.append)
    monkeypatch.setattr(processing, "FREEZE_TICK_S", 0.01)
    watch = asyncio.create_task(processing.watch_freezes())
    await asyncio.sleep(0.05)
    assert not failed and not watch.done()  # ticking: nothing to say
    _freeze(processing._freeze_limit() + 1)
    await asyncio.wait_for(watch, 2)  # it ends after failing the worker
    assert [type(f) for f in failed] == [WorkerFroze]


async def test_a_batch_taken_before_a_rebalance_extends_no_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At-least-once does not wait for the batches in progress at a revoke: one still
    running (or an LLM call it started) went on writing chain records after the
    partition's new owner had read the head and continued the chain: a fork. Now a
    writer whose batch was taken before a rebalance refuses before it reads or writes a
    head (`check_not_rebalanced`), and a block that ends after a rebalance keeps no head."""
    from agentstream.streams import audit_chain
    from agentstream.streams.processing import BatchAbandoned

    class App:
        consumer_generation_id = 1
        consumer = type("Consumer", (), {"_revokes": 0})()

    app = App()

    async def trust(settings: object) -> dict[str, object]:
        return {}

    async def head_of(*args: object, **kwargs: object) -> str:
        return "h0"

    monkeypatch.setattr(audit_chain, "worker_trust", trust)
    monkeypatch.setattr(audit_chain, "last_hash", head_of)
    writer = ChainWriter("security.decisions")
    token = processing._TAKEN.set((None, app, 0, 1))
    try:
        async with writer.head(0) as head:  # taken in this generation: writes
            head.hash = "h1"
        assert writer._last[0] == "h1"
        async with writer.head(0) as head:
            app.consumer_generation_id = 2  # a rebalance while the block runs
            head.hash = "h2"
        assert 0 not in writer._last  # not kept: the next writer reads the topic
        with pytest.raises(BatchAbandoned):
            async with writer.head(0):
                pass
    finally:
        processing._TAKEN.reset(token)

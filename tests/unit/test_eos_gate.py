"""The exactly-once commit gate: commits only between batches, batches wait for commits."""

from __future__ import annotations

import asyncio

from agentstream.streams.eos import SOURCE, CommitGate, transactional_id_for


async def test_commit_waits_for_batches_in_progress_and_new_batches_wait_for_it() -> None:
    gate = CommitGate()
    await gate.enter()
    log: list[str] = []

    async def commit() -> None:
        async with gate.commit_window(5) as quiet:
            log.append(f"commit quiet={quiet}")
            await asyncio.sleep(0.01)
            log.append("commit done")

    async def next_batch() -> None:
        await gate.enter()
        log.append("batch 2")
        gate.leave()

    committing = asyncio.create_task(commit())
    await asyncio.sleep(0.01)
    assert gate.committing and log == []  # batch 1 still holds the gate
    second = asyncio.create_task(next_batch())
    await asyncio.sleep(0.01)
    assert log == []  # a waiting commit goes first
    gate.leave()  # batch 1 acked
    await asyncio.gather(committing, second)
    assert log == ["commit quiet=True", "commit done", "batch 2"]
    assert not gate.committing and gate.active == 0


async def test_commit_gives_up_after_wait_and_reopens_the_gate() -> None:
    gate = CommitGate()
    await gate.enter()
    async with gate.commit_window(0.02) as quiet:
        assert quiet is False
    assert not gate.committing
    await asyncio.wait_for(gate.enter(), 1)  # new batches are not blocked
    assert gate.active == 2


async def test_commit_with_no_batch_does_not_wait() -> None:
    gate = CommitGate()
    async with gate.commit_window(0) as quiet:
        assert quiet is True


def test_transactional_id_is_fausts_name_for_the_source_partition() -> None:
    # faust.transport.consumer.TransactionManager.commit: f"{group_id}-{group}-{partition}"
    assert transactional_id_for("app", 0, 3) == "app-0-3"
    assert SOURCE.get() is None

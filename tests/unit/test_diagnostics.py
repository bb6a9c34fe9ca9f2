"""The task dump follows each task's await chain down to what it waits for."""

from __future__ import annotations

import asyncio

from agentstream.streams.diagnostics import MARK, await_chain, dump_tasks


async def inner(fut: asyncio.Future[None]) -> None:
    await fut


async def outer(fut: asyncio.Future[None]) -> None:
    await inner(fut)


async def test_chain_goes_through_nested_coroutines_to_the_future() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(outer(fut), name="stuck-one")
    await asyncio.sleep(0)  # let it run up to its await
    try:
        chain = await_chain(task)
        assert [c.rsplit(" in ", 1)[-1] for c in chain[:2]] == ["outer", "inner"]
        assert chain[-1].startswith("awaiting <Future pending")
        dump = dump_tasks()
        assert dump.startswith(MARK) and dump.endswith(f"end of {MARK}")
        assert "TASK stuck-one" in dump and "test_diagnostics.py" in dump
    finally:
        fut.set_result(None)
        await task


class Wrapper:
    """An awaitable object: its `__await__` iterator hides the coroutine it runs."""

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut

    def __await__(self):  # type: ignore[no-untyped-def]
        return outer(self.fut).__await__()


async def ticks(fut: asyncio.Future[None]):  # type: ignore[no-untyped-def]
    await Wrapper(fut)
    yield 1


async def agent_like(fut: asyncio.Future[None]) -> None:
    async for _ in ticks(fut):
        pass


async def test_chain_goes_through_async_for_and_await_of_an_object() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(agent_like(fut))
    await asyncio.sleep(0)
    try:
        names = [c.rsplit(" in ", 1)[-1] for c in await_chain(task)[:-1]]
        assert names == ["agent_like", "ticks", "outer", "inner"]
    finally:
        fut.set_result(None)
        await task

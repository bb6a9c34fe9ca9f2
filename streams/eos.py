"""What exactly-once needs beyond Faust's transactions (processing_guarantee=exactly_once).

Faust 0.15.3 commits the consumed offsets of a source partition in the transaction of
`{app id}-{topic group}-{partition}`, but (1) puts an output into the transaction of the
*destination* topic's partition — none at all for a topic the worker does not consume,
so such outputs are not transactional — and (2) commits on a timer, in the middle of a
batch: the transaction then holds outputs of events not yet acknowledged, whose offsets
it does not commit, and after a crash they are processed and produced a second time.

So, under exactly-once only:

* `SOURCE` holds the input record (topic, partition) being processed; `emit` puts an
  output into that partition's transaction (`transactional_id_for`).
* `GATE` lets the consumer commit only between batches: a batch holds it from before its
  first output until its events are acknowledged, and a commit waits until no batch
  holds it while new batches wait for the commit to finish.
* Table changelog records are handed to the producer before the batch that wrote them
  leaves the gate, and before a commit (`streams.tables.writer.flush_pending`): Faust's
  own buffer flush can return with a record still on its way, which then lands in the
  next transaction, after its input's offset was committed.

Neither is used in at-least-once mode, which keeps its per-event cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from agentstream.streams.tables.writer import flush_pending

#: the (topic, partition) of the input whose outputs are being produced
SOURCE: ContextVar[tuple[str, int] | None] = ContextVar("agentstream_source", default=None)


def transactional_id_for(app_id: str, group: int, partition: int) -> str:
    """Faust's name for the transaction that commits offsets of `partition` of a topic
    in topic group `group` (`TransactionManager.commit`)."""
    return f"{app_id}-{group}-{partition}"


class CommitGate:
    """Batches in progress vs. offset commits: many batches at a time, or one commit.

    A waiting commit has priority (new batches wait), so that busy agents cannot starve
    it. `enter` may wait; `leave` never does, so a batch can leave right before its events
    are acknowledged with no other task running in between.
    """

    def __init__(self) -> None:
        self.active = 0
        self._open: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._commit_lock: asyncio.Lock | None = None

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._open is None or self._idle is None:
            self._open, self._idle = asyncio.Event(), asyncio.Event()
            self._open.set()
            if self.active == 0:
                self._idle.set()
        return self._open, self._idle

    @property
    def committing(self) -> bool:
        return self._open is not None and not self._open.is_set()

    async def enter(self) -> None:
        opened, idle = self._events()
        while not opened.is_set():
            await opened.wait()
        self.active += 1
        idle.clear()

    def leave(self) -> None:
        _, idle = self._events()
        self.active -= 1
        if self.active <= 0:
            self.active = 0
            idle.set()

    @asynccontextmanager
    async def commit_window(self, wait_s: float) -> AsyncIterator[bool]:
        """Close the gate to new batches and wait (at most `wait_s` s) for the batches in
        progress to finish; yields whether they did. New batches wait until the block
        ends, whatever happens in it."""
        if self._commit_lock is None:
            self._commit_lock = asyncio.Lock()
        async with self._commit_lock:
            opened, idle = self._events()
            opened.clear()
            try:
                try:
                    if not idle.is_set():
                        await asyncio.wait_for(idle.wait(), wait_s)
                except TimeoutError:
                    yield False
                else:
                    # table updates made outside any batch (tasks, timers) join the
                    # transactions this commit ends (streams.tables.writer)
                    await flush_pending()
                    yield True
            finally:
                opened.set()


GATE = CommitGate()

"""Publishing one request's streamed deltas as `llm.chunk` events, cheaply.

A chunk is the hottest path of the call_llm stage (one per delta, ~10 per request), so:

* `ChunkCoalescer` merges deltas that arrive within a short window
  (`AGENTSTREAM_LLM_CHUNK_COALESCE_MS`) of the last chunk sent into one event: the first
  delta goes out at once (time to first token is what a user sees), later ones wait at
  most the window. Order, contiguous sequence numbers (0, 1, 2 …) and the text are
  unchanged: the concatenated deltas of the events equal the concatenated provider
  deltas. Under load (many streams on one event loop) deltas of one request bunch up,
  and one event instead of several saves a record build, a producer send and its
  broker work per merged delta.
* `chunk_record` writes the event's wire bytes straight from its fields: the inputs are
  already valid (a decoded request, a provider's delta), so building and re-validating
  two pydantic models per delta (`LLMStreamChunk`, `Event`) buys nothing. The bytes are
  what `schemas.encode(Event.of(LLMStreamChunk(...)))` produces (tested).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import uuid4

import orjson

from agentstream.schemas.llm import LLMStreamChunk, ToolCallDelta

log = logging.getLogger(__name__)

#: (sequence, delta, provider, attempt, tool-call pieces) → the event is on its way to
#: the producer
Publish = Callable[[int, str, str, int, list[ToolCallDelta]], Awaitable[None]]

_CHUNK_TYPE = LLMStreamChunk.TYPE
_CHUNK_VERSION = LLMStreamChunk.VERSION


def chunk_record(
    *,
    request_id: str,
    sequence: int,
    delta: str,
    provider: str,
    attempt: int,
    source: str,
    correlation_id: str,
    causation_id: str,
    tool_calls: list[ToolCallDelta] | None = None,
) -> bytes:
    """Wire bytes of an `llm.chunk` event caused by the request event `causation_id`."""
    return orjson.dumps(
        {
            "event_id": uuid4(),
            "type": _CHUNK_TYPE,
            "schema_version": _CHUNK_VERSION,
            "occurred_at": datetime.now(UTC),
            "source": source,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "payload": {
                "request_id": request_id,
                "sequence": sequence,
                "delta": delta,
                "provider": provider,
                "attempt": attempt,
                "tool_calls": [
                    {"index": t.index, "id": t.id, "name": t.name, "arguments": t.arguments}
                    for t in tool_calls or ()
                ],
            },
        },
        option=orjson.OPT_UTC_Z,
    )


class ChunkCoalescer:
    """One request's deltas → chunk events, in order; see the module docstring.

    `add` is called by the task reading the provider's stream; a timer flushes what waits
    when no further delta comes; `flush` (end of the call) sends the rest before the final
    response. A lock keeps sends in sequence order even if a producer send suspends.
    """

    def __init__(
        self,
        publish: Publish,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self.window_s = max(0.0, window_s)
        self._clock = clock
        #: events published so far (= the next sequence number)
        self.published = 0
        self._parts: list[str] = []
        self._tools: list[ToolCallDelta] = []
        self._provider = ""
        self._attempt = 0
        self._last_sent = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Deltas waiting to be sent."""
        return len(self._parts)

    async def add(
        self,
        delta: str,
        provider: str,
        attempt: int,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> None:
        if self._parts and (provider != self._provider or attempt != self._attempt):
            await self.flush()  # one event never mixes attempts
        self._parts.append(delta)
        if tool_calls:
            self._merge(tool_calls)
        self._provider, self._attempt = provider, attempt
        wait = self._last_sent + self.window_s - self._clock()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    async def flush(self) -> None:
        """Send what is waiting now (as one event)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            if not self._parts:
                return
            parts, self._parts = self._parts, []
            tools, self._tools = self._tools, []
            sequence = self.published
            self.published += 1
            self._last_sent = self._clock()
            delta = parts[0] if len(parts) == 1 else "".join(parts)
            await self._publish(sequence, delta, self._provider, self._attempt, tools)

    def _merge(self, pieces: list[ToolCallDelta]) -> None:
        """Append tool-call pieces; a fragment continuing the call of the piece before it
        joins it (the concatenated arguments per call are unchanged), so a burst of
        argument fragments is one piece, not one per provider event."""
        tools = self._tools
        for piece in pieces:
            last = tools[-1] if tools else None
            if last is not None and last.index == piece.index and not piece.id and not piece.name:
                tools[-1] = ToolCallDelta.model_construct(
                    index=last.index,
                    id=last.id,
                    name=last.name,
                    arguments=last.arguments + piece.arguments,
                )
            else:
                tools.append(piece)

    def discard(self) -> None:
        """The call ends without a response (worker stopping, partition revoked)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timed is not None:
            self._timed.cancel()
        self._parts.clear()
        self._tools.clear()

    def _on_timer(self) -> None:
        self._timer = None
        if self._parts and self._timed is None:
            self._timed = asyncio.create_task(self._timed_flush())

    async def _timed_flush(self) -> None:
        try:
            await self.flush()
        except Exception:  # the final flush or the response will still be attempted
            log.exception("publishing a coalesced llm chunk failed")
        finally:
            self._timed = None

"""Chunk events: coalescing deltas in order, and wire bytes equal to the model path."""

from __future__ import annotations

import asyncio
import json

from agentstream.agents.llm.chunks import ChunkCoalescer, chunk_record
from agentstream.schemas import Event, encode, registry
from agentstream.schemas.llm import (
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMStreamChunk,
    ToolCallDelta,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder() -> tuple[list[tuple[int, str, str, int]], object]:
    sent, _tools, publish = recorder_with_tools()
    return sent, publish


def recorder_with_tools() -> tuple[
    list[tuple[int, str, str, int]], list[list[ToolCallDelta]], object
]:
    sent: list[tuple[int, str, str, int]] = []
    tools: list[list[ToolCallDelta]] = []

    async def publish(
        seq: int, delta: str, provider: str, attempt: int, tool_calls: list[ToolCallDelta]
    ) -> None:
        sent.append((seq, delta, provider, attempt))
        tools.append(tool_calls)

    return sent, tools, publish


def piece(index: int, args: str = "", id_: str = "", name: str = "") -> ToolCallDelta:
    return ToolCallDelta(index=index, id=id_, name=name, arguments=args)


async def test_tool_call_pieces_merged_per_call_in_order() -> None:
    sent, tools, publish = recorder_with_tools()
    clock = Clock()
    c = ChunkCoalescer(publish, 0.005, clock=clock)  # type: ignore[arg-type]
    await c.add("", "p", 1, [piece(0, "", "c0", "f")])  # first: at once
    await c.add("", "p", 1, [piece(0, '{"a"')])
    await c.add("", "p", 1, [piece(0, ": 1")])
    await c.add("", "p", 1, [piece(1, "", "c1", "g"), piece(0, "}")])
    await c.add("", "p", 1, [piece(1, "{}")])
    await c.flush()
    # only a fragment directly after a piece of the same call joins it: the order of
    # pieces across calls is kept
    assert tools[1] == [
        piece(0, '{"a": 1'),
        piece(1, "", "c1", "g"),
        piece(0, "}"),
        piece(1, "{}"),
    ]
    assert [s[0] for s in sent] == [0, 1]


def test_chunk_record_with_tool_calls_equals_the_model_path() -> None:
    pieces = [piece(0, '{"x', "call_1", "get_weather"), piece(1, "", "call_2", "g")]
    raw = chunk_record(
        request_id="r-1",
        sequence=0,
        delta="",
        provider="p",
        attempt=1,
        source="s",
        correlation_id="c",
        causation_id="k",
        tool_calls=pieces,
    )
    ev = registry.decode(raw)
    assert ev.schema_version == 2 and ev.payload.tool_calls == pieces
    model = Event.of(
        LLMStreamChunk(request_id="r-1", sequence=0, delta="", provider="p", tool_calls=pieces),
        source="s",
    )
    aligned = model.model_copy(
        update={
            "event_id": ev.event_id,
            "occurred_at": ev.occurred_at,
            "correlation_id": "c",
            "causation_id": "k",
        }
    )
    assert encode(aligned) == raw


def test_v1_chunks_read_as_v2() -> None:
    v1 = {
        "type": "llm.chunk",
        "schema_version": 1,
        "source": "old",
        "payload": {"request_id": "r", "sequence": 0, "delta": "hi", "provider": "p"},
    }
    ev = registry.decode(json.dumps(v1).encode())
    assert ev.schema_version == 2 and ev.payload.delta == "hi" and ev.payload.tool_calls == []


async def test_first_delta_at_once_then_merged_within_the_window() -> None:
    sent, publish = recorder()
    clock = Clock()
    c = ChunkCoalescer(publish, 0.005, clock=clock)  # type: ignore[arg-type]
    await c.add("a", "p", 1)
    assert sent == [(0, "a", "p", 1)]  # time to first token unchanged
    clock.now += 0.001
    await c.add("b", "p", 1)
    await c.add("c", "p", 1)
    assert sent == [(0, "a", "p", 1)] and c.pending == 2
    clock.now += 0.01  # window passed: the next delta goes out with the waiting ones
    await c.add("d", "p", 1)
    assert sent[-1] == (1, "bcd", "p", 1) and c.pending == 0
    clock.now += 0.001
    await c.add("e", "p", 1)
    await c.flush()  # end of the call
    assert sent == [(0, "a", "p", 1), (1, "bcd", "p", 1), (2, "e", "p", 1)]
    assert c.published == 3


async def test_waiting_deltas_go_out_on_the_timer() -> None:
    sent, publish = recorder()
    c = ChunkCoalescer(publish, 0.02)  # type: ignore[arg-type]
    await c.add("x", "p", 1)
    await c.add("y", "p", 1)
    await c.add("z", "p", 1)
    assert [s[1] for s in sent] == ["x"]
    async with asyncio.timeout(2):
        while len(sent) < 2:
            await asyncio.sleep(0.005)
    assert sent[1] == (1, "yz", "p", 1)


async def test_attempts_never_mixed_and_zero_window_sends_every_delta() -> None:
    sent, publish = recorder()
    clock = Clock()
    c = ChunkCoalescer(publish, 1.0, clock=clock)  # type: ignore[arg-type]
    await c.add("a", "p", 1)
    await c.add("b", "p", 1)
    await c.add("c", "p", 2)  # retry: what waited belongs to attempt 1
    await c.flush()
    assert sent == [(0, "a", "p", 1), (1, "b", "p", 1), (2, "c", "p", 2)]

    sent0, publish0 = recorder()
    c0 = ChunkCoalescer(publish0, 0.0)  # type: ignore[arg-type]
    for d in "abc":
        await c0.add(d, "p", 1)
    assert [s[:2] for s in sent0] == [(0, "a"), (1, "b"), (2, "c")]


async def test_discard_drops_the_timer() -> None:
    sent, publish = recorder()
    c = ChunkCoalescer(publish, 0.01)  # type: ignore[arg-type]
    await c.add("a", "p", 1)
    await c.add("b", "p", 1)
    c.discard()
    await asyncio.sleep(0.03)
    assert [s[1] for s in sent] == ["a"]


def test_chunk_record_equals_the_model_path() -> None:
    request = Event.of(
        LLMRequest(
            request_id="r-1",
            agent_id="a",
            context=LLMContext(messages=[ChatMessage(role="user", content="hi")]),
            config=LLMConfig(model="m"),
        ),
        source="test",
    )
    raw = chunk_record(
        request_id="r-1",
        sequence=3,
        delta='d "quoted" ünï',
        provider="p",
        attempt=2,
        source="call_llm@w",
        correlation_id=request.correlation_id,
        causation_id=str(request.event_id),
    )
    fast = registry.decode(raw)
    model = request.caused(
        LLMStreamChunk(
            request_id="r-1", sequence=3, delta='d "quoted" ünï', provider="p", attempt=2
        ),
        source="call_llm@w",
    )
    assert fast.payload == model.payload
    assert fast.type == model.type and fast.schema_version == model.schema_version
    assert fast.correlation_id == model.correlation_id
    assert fast.causation_id == model.causation_id and fast.source == model.source
    # same wire shape: identical bytes once the per-event id and time are aligned
    aligned = model.model_copy(update={"event_id": fast.event_id, "occurred_at": fast.occurred_at})
    assert encode(aligned) == raw

"""`decoded_batches` under exactly-once: a batch's `prepare` (keychain lookups) runs before
the batch takes the commit gate, and its dead letters are sent inside it."""

from __future__ import annotations

from typing import Any

import pytest

import agentstream.streams.processing as processing
from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.processing import Inbound, decoded_batches
from tests.unit.test_event_batches import App, Ev, Msg, Stream


class Gate:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def enter(self) -> None:
        self.log.append("enter")

    def leave(self) -> None:
        self.log.append("leave")


def message(n: int) -> bytes:
    return encode(
        Event.of(
            AgentMessage(message_id=f"m{n}", sender_id="a", recipient_id="b", content="hi"),
            source="test",
        )
    )


async def test_prepare_runs_before_the_gate_and_dead_letters_inside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log: list[str] = []

    async def dead_letter(msg: Any, exc: Exception, consumer: str) -> None:
        log.append(f"dead:{msg.offset}")

    async def prepare(batch: list[Inbound]) -> None:
        log.append(f"prepare:{len(batch)}")

    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", Gate(log))
    monkeypatch.setattr(processing, "dead_letter", dead_letter)
    stream = Stream(App())
    for offset, value in enumerate([message(0), b"{not json", message(2)]):
        stream.channel.queue.put_nowait(Ev(Msg("in", 0, offset, 1), value))

    async for batch in decoded_batches(
        stream, consumer="c", prepare=prepare, max_batch=10, within_s=0.01
    ):
        log.append(f"body:{[i.message.offset for i in batch]}")
        stream.should_stop = True
    assert log == ["prepare:2", "enter", "dead:1", "body:[0, 2]", "leave"]


async def test_a_failing_prepare_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []

    async def dead_letter(msg: Any, exc: Exception, consumer: str) -> None:
        log.append(f"dead:{msg.offset}")

    async def prepare(batch: list[Inbound]) -> None:
        raise RuntimeError("keychain unreachable")

    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", Gate(log))
    monkeypatch.setattr(processing, "dead_letter", dead_letter)
    stream = Stream(App())
    for offset, value in enumerate([b"[]", message(1)]):
        stream.channel.queue.put_nowait(Ev(Msg("in", 0, offset, 1), value))
    async for batch in decoded_batches(
        stream, consumer="c", prepare=prepare, max_batch=10, within_s=0.01
    ):
        log.append(f"body:{[i.message.offset for i in batch]}")
        stream.should_stop = True
    assert log == ["enter", "dead:0", "body:[1]", "leave"]

"""Exactly-once: a record sent with no input being processed (a timer's, e.g. the
heartbeat monitor's status transitions) goes out in no transaction. Faust's own path put
it into the destination partition's transaction, which commits only when that partition
has newly acked input: for a quiet partition never, and the broker aborted it at the
transaction timeout."""

from __future__ import annotations

from typing import Any

import pytest

from agentstream.streams import processing
from agentstream.streams.eos import SOURCE


class Driver:
    """Faust's aiokafka driver producer: `transactional_id` picks a transaction."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None]] = []
        self._transaction_producers = {"app-0-1": object()}

    async def send(self, topic: str, *args: Any, transactional_id: str | None = None) -> Any:
        self.sent.append((topic, transactional_id))
        return None


class Manager:
    """Faust's TransactionManager: its own `send` picks the destination's transaction."""

    def __init__(self) -> None:
        self.producer = Driver()

    async def send(self, topic: str, key: Any, value: Any, partition: Any, *a: Any) -> Any:
        self.producer.sent.append((topic, "app-0-<destination partition>"))
        return None


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Manager:
    m = Manager()

    async def producer() -> Manager:
        return m

    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "_producer", producer)
    return m


async def test_a_timer_record_goes_out_in_no_transaction(manager: Manager) -> None:
    assert SOURCE.get() is None
    await processing.send_record("ns.agent.status", b"b", b"{}")
    assert manager.producer.sent == [("ns.agent.status", None)]


async def test_an_inputs_record_goes_into_its_inputs_transaction(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processing, "_source_transaction", lambda *a, **k: "app-0-1")
    token = SOURCE.set(("ns.agent.heartbeats", 1))
    try:
        await processing.send_record("ns.agent.status", b"b", b"{}")
    finally:
        SOURCE.reset(token)
    assert manager.producer.sent == [("ns.agent.status", "app-0-1")]

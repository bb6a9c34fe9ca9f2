"""Exactly-once: a revoke whose wait for the batches in progress ran out ends the open
transactions uncommitted; the in-memory tables then forget what they hold, so the
rebalance's recovery (which re-reads every assigned changelog partition from its start)
brings back only what the changelogs committed. Kept, a key only the aborted batches
created (an LLM request's dedup entry) outlived its aborted response."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.stores.memory import Store
from faust.tables.recovery import Recovery
from faust.types import TP

from agentstream.streams import delivery, eos
from agentstream.streams.delivery import BatchDeliveryConsumer


class Producer:
    def __init__(self) -> None:
        self._transaction_producers = {"app-0-0": object(), "app-0-1": object()}
        self.stopped: list[str] = []
        self.buffer = self

    async def stop_transaction(self, tid: str) -> None:
        self.stopped.append(tid)

    async def flush(self) -> None:
        return None


class Table:
    def __init__(self, data: Any) -> None:
        self.data = data

    def persisted_offset(self, tp: TP) -> int | None:
        return None  # a memory store's


def faust_recovery(table: Any, tp: TP) -> Recovery:
    """Faust's own Recovery with just what `on_rebalance` reads, `tp` read to offset 41
    by the last recovery (the changelog's end then)."""
    r = Recovery.__new__(Recovery)
    r.active_offsets, r.standby_offsets = Counter(), Counter()
    r.active_highwaters, r.standby_highwaters = Counter(), Counter()
    r.active_tps, r.standby_tps = set(), set()
    r.actives_for_table, r.standbys_for_table = defaultdict(set), defaultdict(set)
    r.tp_to_table = {}
    r._signal_recovery_start = None
    r.app = SimpleNamespace(
        consumer_generation_id=2,
        assignor=SimpleNamespace(assigned_standbys=set, assigned_actives=lambda: {tp}),
        tracer=None,
        _rebalancing_span=None,
    )
    r.tables = SimpleNamespace(_changelogs={tp.topic: table})
    r.active_offsets[tp] = 41
    return r


class Tables(dict[str, Any]):
    recovery: Any


class Faust:
    """What Faust's consumer gives `_finish_batches_before_revoke` (its super)."""

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        self.commits += 1  # type: ignore[attr-defined]
        return True


class Consumer(BatchDeliveryConsumer, Faust):
    def __init__(self) -> None:
        self.log = logging.getLogger("test.revoke")
        self._revokes = 0
        self.commits = 0
        producer = Producer()
        self.transactions = type("Transactions", (), {"producer": producer})()
        memory = Store.__new__(Store)  # Faust's memory store without an app
        memory.data = {"llm-request-1": "answered", "agent-a": 3}
        memory._key_partition = {"llm-request-1": 0, "agent-a": 1}
        self.memory = memory
        self.other = Table({"kept": 1})  # not a memory store: a store that persists
        tables = Tables(t=Table(memory), o=self.other)
        self.tp = TP("app-t-changelog", 0)
        tables.recovery = self.recovery = faust_recovery(tables["t"], self.tp)
        self.app = type("App", (), {"producer": producer, "tables": tables})()

    def _delivery_failed(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def gate(monkeypatch: pytest.MonkeyPatch) -> eos.CommitGate:
    monkeypatch.setattr(delivery, "EOS_COMMIT_WAIT_S", 0.05)
    gate = eos.CommitGate()
    monkeypatch.setattr(eos, "GATE", gate)
    return gate


async def test_a_revoke_whose_wait_ran_out_empties_the_in_memory_tables(
    gate: eos.CommitGate,
) -> None:
    await gate.enter()  # a batch in progress past the wait
    consumer = Consumer()
    await consumer._finish_batches_before_revoke()
    assert consumer.transactions.producer.stopped == ["app-0-0", "app-0-1"]
    assert consumer.commits == 0 and consumer._revokes == 1
    assert consumer.memory.data == {} and consumer.memory._key_partition == {}
    assert consumer.other.data == {"kept": 1}
    # the assignment that follows keeps the partition: Faust's recovery of it must start
    # at the beginning, or every key written before offset 41 would be gone for good
    recovery = consumer.recovery
    await Recovery.on_rebalance(
        recovery, assigned={consumer.tp}, revoked=set(), newly_assigned=set(), generation_id=2
    )
    assert recovery.active_offsets[consumer.tp] is None


async def test_a_quiet_revoke_commits_and_keeps_the_tables() -> None:
    consumer = Consumer()
    await consumer._finish_batches_before_revoke()
    assert consumer.commits == 1 and consumer._revokes == 1
    assert consumer.transactions.producer.stopped == []
    assert consumer.memory.data == {"llm-request-1": "answered", "agent-a": 3}
    assert consumer.recovery.active_offsets[consumer.tp] == 41

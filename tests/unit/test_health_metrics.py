"""What agents.health exports to Prometheus, without a broker: the consumer-lag gauge
holds only the partitions the worker holds now, and every evaluation of /ready's
components sets the readiness gauge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition as TP
from prometheus_client import REGISTRY

import agentstream.agents.health.views as views
from agentstream.agents.health.status import Component, HealthTracker
from agentstream.streams.observability import CONSUMER_LAG, READY_COMPONENT

TOPICS = ("test.lag.a", "test.lag.b")


class Consumer:
    """The members of Faust's consumer that consumer_lags() reads."""

    def __init__(self) -> None:
        self.assigned: set[TP] | None = set()
        self.high: dict[TP, int] = {}
        self._committed_offset: dict[TP, int | None] = {}

    def assignment(self) -> set[TP]:
        if self.assigned is None:
            raise RuntimeError("consumer not started")
        return set(self.assigned)

    def highwater(self, tp: TP) -> int | None:
        return self.high.get(tp)


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Consumer]:
    fake = Consumer()
    monkeypatch.setattr(views, "app", SimpleNamespace(consumer=fake))
    monkeypatch.setattr(views, "_catalogue_topics", set(TOPICS))
    monkeypatch.setattr(views, "_lag_series", set(), raising=False)
    yield fake
    for topic in TOPICS:  # whatever a failing test left in the process-wide registry
        for partition in range(3):
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(topic, str(partition))


def lag(topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "agentstream_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


def test_lag_series_are_the_partitions_held_now(consumer: Consumer) -> None:
    a0, a1, b0 = TP("test.lag.a", 0), TP("test.lag.a", 1), TP("test.lag.b", 0)
    other = TP("not.a.catalogue.topic", 0)
    consumer.assigned = {a0, a1, b0, other}
    consumer.high = {a0: 100, a1: 50, b0: 10, other: 7}
    consumer._committed_offset = {a0: 40, a1: None, b0: 10}
    got = views.consumer_lags()
    assert got == {"test.lag.a:0": 60, "test.lag.a:1": 50, "test.lag.b:0": 0}
    assert (lag("test.lag.a", 0), lag("test.lag.a", 1), lag("test.lag.b", 0)) == (60, 50, 0)
    assert lag("not.a.catalogue.topic", 0) is None

    # a rebalance moves a0 and b0 to another worker: their series go, they do not keep
    # reporting 60 and 0 from here while the new owner reports the real lag
    consumer.assigned = {a1}
    consumer._committed_offset[a1] = 20
    assert views.consumer_lags() == {"test.lag.a:1": 30}
    assert lag("test.lag.a", 1) == 30
    assert lag("test.lag.a", 0) is None and lag("test.lag.b", 0) is None

    # a0 comes back, its end offset not fetched yet: no number is better than an old one
    consumer.assigned = {a0, a1}
    consumer.high.pop(a0)
    assert views.consumer_lags() == {"test.lag.a:1": 30}
    assert lag("test.lag.a", 0) is None

    # the consumer stops (worker shutting down): nothing is assigned, nothing reported
    consumer.assigned = None
    assert views.consumer_lags() == {}
    assert lag("test.lag.a", 1) is None


def ready(component: str) -> float | None:
    return REGISTRY.get_sample_value("agentstream_ready_component", {"component": component})


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Component]]:
    """The components evaluate() finds (set by the test), without a broker or Faust: the
    health changes it would publish are collected instead."""
    found: list[Component] = []

    async def components() -> list[Component]:
        return list(found)

    async def emit(topic: str, event: object) -> None:
        return None

    monkeypatch.setattr(views, "components", components)
    monkeypatch.setattr(views, "emit", emit)
    monkeypatch.setattr(views, "tracker", HealthTracker("test-worker"))
    monkeypatch.setattr(views, "_ready_series", set(), raising=False)
    yield found
    for name in ("test.broker", "test.tables", "test.provider"):
        with contextlib.suppress(KeyError):
            READY_COMPONENT.remove(name)


async def test_each_evaluation_sets_the_readiness_gauge(evaluated: list[Component]) -> None:
    evaluated += [
        Component("test.broker", "ok", "reachable"),
        Component("test.tables", "down", "rebalancing"),
        Component("test.provider", "degraded", "slow"),
    ]
    status, _ = await views.evaluate()
    assert status == "down"
    # the values the alert rules compare with: 2 is what makes /ready answer 503
    assert (ready("test.broker"), ready("test.provider"), ready("test.tables")) == (0, 1, 2)

    # the next evaluation (the timer's, or a /ready request) overwrites them; a component
    # no longer evaluated loses its series rather than keep saying "down"
    evaluated[:] = [
        Component("test.broker", "down", "refused"),
        Component("test.tables", "ok", "3 table(s) recovered"),
    ]
    status, _ = await views.evaluate()
    assert status == "down"
    assert (ready("test.broker"), ready("test.tables")) == (2, 0)
    assert ready("test.provider") is None


async def test_ready_requests_share_one_evaluation(
    evaluated: list[Component], monkeypatch: pytest.MonkeyPatch
) -> None:
    # /ready needs no token; each evaluation connects to every broker and may call an
    # LLM provider: a flood of requests made one evaluation each
    import asyncio

    runs: list[int] = []

    async def components() -> list[Component]:
        runs.append(1)
        await asyncio.sleep(0.05)
        return [Component("test.broker", "ok", "reachable")]

    monkeypatch.setattr(views, "components", components)
    monkeypatch.setattr(views, "_ready", {"at": float("-inf"), "answer": None, "running": None})
    answers = await asyncio.gather(*(views.evaluate_shared() for _ in range(50)))
    assert len(runs) == 1 and {a[0] for a in answers} == {"ok"}
    await views.evaluate_shared()  # within READY_REUSE_S: the same answer
    assert len(runs) == 1
    monkeypatch.setattr(views, "READY_REUSE_S", 0.0)
    await views.evaluate_shared()
    assert len(runs) == 2

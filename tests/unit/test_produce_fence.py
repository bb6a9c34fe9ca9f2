"""A worker whose event loop stood still past the session timeout sends nothing more
(`streams.delivery.install_produce_fence`): not even the record batches it handed to the
producer before it stopped. Under at-least-once nothing else fences a zombie, and those
batches, sent on waking after the partition's new owner continued its hash chain, forked
the chain (`audit verify`: inserted; chaos worker_stop, at-least-once)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.producer.sender import SendProduceReqHandler

from agentstream.streams import processing
from agentstream.streams.delivery import install_produce_fence


class Batch:
    def __init__(self) -> None:
        self.failed: BaseException | None = None

    def failure(self, exception: BaseException) -> None:
        self.failed = exception


class Client:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, node_id: int, request: Any) -> Any:
        self.sent.append((node_id, request))
        raise RuntimeError("stop here: the request went out")  # not a KafkaError


class Txn:
    def __init__(self, transactional_id: str | None) -> None:
        self.transactional_id = transactional_id


class Sender:
    def __init__(self, transactional_id: str | None = None) -> None:
        self.client = Client()
        self._retry_backoff = 0.1
        self._txn_manager = Txn(transactional_id) if transactional_id else None


@pytest.fixture
def freeze_state() -> Iterator[None]:
    saved = (processing._LAST_TICK[0], processing._LAST_FREEZE[0])
    yield
    processing._LAST_TICK[0], processing._LAST_FREEZE[0] = saved


def _handler(
    transactional_id: str | None = None,
) -> tuple[SendProduceReqHandler, Sender, dict[str, Batch]]:
    sender = Sender(transactional_id)
    batches = {"tp0": Batch(), "tp1": Batch()}
    handler = SendProduceReqHandler(sender, batches)
    handler.create_request = lambda: "produce-request"  # type: ignore[method-assign]
    return handler, sender, batches


async def test_after_a_freeze_no_produce_request_goes_out(
    freeze_state: None, caplog: pytest.LogCaptureFixture
) -> None:
    install_produce_fence()
    processing._LAST_FREEZE[0] = 0.0
    processing._LAST_TICK[0] = time.monotonic() - 10 * processing._freeze_limit()
    handler, sender, batches = _handler()
    await handler.do(1)
    assert sender.client.sent == []
    assert all(isinstance(b.failed, processing.WorkerFroze) for b in batches.values())
    assert "not sending 2 record batch(es) to broker 1" in caplog.text  # seen in the log


async def test_without_a_freeze_requests_go_out_as_before(freeze_state: None) -> None:
    install_produce_fence()
    processing._LAST_FREEZE[0] = 0.0
    processing._LAST_TICK[0] = time.monotonic()
    handler, sender, batches = _handler()
    with pytest.raises(RuntimeError, match="went out"):
        await handler.do(1)
    assert sender.client.sent == [(1, "produce-request")]
    assert all(b.failed is None for b in batches.values())


async def test_a_transactional_producer_is_left_to_its_transaction(freeze_state: None) -> None:
    # exactly-once: failing the batches would let a commit under way send the offsets
    # without their outputs; the successor's epoch fences the zombie instead
    install_produce_fence()
    processing._LAST_FREEZE[0] = 0.0
    processing._LAST_TICK[0] = time.monotonic() - 10 * processing._freeze_limit()
    handler, sender, batches = _handler("app-0-agent.messages-1")
    with pytest.raises(RuntimeError, match="went out"):
        await handler.do(1)
    assert sender.client.sent == [(1, "produce-request")]
    assert all(b.failed is None for b in batches.values())

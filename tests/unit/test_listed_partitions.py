"""`listed_partitions`: a metadata request no broker answered is an error, never "the topic
does not exist" — readers that fold a topic from its beginning (a worker's published
chain keys, the signed rule topics) took it for an empty topic."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agentstream.streams.client import listed_partitions
from agentstream.streams.errors import BrokerError


def consumer(answered: bool, listed: dict[str, set[int]]) -> Any:
    """aiokafka's consumer as these readers use it: `force_metadata_update` resolves to
    whether a broker answered, `partitions_for_topic` reads the metadata held."""

    def force_metadata_update() -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(answered)
        return done

    return SimpleNamespace(
        _client=SimpleNamespace(force_metadata_update=force_metadata_update),
        partitions_for_topic=lambda topic: listed.get(topic),
    )


async def test_no_metadata_answer_raises_instead_of_reading_as_no_topic() -> None:
    with pytest.raises(BrokerError, match="no broker answered"):
        await listed_partitions(consumer(False, {}), "security.worker_keys")
    # even a topic the last answer listed: its partitions are not known to be current
    with pytest.raises(BrokerError):
        await listed_partitions(consumer(False, {"keys": {0}}), "keys")


async def test_an_answered_request_lists_the_topic_or_says_it_is_not_there() -> None:
    assert await listed_partitions(consumer(True, {"keys": {0, 1}}), "keys") == {0, 1}
    assert await listed_partitions(consumer(True, {"keys": {0}}), "other") is None
    assert await listed_partitions(consumer(True, {"keys": set()}), "keys") is None

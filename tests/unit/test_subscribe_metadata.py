"""`unlisted_topics`: which subscribed topics a metadata answer does not list with their
partitions — what a worker waits for before it joins its group
(`streams.delivery.MetadataReadyConsumerThread`). Real aiokafka `ClusterMetadata`, updated
from real metadata responses."""

from __future__ import annotations

from aiokafka.cluster import ClusterMetadata
from aiokafka.protocol.metadata import MetadataResponse_v0

from agentstream.streams.delivery import (
    MetadataReadyConsumerThread,
    consumer_thread_class,
    unlisted_topics,
)

NO_ERROR = 0
LEADER_NOT_AVAILABLE = 5
UNKNOWN_TOPIC = 3


def cluster(*topics: tuple[int, str, list[tuple[int, int]]]) -> ClusterMetadata:
    """Metadata listing `topics`: (error code, name, [(partition, leader)])."""
    md = ClusterMetadata()
    md.update_metadata(
        MetadataResponse_v0(
            brokers=[(1, "127.0.0.1", 9092)],
            topics=[
                (err, name, [(NO_ERROR, p, leader, [1], [1]) for p, leader in parts])
                for err, name, parts in topics
            ],
        )
    )
    return md


def test_a_topic_listed_with_its_partitions_is_ready() -> None:
    md = cluster((NO_ERROR, "in", [(0, 1), (1, 1)]), (NO_ERROR, "log", [(0, 1)]))
    assert unlisted_topics(md, {"in", "log"}) == []


def test_a_topic_the_metadata_does_not_list_is_not_ready() -> None:
    # asked right after its creation, a broker may not list a topic at all
    md = cluster((NO_ERROR, "in", [(0, 1)]))
    assert unlisted_topics(md, {"in", "app-t-changelog", "a"}) == ["a", "app-t-changelog"]


def test_a_partition_without_a_leader_does_not_hold_the_join() -> None:
    # the assignment needs the partitions, not their leaders: a restart while a broker
    # is down must not wait for it
    md = cluster((NO_ERROR, "in", [(0, 1), (1, -1)]), (NO_ERROR, "out", [(0, -1)]))
    assert unlisted_topics(md, ["in", "out"]) == []


def test_a_topic_listed_with_an_error_is_not_ready() -> None:
    md = cluster((LEADER_NOT_AVAILABLE, "new", []), (UNKNOWN_TOPIC, "gone", []))
    assert unlisted_topics(md, {"new", "gone"}) == ["gone", "new"]


def test_the_worker_consumer_thread_waits_for_metadata_before_subscribing() -> None:
    cls = consumer_thread_class()
    faust_thread = next(c for c in cls.__mro__ if c.__name__ == "AIOKafkaConsumerThread")
    # ahead of Faust's own `subscribe` in the MRO: the wait comes first
    assert cls.__mro__.index(MetadataReadyConsumerThread) < cls.__mro__.index(faust_thread)

"""`streams.admin`: which topics a metadata answer refuses to describe — what ends a
worker's start at once when its principal may not read one of its topics (asked by name,
the broker says TOPIC_AUTHORIZATION_FAILED; in a listing of every topic it is just left
out, as a topic still being created is)."""

from __future__ import annotations

from aiokafka.protocol.metadata import MetadataResponse_v1

from agentstream.streams.admin import undescribable, undescribable_message

NO_ERROR, UNKNOWN_TOPIC, LEADER_NOT_AVAILABLE, TOPIC_AUTHORIZATION_FAILED = 0, 3, 5, 29


def described(*topics: tuple[int, str]) -> list[dict[str, object]]:
    """What `AIOKafkaAdminClient.describe_topics` returns for these (error code, name)."""
    answer = MetadataResponse_v1(
        brokers=[(1, "127.0.0.1", 9092, None)],
        controller_id=1,
        topics=[(err, name, False, []) for err, name in topics],
    )
    return list(answer.to_object()["topics"])


def test_only_the_topics_refused_to_us_are_undescribable() -> None:
    answer = described(
        (TOPIC_AUTHORIZATION_FAILED, "p.llm.requests"),
        (NO_ERROR, "p.agent.messages"),
        (LEADER_NOT_AVAILABLE, "p.just-created"),  # still being created: wait for it
        (UNKNOWN_TOPIC, "p.gone"),
        (TOPIC_AUTHORIZATION_FAILED, "p.comms.records"),
    )
    assert undescribable(answer) == ["p.comms.records", "p.llm.requests"]
    assert undescribable(described((NO_ERROR, "p.x"))) == []


def test_the_message_names_the_principal_the_topics_and_where_to_look() -> None:
    line = undescribable_message("User:worker", ["p.comms.records", "p.llm.requests"])
    assert "\n" not in line
    assert line.startswith("User:worker is not authorized to describe topic(s) ")
    assert "p.comms.records, p.llm.requests" in line
    assert "agentstream acls" in line and "docs/acls.md" in line

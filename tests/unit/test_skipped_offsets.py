"""`skipped_offsets`: which of a consumer group's committed offsets the log no longer
holds (retention or delete-records removed records the group had not read) — what a
worker warns about and counts at each seek to the committed offsets
(`streams.delivery.BatchDeliveryConsumer.seek_to_committed`)."""

from __future__ import annotations

from aiokafka import TopicPartition

from agentstream.streams.delivery import SkippedOffsets, skipped_offsets

A0, A1, B0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)


def test_a_committed_offset_below_the_log_start_is_a_gap_of_that_many_offsets() -> None:
    found = skipped_offsets({A0: 3, A1: 10, B0: 7}, {A0: 8, A1: 2, B0: 7}, {})
    assert found == [SkippedOffsets(A0, 3, 8)]
    assert found[0].count == 5


def test_at_or_above_the_log_start_nothing_was_lost() -> None:
    # retention removed only what the group had read (A1), or nothing yet (B0)
    assert skipped_offsets({A1: 10, B0: 0}, {A1: 10, B0: 0}, {}) == []


def test_a_partition_without_a_commit_starts_at_the_log_start_by_design() -> None:
    assert skipped_offsets({A0: None}, {A0: 500}, {}) == []


def test_a_gap_already_reported_is_not_reported_again() -> None:
    # Faust seeks to the committed offsets several times per assignment
    assert skipped_offsets({A0: 3}, {A0: 8}, {A0: 3}) == []
    # a new commit that fell behind again is a new loss
    assert skipped_offsets({A0: 12}, {A0: 20}, {A0: 3}) == [SkippedOffsets(A0, 12, 20)]


def test_gaps_come_sorted_by_topic_and_partition() -> None:
    found = skipped_offsets({B0: 1, A1: 1, A0: 1}, {B0: 2, A1: 2, A0: 2}, {})
    assert [s.tp for s in found] == [A0, A1, B0]


def test_a_partition_whose_log_start_is_unknown_is_left_out() -> None:
    assert skipped_offsets({A0: 3}, {}, {}) == []

"""aiokafka's transient metadata messages about a new topic stay out of the default log
level for a grace period (`streams.logging_setup.NewTopicNoise`); anything that persists
past it, and every other message, keeps its level."""

from __future__ import annotations

import ast
import inspect
import logging
import uuid
from collections.abc import Iterator
from types import ModuleType

import aiokafka.cluster
import aiokafka.consumer.fetcher
import aiokafka.consumer.group_coordinator
import aiokafka.producer.sender
import faust.assignor.partition_assignor
import pytest
from aiokafka import errors
from aiokafka.protocol.metadata import MetadataResponse_v0
from aiokafka.structs import TopicPartition

from agentstream.streams import logging_setup
from agentstream.streams.logging_setup import (
    NOISY_LOGGERS,
    OFFSETS_TOPIC,
    TRANSIENT_MESSAGES,
    NewTopicNoise,
    RecordContentFilter,
)

NOT_FOUND = "Topic %s not found in cluster metadata"
RETRYING = "Got error produce response on topic-partition %s, retrying. Error: %s"
LIST_OFFSETS = "Failed fetch offsets from %s: %s"
UNKNOWN_IN_LIST_OFFSETS = (
    "Received unknown topic or partition error in ListOffset request for partition %s. "
    "The topic/partition may not exist or the user may not have Describe access to it."
)
NO_COORDINATOR = "Group Coordinator Request failed: %s"
MISSING = "Ignoring missing topic: %r"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.levelname} {r.getMessage()}" for r in self.records]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """A handler on the root logger at INFO (the default level of a worker and the CLI),
    with aiokafka's loggers propagating to it."""
    root = logging.getLogger()
    handler = Capture()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, args, None)


def test_a_new_topics_messages_are_debug_for_the_grace_then_at_their_level() -> None:
    clock = Clock()
    noise = NewTopicNoise(grace_s=30, clock=clock)
    first = record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.new")
    assert noise.filter(first) is False  # DEBUG is not enabled: dropped
    assert first.levelno == logging.DEBUG and first.levelname == "DEBUG"

    clock.now += 29.9
    assert noise.filter(record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.new")) is False

    clock.now += 0.1  # still missing after the grace: a real problem, shown as aiokafka says
    late = record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.new")
    assert noise.filter(late) is True
    assert late.levelno == logging.ERROR and late.levelname == "ERROR"


def test_the_grace_is_counted_per_topic() -> None:
    clock = Clock()
    noise = NewTopicNoise(grace_s=30, clock=clock)
    assert not noise.filter(record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.a"))
    clock.now += 40
    # t.a's grace is over; t.b appears only now and gets its own
    assert noise.filter(record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.a"))
    assert not noise.filter(record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.b"))


@pytest.mark.parametrize(
    "error",
    [
        errors.NotLeaderForPartitionError,
        errors.LeaderNotAvailableError,
        errors.UnknownTopicOrPartitionError,
        errors.NotLeaderForPartitionError(),
    ],
)
def test_produce_retries_on_a_leader_error_are_demoted(error: object) -> None:
    noise = NewTopicNoise(grace_s=30, clock=Clock())
    tp = TopicPartition("t.out", 3)
    r = record("aiokafka.producer.sender", logging.WARNING, RETRYING, tp, error)
    assert noise.filter(r) is False


@pytest.mark.parametrize(
    ("name", "level", "msg", "args", "topic"),
    [
        # the demo's first lines: its consumer's first ListOffsets on a new topic
        (
            "aiokafka.consumer.fetcher",
            logging.ERROR,
            LIST_OFFSETS,
            (1, errors.NotLeaderForPartitionError(TopicPartition("t.dl", 1))),
            "t.dl",
        ),
        (
            "aiokafka.consumer.fetcher",
            logging.WARNING,
            UNKNOWN_IN_LIST_OFFSETS,
            (TopicPartition("t.dl", 2),),
            "t.dl",
        ),
        # a worker's first group on a fresh broker
        (
            "aiokafka.consumer.group_coordinator",
            logging.ERROR,
            NO_COORDINATOR,
            (errors.GroupCoordinatorNotAvailableError(),),
            OFFSETS_TOPIC,
        ),
        # a changelog Faust is creating while the group forms
        (
            "faust.assignor.partition_assignor",
            logging.WARNING,
            MISSING,
            ("app-t-changelog",),
            "app-t-changelog",
        ),
    ],
)
def test_other_transient_messages_are_demoted_per_topic(
    name: str, level: int, msg: str, args: tuple[object, ...], topic: str
) -> None:
    clock = Clock()
    noise = NewTopicNoise(grace_s=30, clock=clock)
    assert noise.filter(record(name, level, msg, *args)) is False
    clock.now += 30
    late = record(name, level, msg, *args)
    assert noise.filter(late) is True and late.levelno == level
    # the grace was counted for `topic`: the cluster's own message about it is late too
    assert noise.filter(record("aiokafka.cluster", logging.ERROR, NOT_FOUND, topic)) is True


@pytest.mark.parametrize(
    ("name", "level", "msg", "args"),
    [
        # another retriable produce error: says something about the cluster, not the topic
        (
            "aiokafka.producer.sender",
            logging.WARNING,
            RETRYING,
            (TopicPartition("t", 0), errors.NotEnoughReplicasError),
        ),
        # a broker's record error text instead of an error class
        ("aiokafka.producer.sender", logging.WARNING, RETRYING, (TopicPartition("t", 0), "x")),
        # not transient: no retry makes it go away
        ("aiokafka.cluster", logging.ERROR, "Topic %s is not authorized for this client", ("t",)),
        ("aiokafka.cluster", logging.ERROR, "'%s' is not a valid topic name", ("t",)),
        # the same text from another logger is not aiokafka's metadata
        ("streams.admin", logging.ERROR, NOT_FOUND, ("t",)),
        # ListOffsets failing for a reason no retry fixes, or no leader error
        (
            "aiokafka.consumer.fetcher",
            logging.ERROR,
            LIST_OFFSETS,
            (1, errors.TopicAuthorizationFailedError(TopicPartition("t", 0))),
        ),
        (
            "aiokafka.consumer.fetcher",
            logging.ERROR,
            LIST_OFFSETS,
            (1, errors.KafkaTimeoutError(TopicPartition("t", 0))),
        ),
        # no coordinator for another reason
        (
            "aiokafka.consumer.group_coordinator",
            logging.ERROR,
            NO_COORDINATOR,
            (errors.GroupAuthorizationFailedError("g"),),
        ),
    ],
)
def test_other_messages_keep_their_level(
    name: str, level: int, msg: str, args: tuple[object, ...]
) -> None:
    noise = NewTopicNoise(grace_s=30, clock=Clock())
    r = record(name, level, msg, *args)
    assert noise.filter(r) is True
    assert r.levelno == level


def test_a_demoted_message_is_still_logged_when_debug_is_on() -> None:
    logger = logging.getLogger("aiokafka.cluster")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        r = record("aiokafka.cluster", logging.ERROR, NOT_FOUND, "t.debug")
        assert NewTopicNoise(grace_s=30, clock=Clock()).filter(r) is True
        assert r.levelname == "DEBUG"
    finally:
        logger.setLevel(before)


def test_aiokafkas_own_metadata_error_is_quiet_at_info_and_loud_with_no_grace(
    capture: Capture,
) -> None:
    """End to end through aiokafka's ClusterMetadata and the filter importing
    streams.logging_setup installs: a metadata response that lacks a new topic."""
    topic = f"t{uuid.uuid4().hex[:8]}.new"
    response = MetadataResponse_v0(
        brokers=[(1, "localhost", 9092)],
        topics=[(errors.UnknownTopicOrPartitionError.errno, topic, [])],
    )
    aiokafka.cluster.ClusterMetadata().update_metadata(response)
    assert not any(topic in line for line in capture.lines())

    logger = logging.getLogger("aiokafka.cluster")
    installed = [f for f in logger.filters if isinstance(f, NewTopicNoise)]
    assert len(installed) == 1
    grace = installed[0].grace_s
    installed[0].grace_s = 0
    try:
        aiokafka.cluster.ClusterMetadata().update_metadata(response)
    finally:
        installed[0].grace_s = grace
    assert f"ERROR Topic {topic} not found in cluster metadata" in capture.lines()


def test_installing_twice_adds_one_filter() -> None:
    logging_setup.install_noise_filter()
    for name in NOISY_LOGGERS:
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, NewTopicNoise) for f in filters) == 1, name


def _string_constants(module: ModuleType) -> set[str]:
    # ast joins implicitly concatenated literals, as the message aiokafka logs
    tree = ast.parse(inspect.getsource(module))
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


MODULES = (
    aiokafka.cluster,
    aiokafka.producer.sender,
    aiokafka.consumer.fetcher,
    aiokafka.consumer.group_coordinator,
    faust.assignor.partition_assignor,
)


@pytest.mark.parametrize(("name", "msg"), list(TRANSIENT_MESSAGES))
def test_the_templates_are_the_libraries(name: str, msg: str) -> None:
    """An upgrade that rewords or moves a message fails here: the filter would silently
    stop matching it (the noise would be back, nothing hidden)."""
    (module,) = [m for m in MODULES if m.__name__ == name]
    loggers = [v for v in vars(module).values() if isinstance(v, logging.Logger)]
    assert [lg.name for lg in loggers] == [name], "the module logs under its own name"
    assert msg in _string_constants(module), f"{name} no longer logs {msg!r}"


def test_no_record_content_in_aiokafka_debug_lines() -> None:
    """With the log level at DEBUG aiokafka prints every record it sends, and every
    request and response whole: an `agent.messages` access token went into the logs."""
    import agentstream.streams.logging_setup  # noqa: F401 - installs the filters

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    token = b'{"auth":{"token":"tok-SECRET"}}'
    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("aiokafka.producer.producer", "aiokafka.conn")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        logging.getLogger("aiokafka.producer.producer").debug(
            "Sending (key=%s value=%s) to %s", b"k", token, "tp"
        )
        logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "h", 1, 2, token)
        logging.getLogger("aiokafka.conn").debug("Response from %s:%d %d: %s", "h", 1, 2, token)
        logging.getLogger("aiokafka.conn").debug("Closing connection at %s:%s", "h", 1)
    finally:
        for lg, (level, _) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert not any("tok-SECRET" in line for line in seen), seen
    assert seen == ["Closing connection at h:1"]  # the rest of the DEBUG output stays


@pytest.mark.parametrize(("logger", "start"), RecordContentFilter.LINES)
def test_the_record_content_lines_are_aiokafkas(logger: str, start: str) -> None:
    # an upgrade that rewords them would let record content back into DEBUG logs
    import importlib

    source = inspect.getsource(importlib.import_module(logger))
    assert f'"{start}' in source, (logger, start)

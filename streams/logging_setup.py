"""The pipeline's own log file, rotated by size AND age, keeping N gzip-compressed files.

Settings: `log_file` (unset: no file), `log_max_bytes`, `log_max_age_s`, `log_backups`.
Rotated files are ``<log_file>.1.gz`` (newest) … ``<log_file>.N.gz``; with `log_backups`
0 the file is simply truncated when it rotates.

The age of the current file is counted from when it was started: the handler keeps that
time in a small sidecar file ``<log_file>.started`` so that restarting the worker does not
reset the clock (a file's ctime/mtime cannot tell when it was created).

The worker attaches the handler after Faust has configured logging (Faust's worker
replaces the root logger's handlers while it starts): `agents.system` does it in a worker
task (`attach_file_handler`). Equivalent, and independent of which agents a worker runs:
``loghandlers=[h for h in [file_handler(settings)] if h]`` in `streams.app.create_app`
(the handler opens its file lazily, so CLI processes never create it).

Importing this module also quiets aiokafka's (and Faust's) complaints about a topic whose
metadata the brokers are still spreading (`NewTopicNoise`): right after topics are
created, a client sees "Topic ... not found in cluster metadata", `NotLeaderForPartitionError`
on its first ListOffsets or produce requests, and a fresh broker has no group coordinator
for a moment; the clients retry by themselves within a second or two and the user can do
nothing about it. Every process imports this module: the worker through `streams.app`,
every CLI command in `streams.cli.prepare_run` (a command marked `without_agents` never
loads the app).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import logging.handlers
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agentstream.streams.settings import Settings

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class SizeAndAgeRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age_s: float,
        backups: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        # RotatingFileHandler does nothing when backupCount is 0: we truncate instead
        # delay: building the handler (e.g. in `create_app`) must not create the file in
        # processes that never log to it (CLI commands)
        super().__init__(
            filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        self.namer = lambda name: name + ".gz"
        self.rotator = _gzip_rotate
        self._started_path = Path(self.baseFilename + ".started")
        self.started_at: float | None = None

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        if self.started_at is None:
            self.started_at = self._read_started()
        return super()._open()

    def _read_started(self) -> float:
        try:
            return float(self._started_path.read_text().strip())
        except (OSError, ValueError):
            started = self.clock()
            self._write_started(started)
            return started

    def _write_started(self, at: float) -> None:
        with contextlib.suppress(OSError):  # logging must never take the worker down
            self._started_path.write_text(f"{at}\n")

    def shouldRollover(self, record: logging.LogRecord) -> int:
        if self.stream is None:
            self.stream = self._open()
        assert self.started_at is not None
        if self.max_age_s > 0 and self.clock() - self.started_at >= self.max_age_s:
            try:
                if os.path.getsize(self.baseFilename) > 0:
                    return 1
            except OSError:
                return 0
        return super().shouldRollover(record)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
        else:
            if self.stream:
                self.stream.close()
                self.stream = None
            with open(self.baseFilename, "w", encoding="utf-8"):
                pass
            if not self.delay:
                self.stream = self._open()
        self.started_at = self.clock()
        self._write_started(self.started_at)


def _gzip_rotate(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(source)


def logs_dir(settings: Settings) -> Path:
    """Where the pipeline's logs go: the directory of `log_file`, else `<data_dir>/logs`."""
    return settings.log_file.parent if settings.log_file else settings.data_dir / "logs"


def file_handler(settings: Settings) -> SizeAndAgeRotatingFileHandler | None:
    if settings.log_file is None:
        return None
    handler = SizeAndAgeRotatingFileHandler(
        settings.log_file,
        max_bytes=settings.log_max_bytes,
        max_age_s=settings.log_max_age_s,
        backups=settings.log_backups,
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def attach_file_handler(settings: Settings, logger: logging.Logger | None = None) -> bool:
    """Add the rotating file handler to the root logger once; True if it was added."""
    root = logger or logging.getLogger()
    if settings.log_file is None:
        return False
    target = str(Path(settings.log_file).resolve())
    for h in root.handlers:
        if isinstance(h, SizeAndAgeRotatingFileHandler) and h.baseFilename == target:
            return False
    handler = file_handler(settings)
    if handler is None:
        return False
    handler.setLevel(logging.getLevelName(settings.log_level.upper()))
    root.addHandler(handler)
    return True


# -- transient metadata noise of new topics ------------------------------------------------

#: how long a topic's transient metadata messages stay at DEBUG, from the first one
NEW_TOPIC_GRACE_S = 30.0

#: the retriable errors of a partition whose leader the client (or the broker it asked)
#: does not know yet
_LEADER_ERRORS = frozenset(
    {"NotLeaderForPartitionError", "LeaderNotAvailableError", "UnknownTopicOrPartitionError"}
)

#: the key `NewTopicNoise` files a group coordinator's absence under: a fresh broker
#: creates the offsets topic at the first group's first request, and has no coordinator
#: until that topic has a leader
OFFSETS_TOPIC = "__consumer_offsets"


def _error_name(error: object) -> str:
    return getattr(error if isinstance(error, type) else type(error), "__name__", "")


def _topic(tp: object) -> str | None:
    topic = getattr(tp, "topic", None)
    return topic if isinstance(topic, str) else None


def _named_topic(args: tuple[Any, ...]) -> str | None:
    """(topic,)"""
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def _partition(args: tuple[Any, ...]) -> str | None:
    """(TopicPartition,)"""
    return _topic(args[0]) if len(args) == 1 else None


def _retried_produce(args: tuple[Any, ...]) -> str | None:
    """(TopicPartition, error class or a broker's error text)"""
    if len(args) != 2 or _error_name(args[1]) not in _LEADER_ERRORS:
        return None
    return _topic(args[0])


def _failed_list_offsets(args: tuple[Any, ...]) -> str | None:
    """(node id, error raised with its TopicPartition)"""
    if len(args) != 2 or _error_name(args[1]) not in _LEADER_ERRORS:
        return None
    error_args: tuple[Any, ...] = getattr(args[1], "args", ())
    return _topic(error_args[0]) if len(error_args) == 1 else None


def _no_coordinator_yet(args: tuple[Any, ...]) -> str | None:
    """(error,)"""
    if len(args) == 1 and _error_name(args[0]) == "GroupCoordinatorNotAvailableError":
        return OFFSETS_TOPIC
    return None


#: (logger, message template) -> the topic the record is about, None when that record is
#: not the transient case. The templates are the libraries' own (test_log_noise.py checks
#: their source still has them): a reworded message passes through at its own level.
TRANSIENT_MESSAGES: dict[tuple[str, str], Callable[[tuple[Any, ...]], str | None]] = {
    # a metadata response without the topic (or its leader) yet
    ("aiokafka.cluster", "Topic %s not found in cluster metadata"): _named_topic,
    ("aiokafka.cluster", "Topic %s is not available during auto-create initialization"): (
        _named_topic
    ),
    # a batch sent to a broker that is not (yet) its leader: the sender refreshes the
    # metadata and sends it again
    (
        "aiokafka.producer.sender",
        "Got error produce response on topic-partition %s, retrying. Error: %s",
    ): _retried_produce,
    # a consumer's first position on a new partition (ListOffsets) asked of a broker that
    # does not know its leader yet: the fetcher retries after its backoff
    ("aiokafka.consumer.fetcher", "Failed fetch offsets from %s: %s"): _failed_list_offsets,
    (
        "aiokafka.consumer.fetcher",
        "Received unknown topic or partition error in ListOffset request for partition %s. "
        "The topic/partition may not exist or the user may not have Describe access to it.",
    ): _partition,
    # the first consumer group on a fresh broker: no coordinator until the offsets topic
    # exists; aiokafka asks again after its backoff
    ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s"): (
        _no_coordinator_yet
    ),
    # Faust's assignor leaves out a topic the metadata does not have yet (a changelog it is
    # creating); the metadata change that follows triggers a rebalance that includes it
    ("faust.assignor.partition_assignor", "Ignoring missing topic: %r"): _named_topic,
}


class NewTopicNoise(logging.Filter):
    """Demotes the transient metadata messages of `TRANSIENT_MESSAGES` about a topic to
    DEBUG during its first `grace_s` seconds, counted from the first such message for
    that topic.

    Why per topic and from its first message: that is when the topic is new to the
    cluster or to this client (the worker's own topics, changelogs Faust creates while it
    starts, the offsets topic of a fresh broker); the messages stop by themselves once the
    metadata has spread. A topic still missing, or a leader still unknown, after the grace
    is reported at the library's level again (aiokafka logs at every retry and metadata
    refresh), so a persistent problem is not hidden, only its first `grace_s` seconds.
    A demoted record is still logged when DEBUG is enabled for its logger."""

    def __init__(
        self, grace_s: float = NEW_TOPIC_GRACE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.grace_s = grace_s
        self.clock = clock
        # topic -> when its first transient message was seen; written from aiokafka's
        # threads too (Faust's consumer thread): setdefault is atomic
        self._first_seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        topic_of = TRANSIENT_MESSAGES.get((record.name, str(record.msg)))
        args = record.args if isinstance(record.args, tuple) else ()
        topic = topic_of(args) if topic_of is not None else None
        if topic is None:
            return True
        now = self.clock()
        if now - self._first_seen.setdefault(topic, now) >= self.grace_s:
            return True
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        # the logger checked the record's original level: check the new one
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


#: the loggers `NewTopicNoise` goes on
NOISY_LOGGERS = tuple(sorted({logger for logger, _ in TRANSIENT_MESSAGES}))


def install_noise_filter(loggers: Iterable[str] = NOISY_LOGGERS) -> None:
    """Put one `NewTopicNoise` on each of aiokafka's loggers that emit such messages
    (logger filters, not handler ones: Faust's worker replaces the root handlers while it
    starts, and keeps loggers' filters). Idempotent."""
    noise = NewTopicNoise()
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NewTopicNoise) for f in logger.filters):
            logger.addFilter(noise)


install_noise_filter()


class RecordContentFilter(logging.Filter):
    """Drops aiokafka's DEBUG lines that print records and requests whole: the values of
    `agent.messages` may carry an access token (`auth.token`), and with the log level
    at DEBUG those lines wrote it into every log. The rest of aiokafka's DEBUG output
    stays."""

    #: (logger, the start of the message format) of the lines that carry record content
    LINES = (
        ("aiokafka.producer.producer", "Sending (key="),
        ("aiokafka.conn", "Request to "),
        ("aiokafka.conn", "Response "),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG or not isinstance(record.msg, str):
            return True
        return not any(
            record.name == name and record.msg.startswith(start) for name, start in self.LINES
        )


def install_record_content_filter() -> None:
    """One `RecordContentFilter` on each logger it watches (idempotent)."""
    content = RecordContentFilter()
    for name in {name for name, _ in RecordContentFilter.LINES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RecordContentFilter) for f in logger.filters):
            logger.addFilter(content)


install_record_content_filter()

"""Creating and listing the catalogue topics (idempotent), with aiokafka's admin client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from agentstream.streams.errors import BrokerAuthError, BrokerError
from agentstream.streams.kafka_security import new_admin, principal
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.topics import AGENT_HEARTBEATS, CATALOGUE, COMMS_RECORDS, METRICS_SAMPLES

log = logging.getLogger(__name__)

#: what every catalogue topic is created with (`TopicSpec.configs`): the broker's clock
BROKER_CLOCK = "LogAppendTime"


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    exists: bool
    #: `message.timestamp.type`, or None when it could not be read (no DescribeConfigs)
    timestamp_type: str | None = None


async def _admin(settings: Settings, timeout_s: float) -> AIOKafkaAdminClient:
    admin = new_admin(settings, "topic administration", request_timeout_ms=int(timeout_s * 1000))
    await admin.start()  # a BrokerError naming the cause, within the connect timeout
    return admin


async def ensure_topics(
    settings: Settings,
    names: list[str] | None = None,
    timeout_s: float = 30.0,
    *,
    check_partitions: bool = False,
    warn: Callable[[str], None] | None = None,
    broker_clock_needed: Iterable[str] = (),
) -> list[str]:
    """Create the missing catalogue topics; return the names created (empty when all exist).

    With `check_partitions` (a worker's start, `topics create`, the demo), an existing topic
    whose partition count is not the configured one is a `SettingsError`, raised before
    anything is created, and existing topics that keep the producer's clock are named
    through `warn` (default: a WARNING log line; see `producer_clock_warning`). Commands
    that only publish to a topic (rule changes) do not check: their
    AGENTSTREAM_TOPIC_PARTITIONS is not what the topics were made with.

    `broker_clock_needed` (catalogue names; with `check_partitions`): topics whose
    records' time must be the broker's because a table is bounded by it
    (`monitoring_clock_topics`). One of them seen keeping the producer's clock is a
    `SettingsError`; one whose configs this principal may not read is only warned about,
    as any other."""
    admin = await _admin(settings, timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in (names or list(CATALOGUE))]
        # before creating any: a run refused here must not leave the rest of the catalogue
        # created with the count it refuses
        present = [n for n in wanted if settings.topic(n) in existing]
        wrong = (
            await _partition_mismatches(admin, settings, present)
            if check_partitions and present
            else []
        )
        if wrong:
            more = f" (and {len(wrong) - 1} other topic(s))" if len(wrong) > 1 else ""
            raise SettingsError(
                f"{wrong[0]}{more}: the workers partition their tables and place each "
                "sender's state by AGENTSTREAM_TOPIC_PARTITIONS, so every catalogue topic "
                "must have that many (set it to the topics' count, or recreate them and "
                "the app's -changelog topics)",
                field="topic_partitions",
            )
        new = []
        for name in wanted:
            spec = CATALOGUE[name]
            full = settings.topic(name)
            if full in existing:
                continue
            new.append(
                NewTopic(
                    full,
                    num_partitions=spec.partitions or settings.topic_partitions,
                    replication_factor=settings.topic_replication,
                    topic_configs=spec.configs(),
                )
            )
        created: list[str] = []
        if new:
            try:
                resp = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                resp = None
            errors = getattr(resp, "topic_errors", None) or getattr(resp, "topic_error_codes", [])
            for item in errors:
                topic, code = item[0], item[1]
                if code == 0:
                    created.append(topic)
                elif code in (29, 31):  # TOPIC_/CLUSTER_AUTHORIZATION_FAILED
                    # not listed, so it is missing, or there but hidden from us: a
                    # principal lacking Create and Describe cannot tell which
                    raise BrokerAuthError(
                        f"{principal(settings)} is not authorized to create topic {topic} "
                        "(nor to describe it, if it exists): grant Create, and Read where "
                        "the role consumes it (`agentstream acls`, docs/acls.md), or have "
                        "an admin run `agentstream topics create` first"
                    )
                elif code != 36:  # TOPIC_ALREADY_EXISTS: another process won the race
                    raise BrokerError(f"creating topic {topic} failed with error code {code}")
        await _wait_visible(admin, settings, [settings.topic(n) for n in wanted], timeout_s)
        if check_partitions and present:
            types = await _timestamp_types(admin, [settings.topic(n) for n in present])
            old = sorted(t for t, kind in types.items() if kind not in (None, BROKER_CLOCK))
            needed = sorted(t for t in (settings.topic(n) for n in broker_clock_needed) if t in old)
            if needed:
                raise SettingsError(
                    f"{producer_clock_warning(needed)}; a worker bounds its monitoring "
                    "tables by these topics' append time and does not start until they "
                    "keep the broker's",
                    field="topic_timestamp_type",
                )
            if old:
                (warn or log.warning)(producer_clock_warning(old))
        return sorted(created)
    except KafkaError as exc:
        raise BrokerError(f"topic administration failed: {exc}") from exc
    finally:
        await admin.close()


def monitoring_clock_topics() -> tuple[str, ...]:
    """The topics whose append time is the clock of a monitoring table's bounds
    (`streams.tables.monitoring`): a producer's time there could expire a partition's
    entries, or none, at will."""
    return (AGENT_HEARTBEATS, METRICS_SAMPLES, COMMS_RECORDS)


async def _partition_mismatches(
    admin: AIOKafkaAdminClient, settings: Settings, names: list[str]
) -> list[str]:
    """The catalogue topics whose partition count is not the one this configuration gives
    them (created beforehand by other means, or with another AGENTSTREAM_TOPIC_PARTITIONS):
    a verified message homed by the setting's count sat in another partition and was
    rejected `misrouted`, and tables were partitioned unlike their inputs."""
    full = {settings.topic(n): n for n in names}
    out = []
    for meta in await admin.describe_topics(list(full)):
        name = full.get(meta["topic"])
        have = len(meta.get("partitions") or ())
        if name is None or not have:
            continue
        want = CATALOGUE[name].partitions or settings.topic_partitions
        if have != want:
            out.append(f"topic {meta['topic']} has {have} partition(s), not {want}")
    return out


def producer_clock_warning(topics: list[str]) -> str:
    """One line naming the topics whose records carry their producer's timestamp, and the
    change that gives them the broker's (topic configs are altered in place; records
    already written keep their timestamps)."""
    more = f" (and {len(topics) - 1} more)" if len(topics) > 1 else ""
    return (
        f"topic {topics[0]}{more} keeps the producer's clock (message.timestamp.type="
        "CreateTime): a sender can date its records out of replay and audit time ranges; "
        "have an admin set message.timestamp.type=LogAppendTime on "
        + ", ".join(topics)
        + " (kafka-configs --alter --entity-type topics --entity-name T --add-config ...)"
    )


async def timestamp_types(
    settings: Settings, names: Iterable[str], timeout_s: float = 30.0
) -> dict[str, str | None]:
    """`message.timestamp.type` of each existing topic among `names` (full names); None
    for one whose configs this principal may not read."""
    admin = await _admin(settings, timeout_s)
    try:
        existing = set(await admin.list_topics())
        return await _timestamp_types(admin, [n for n in names if n in existing])
    except KafkaError as exc:
        raise BrokerError(f"topic administration failed: {exc}") from exc
    finally:
        await admin.close()


async def _timestamp_types(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, str | None]:
    if not names:
        return {}
    out: dict[str, str | None] = dict.fromkeys(names)
    wanted = {"message.timestamp.type": None}  # the keys filter the answer
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, wanted) for n in names]
    for response in await admin.describe_configs(resources):
        # (error_code, error_message, resource_type, resource_name, config_entries, ...)
        for resource in response.resources:
            error, name, entries = resource[0], resource[3], resource[4]
            if error or name not in out:
                continue  # e.g. 29 TOPIC_AUTHORIZATION_FAILED: a worker without DescribeConfigs
            for entry in entries:
                if entry[0] == "message.timestamp.type":
                    out[name] = entry[1]
    return out


#: the metadata error code of a topic the principal may not describe
TOPIC_AUTHORIZATION_FAILED = 29


def undescribable(described: list[dict[str, Any]]) -> list[str]:
    """The topics of a metadata answer (`describe_topics`) the broker refused to describe
    to us, sorted."""
    return sorted(t["topic"] for t in described if t["error_code"] == TOPIC_AUTHORIZATION_FAILED)


def undescribable_message(who: str, topics: list[str]) -> str:
    return (
        f"{who} is not authorized to describe topic(s) {', '.join(topics)}: a worker without "
        "Read on a topic it consumes would never process it; grant the role's ACLs "
        "(`agentstream acls`, docs/acls.md)"
    )


async def _wait_visible(
    admin: AIOKafkaAdminClient, settings: Settings, names: list[str], timeout_s: float
) -> None:
    """Wait until the broker lists every one of `names` (all exist: just created, or said
    to exist). One we may not describe is left out of every listing, as a topic still
    being created is, and would never show: asked for by name, the broker says why, and
    that ends the wait at once instead of after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        missing = sorted(set(names) - set(await admin.list_topics()))
        if not missing:
            return
        # named: safe here (a broker with auto.create.topics.enable creates a missing
        # topic it is asked about, but these exist)
        denied = undescribable(await admin.describe_topics(missing))
        if denied:
            raise BrokerAuthError(undescribable_message(principal(settings), denied))
        if loop.time() > deadline:
            raise BrokerError(f"topics not visible after {timeout_s}s: {missing}")
        await asyncio.sleep(0.1)


async def topic_names(settings: Settings, timeout_s: float = 30.0) -> set[str]:
    """Every topic the broker lists to these settings' principal (catalogue or not)."""
    admin = await _admin(settings, timeout_s)
    try:
        return set(await admin.list_topics())
    except KafkaError as exc:
        raise BrokerError(f"listing topics failed: {exc}") from exc
    finally:
        await admin.close()


async def list_topics(settings: Settings, timeout_s: float = 30.0) -> list[TopicState]:
    admin = await _admin(settings, timeout_s)
    try:
        names = [settings.topic(n) for n in CATALOGUE]
        existing = set(await admin.list_topics())
        present = [n for n in names if n in existing]
        parts: dict[str, int] = {}
        types: dict[str, str | None] = {}
        if present:
            for meta in await admin.describe_topics(present):
                parts[meta["topic"]] = len(meta["partitions"])
            types = await _timestamp_types(admin, present)
        return [TopicState(n, parts.get(n, 0), n in existing, types.get(n)) for n in names]
    finally:
        await admin.close()

"""Creating and listing the catalogue topics (idempotent), with aiokafka's admin client."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from agentstream.streams.errors import BrokerAuthError, BrokerError
from agentstream.streams.kafka_security import new_admin, principal
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.topics import CATALOGUE


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    exists: bool


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
) -> list[str]:
    """Create the missing catalogue topics; return the names created (empty when all exist).

    With `check_partitions` (a worker's start, `topics create`, the demo), an existing topic
    whose partition count is not the configured one is a `SettingsError`, raised before
    anything is created. Commands that only publish to a topic (rule changes) do not
    check: their AGENTSTREAM_TOPIC_PARTITIONS is not what the topics were made with."""
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
                    raise BrokerAuthError(
                        f"{principal(settings)} is not authorized to create topic {topic}: "
                        "grant Create (`agentstream acls`), or have an admin run "
                        "`agentstream topics create` first"
                    )
                elif code != 36:  # TOPIC_ALREADY_EXISTS: another process won the race
                    raise BrokerError(f"creating topic {topic} failed with error code {code}")
        await _wait_visible(admin, [settings.topic(n) for n in wanted], timeout_s)
        return sorted(created)
    except KafkaError as exc:
        raise BrokerError(f"topic administration failed: {exc}") from exc
    finally:
        await admin.close()


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


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if set(names) <= set(await admin.list_topics()):
            return
        if loop.time() > deadline:
            raise BrokerError(f"topics not visible after {timeout_s}s: {names}")
        await asyncio.sleep(0.1)


async def list_topics(settings: Settings, timeout_s: float = 30.0) -> list[TopicState]:
    admin = await _admin(settings, timeout_s)
    try:
        names = [settings.topic(n) for n in CATALOGUE]
        existing = set(await admin.list_topics())
        present = [n for n in names if n in existing]
        parts: dict[str, int] = {}
        if present:
            for meta in await admin.describe_topics(present):
                parts[meta["topic"]] = len(meta["partitions"])
        return [TopicState(n, parts.get(n, 0), n in existing) for n in names]
    finally:
        await admin.close()

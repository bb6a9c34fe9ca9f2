"""The policies in force on this worker, and the keys `enforce_policy` needs.

`PolicyStore` folds the whole compacted `security.policies` topic (one partition) with
its own consumer, outside the app's consumer group: every worker must hold every policy,
whichever `agent.messages` partitions it is assigned, and a change must reach every
worker without a restart. `ready` is set once the topic has been read up to the end it
had at start, and `enforce_policy` waits for it: deciding on a partial policy set would
apply the default action to messages a policy should have judged.

`KeyCache` keeps keychain lookups in memory for a short while, so the keychain (a file or
D-Bus call in a thread) is asked once per key and TTL, not once per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition

from agents.security.policy import KeyRequest, PolicySet, StaticKeys
from schemas import registry
from schemas.errors import SchemaError
from streams.client import group_less_consumer
from streams.settings import Settings
from streams.tables.security import POLICIES, apply_policy_event
from streams.topics import SECURITY_POLICIES

log = logging.getLogger(__name__)


class PolicyStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: dict[str, Any] = {}
        self.policy_set = self._build()
        self.records = 0
        self.invalid_records = 0
        self.failures = 0
        self.updated_at: float | None = None
        self._ready: asyncio.Event | None = None

    @property
    def ready(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    def _build(self) -> PolicySet:
        return PolicySet.from_state(
            self.state,
            enabled=self.settings.security_enabled,
            default_action=self.settings.security_default_action,
        )

    def apply_record(
        self, key: bytes | None, value: bytes | None, state: dict[str, Any] | None = None
    ) -> None:
        """Fold one record of `security.policies` into `state` (default: the live state;
        no rebuild, see `commit`)."""
        target = self.state if state is None else state
        self.records += 1
        if value is None:  # a tombstone: compaction's way of removing a key
            if key is not None:
                target.pop(key.decode(errors="replace"), None)
            return
        try:
            event = registry.decode(value, max_bytes=self.settings.max_event_bytes)
        except SchemaError as exc:
            # Every worker reads this topic: a dead letter from each would duplicate it.
            # `policy apply` validates before publishing, so this is a bypassing producer.
            self.invalid_records += 1
            log.warning("ignored an invalid record on %s: %s", SECURITY_POLICIES, exc)
            return
        if event.type in POLICIES.types:
            apply_policy_event(target, event)

    def commit(self, state: dict[str, Any] | None = None) -> None:
        if state is not None:
            self.state = state
        self.policy_set = self._build()
        self.updated_at = time.time()
        for key, problem in self.policy_set.invalid.items():
            log.error("policy record %s is not valid and is not applied: %s", key, problem)

    async def run_forever(self, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        """`run`, restarted after a broker error: the policies in force stay in force
        meanwhile, and the topic is read again from the beginning."""
        delay = backoff_s
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                log.error(
                    "reading %s failed (%r); retrying in %.1fs", SECURITY_POLICIES, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)
            else:
                delay = backoff_s

    async def run(self, poll_ms: int = 250) -> None:
        """Fold the topic from the beginning into a fresh state, swap it in once caught up
        with the end the topic had when we started, then follow it."""
        topic = self.settings.topic(SECURITY_POLICIES)
        consumer = group_less_consumer(
            self.settings.bootstrap, f"{self.settings.app_id}-policy-store"
        )
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            while not consumer.partitions_for_topic(topic):
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            fresh: dict[str, Any] = {}
            caught_up = False
            while True:
                if not caught_up and await consumer.position(tp) >= end:
                    caught_up = True
                    self.commit(fresh)  # a partial state is never put in force
                    if not self.ready.is_set():
                        self.ready.set()
                        log.info(
                            "policy store ready: %d policies, security %s, default %s",
                            len(self.policy_set.policies),
                            "enabled" if self.policy_set.enabled else "disabled",
                            self.policy_set.default_action.value,
                        )
                batch = await consumer.getmany(tp, timeout_ms=poll_ms)
                records = batch.get(tp, [])
                for rec in records:
                    self.apply_record(rec.key, rec.value, fresh if not caught_up else None)
                if records and caught_up:
                    self.commit()
        finally:
            await consumer.stop()


Fetch = Callable[[KeyRequest], Awaitable[bytes | str | None]]


class KeyCache:
    """Keychain answers kept for `ttl_s` (misses for `miss_ttl_s`, so a key added to the
    keychain is picked up soon without hammering it for unknown senders)."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_s: float = 30.0,
        miss_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._fetch = fetch
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self._clock = clock
        self._max = max_entries
        self._entries: dict[KeyRequest, tuple[float, bytes | str | None]] = {}
        self.fetches = 0

    async def view(self, requests: set[KeyRequest]) -> StaticKeys:
        now = self._clock()
        missing = [r for r in requests if (hit := self._entries.get(r)) is None or hit[0] <= now]
        if missing:
            results = await asyncio.gather(*(self._fetch(r) for r in missing))
            self.fetches += len(missing)
            if len(self._entries) + len(missing) > self._max:
                self._entries.clear()
            for request, value in zip(missing, results, strict=True):
                ttl = self.ttl_s if value is not None else self.miss_ttl_s
                self._entries[request] = (now + ttl, value)
        signing: dict[str, bytes | None] = {}
        encryption: dict[str, bytes | None] = {}
        tokens: dict[int, str | None] = {}
        for request in requests:
            value = self._entries[request][1]
            if request.kind == "signing":
                signing[request.name] = value if isinstance(value, bytes) else None
            elif request.kind == "encryption":
                encryption[request.name] = value if isinstance(value, bytes) else None
            elif request.kind == "token":
                tokens[int(request.name)] = value if isinstance(value, str) else None
        return StaticKeys(signing, encryption, tokens)

    def clear(self) -> None:
        self._entries.clear()

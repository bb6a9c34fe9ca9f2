"""reject_unsigned_changes: one `SecurityChangeRejected` on `security.changes.rejected` for
every record on a rule topic (`security.policies`, `security.identities`,
`security.worker_keys`) that workers ignore — unsigned, signed by an unknown key, a
signature that does not verify, a reserved or mismatched key, an older version than the
one in force (a replay or rollback), a tombstone, or undecodable.

Every worker folds these topics itself (`agents.security.store`) and ignores such records
silently but for a log line; this agent reports each one *once* for the whole cluster:
it reads the topics in the app's consumer group (one partition each, so one worker
judges each record, and Faust commits its offset), with the very function the store
applies (`streams.tables.security.check_record`), so the report and what workers hold
cannot disagree.

A rollback can only be judged against the state in force just before the record. The
agent folds what it accepts as it goes; when it starts on a topic (first record after a
start or a rebalance, or a record at or before one already judged: a redelivery), it
first folds the topic from its beginning up to that record with a consumer outside the
group (`fold_topic`). It does not use the process's `PolicyStore`: that one follows the
live end of the topics, which may be ahead of the record being judged.
"""

from __future__ import annotations

import logging
from typing import Any

from agentstream.agents.security.store import fold_topic
from agentstream.schemas import Event
from agentstream.schemas.security import SecurityChangeRejected
from agentstream.streams.app import app, settings
from agentstream.streams.eos import GATE, SOURCE
from agentstream.streams.observability import EVENTS_IN
from agentstream.streams.processing import emit, event_batches
from agentstream.streams.tables.security import (
    Checked,
    apply_change,
    check_record,
    trusted_admin_keys,
)
from agentstream.streams.topics import SECURITY_CHANGES_REJECTED, SIGNED_TOPICS

log = logging.getLogger(__name__)

CONSUMER = "reject_unsigned_changes"

TRUSTED, PROBLEM = trusted_admin_keys(settings.security_admin_keys)
#: prefixed topic name -> catalogue name
_NAMES = {settings.topic(t): t for t in SIGNED_TOPICS}
_EOS = settings.processing_guarantee == "exactly_once"

source = app.topic(
    *_NAMES,
    key_serializer="raw",
    value_serializer="raw",
    internal=False,
)


class Judged:
    """Per signed topic: the state folded from the records judged so far, and the offset
    of the last one (a record must follow it to be judged against this state)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, dict[str, Any]]] = {}

    def reset(self) -> None:
        self._held.clear()

    async def state_before(self, topic: str, offset: int) -> dict[str, Any]:
        held = self._held.get(topic)
        if held is None or offset <= held[0]:
            state = await fold_topic(settings, topic, TRUSTED, until=offset)
            held = self._held[topic] = (offset - 1, state)
        return held[1]

    def advance(self, topic: str, offset: int) -> None:
        held = self._held.get(topic)
        if held is not None:
            self._held[topic] = (offset, held[1])


JUDGED = Judged()


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
    JUDGED.reset()


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    JUDGED.reset()


def judge(topic: str, msg: Any, state: dict[str, Any]) -> Checked:
    """Judge one record against `state` and fold it in when it applies."""
    checked = check_record(
        topic, msg.key, msg.value, state, TRUSTED, max_bytes=settings.max_event_bytes
    )
    if checked.apply:
        assert checked.event is not None
        apply_change(state, checked.event)
    return checked


def rejection(topic: str, msg: Any, checked: Checked) -> Event[Any]:
    assert checked.refusal is not None
    key = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes | bytearray) else ""
    event = checked.event
    return Event.of(
        SecurityChangeRejected(
            topic=topic,
            partition=msg.partition,
            offset=msg.offset,
            key=key[:512],
            event_type=(event.type if event is not None else "")[:128],
            signed_by=checked.signed_by[:256],
            reason=checked.refusal.text[:2048],
        ),
        source=CONSUMER,
    )


@app.agent(source, name=CONSUMER)
async def reject_unsigned_changes(stream: Any) -> None:
    if PROBLEM:
        log.error("%s: %s", CONSUMER, PROBLEM)
    async for events in event_batches(stream, settings.batch_max, settings.batch_within_s):
        out: list[tuple[Any, Event[Any]]] = []
        for ev in events:
            msg = ev.message
            topic = _NAMES.get(msg.topic)
            if topic is None:  # pragma: no cover - only the signed topics are subscribed
                continue
            # reading a prefix is I/O: done before the commit gate is taken
            state = await JUDGED.state_before(topic, msg.offset)
            checked = judge(topic, msg, state)
            JUDGED.advance(topic, msg.offset)
            EVENTS_IN.labels(msg.topic, CONSUMER).inc()
            if not checked.apply:
                out.append((msg, rejection(topic, msg, checked)))
        if not out:
            continue
        if _EOS:
            await GATE.enter()
        try:
            for msg, rejected in out:
                log.warning(
                    "%s: %s:%s:%s %s",
                    CONSUMER,
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    rejected.payload.reason,
                )
                token = SOURCE.set((msg.topic, msg.partition)) if _EOS else None
                try:
                    await emit(SECURITY_CHANGES_REJECTED, rejected)
                finally:
                    if token is not None:
                        SOURCE.reset(token)
        finally:
            if _EOS:
                GATE.leave()

"""Replay protection for verified messages: the (sender, message id) pairs decided within
the replay window.

A signature covers the message id and an issue time (agents/security/crypto.py), so a
captured signed message can only be sent again unchanged. `enforce_policy` denies it
(rule ``replay``) when its (sender, message id) was decided before *at another offset*:
the same record decided again is an at-least-once redelivery after a crash, and must get
the same decision as the first time. A message issued outside the window is denied by
its issue time (rule ``issued_at``), so entries older than the window can go.

``security_replay`` — {json [sender, message id]: {"p": partition, "o": offset, "at":
issued_at epoch seconds}}, a fold over `security.decisions` (every verified decision
records its issue time and where its message was read), so `agentstream rebuild` can
recompute it. Entries live in the changelog partition of the messages they come from:
the sender's partition, which `enforce_policy` requires of verified messages (rule
``misrouted``) — otherwise a replay put on another partition would be checked against
another worker's entries. The worker owning a partition deletes its entries once they are
past the window (plus a minute of clock skew between workers), as the LLM dedup tables
do (`streams.tables.llm.expired_keys`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from functools import cache
from typing import Any

import orjson
from mode.utils.collections import FastUserDict

from agentstream.agents.security.policy import Seen
from agentstream.schemas import Event
from agentstream.schemas.security import PolicyDecision
from agentstream.streams.tables import TableSpec, delete, register, write
from agentstream.streams.tables.llm import entry_expired, expired_keys, partition_of
from agentstream.streams.topics import SECURITY_DECISIONS

log = logging.getLogger(__name__)

TABLE = "security_replay"
#: kept past the window for clock skew between the workers that decide and sweep
SKEW_MARGIN_S = 60.0
_window_s = 300.0


def set_window(window_s: float) -> None:
    """The replay window in force (from the security config); entries expire after it."""
    global _window_s
    _window_s = window_s


def retention_s() -> float:
    return _window_s + SKEW_MARGIN_S


def replay_key(sender_id: str, message_id: str) -> str:
    # JSON, not a separator: ids are sender input and may contain any character
    return orjson.dumps([sender_id, message_id]).decode()


def sender_of(key: str) -> str:
    try:
        return str(orjson.loads(key)[0])
    except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
        return key


def entry(partition: int, offset: int, issued_at: float) -> dict[str, Any]:
    return {"p": partition, "o": offset, "at": int(issued_at)}


def lookup(store: Any) -> Callable[[str], Any]:
    """`store.get`, or for Faust's in-memory store the `get` of the dict behind it: the
    store's own is `Mapping.get`, which raises and catches a KeyError on every miss, and
    every new message is a miss. Its `__getitem__` is the dict's when the store has no
    `__missing__`, so both answer the same."""
    inner = getattr(store, "data", None)
    plain = isinstance(store, FastUserDict) and not hasattr(store, "__missing__")
    if plain and type(inner) is dict:
        return inner.get
    return store.get


def seen_of(value: Any) -> Seen | None:
    if not isinstance(value, dict):
        return None
    try:
        return Seen(int(value["p"]), int(value["o"]), float(value["at"]))
    except (KeyError, TypeError, ValueError):
        return None


def apply_decision(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    """The first decision of a verified (sender, message id) with an issue time wins:
    a redelivery decided again finds its own entry, a replay finds the first one."""
    d = event.payload
    if not isinstance(d, PolicyDecision) or not d.verified or d.issued_at is None:
        return
    if d.source_partition is None or d.source_offset is None:
        return
    key = replay_key(d.sender_id, d.message_id)
    if key not in state:
        state[key] = entry(d.source_partition, d.source_offset, d.issued_at.timestamp())


def _expired(value: Any, now: float) -> bool:
    return entry_expired(value, now, retention_s())


SPEC = register(
    TableSpec(
        name=TABLE,
        sources=(SECURITY_DECISIONS,),
        apply=apply_decision,
        description="Verified (sender, message id) pairs within the replay window",
        types=frozenset({PolicyDecision.TYPE}),
        expired=_expired,
    )
)


@cache
def table() -> Any:
    """The live Faust table (created on first use, in the worker)."""
    from agentstream.streams.app import app, settings

    return app.Table(
        TABLE,
        default=None,
        partitions=settings.topic_partitions,
        key_type=str,
        help=SPEC.description,
    )


def remember(key: str, value: dict[str, Any], partition: int) -> None:
    write(table(), key, value, partition=partition)


def expire(owned: set[int], partitions: int, now: float | None = None) -> int:
    """Delete the entries past the window in the partitions this worker owns."""
    t = table()
    now = time.time() if now is None else now
    keys = expired_keys(
        t.items(),
        now,
        retention_s(),
        lambda k: partition_of(sender_of(k), partitions) in owned,
    )
    for key in keys:
        delete(t, key, partition=partition_of(sender_of(key), partitions))
    if keys:
        log.info("enforce_policy: deleted %d replay entries past the window", len(keys))
    return len(keys)

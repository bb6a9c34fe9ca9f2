"""`streams.tables.restore`: the bulk restore decodes changelog records exactly as Faust's
own recovery does, for every table the agents declare, and applies them as Faust would
(tombstones delete, each key remembers its partition)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from faust.types import TP
from faust.types.tuples import Message

from agentstream.streams.tables.restore import bulk_capable, decode_batch

#: values every table's changelog could hold (or that a broken writer could have put
#: there): each is decoded by both paths, which must agree, or both fail
SAMPLES: list[bytes | None] = [
    orjson.dumps({"count": 3, "last_message_id": "m7", "at": 1.5}),
    orjson.dumps({"nested": {"list": [1, 2, {"a": None}]}, "__faust": {"ns": "nope"}}),
    orjson.dumps(42),
    orjson.dumps("text"),
    orjson.dumps([1, "two"]),
    b"not json",
    b"\xff\xfe",
    b"",
    None,
]
KEYS: list[bytes] = [b"agent-1", orjson.dumps("agent-1"), orjson.dumps(7), b"\xc3\xa9t\xc3\xa9"]


def _app_tables() -> dict[str, Any]:
    from agentstream.streams.app import app

    app.discover()
    assert app.tables, "no tables declared"
    return dict(app.tables.items())


class _Fetched:
    def __init__(self, key: bytes, value: bytes | None, offset: int) -> None:
        self.key, self.value, self.offset = key, value, offset


def _by_faust(app: Any, table: Any, key: bytes, value: bytes | None) -> tuple[Any, Any]:
    """What Faust's recovery gets: the changelog topic's schema decoding the message."""
    schema = table.changelog_topic.schema
    message = Message(
        topic=table.changelog_topic.get_topic_name(),
        partition=0,
        offset=0,
        timestamp=0.0,
        timestamp_type=0,
        headers=[],
        key=key,
        value=value,
        checksum=None,
    )
    k = schema.loads_key(app, message)
    v = None if value is None else schema.loads_value(app, message)
    return k, v


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception:
        return "error", None


@pytest.mark.parametrize("name", sorted(_app_tables()))
def test_bulk_decoding_equals_fausts_for_every_table(name: str) -> None:
    table = _app_tables()[name]
    app = table.app
    compared = 0
    for key in KEYS:
        for value in SAMPLES:
            faust_side = _outcome(lambda: _by_faust(app, table, key, value))  # noqa: B023
            ours = _outcome(
                lambda: (
                    (r.key, r.value)
                    for r in decode_batch(app, table, 0, [_Fetched(key, value, 0)])  # noqa: B023
                ).__next__()
            )
            assert ours == faust_side, (name, key, value)
            compared += faust_side[0] == "ok"
    assert compared, f"{name}: no sample decodes at all"


def test_every_agent_table_restores_in_bulk() -> None:
    """A table left to Faust's per-record path would be silently slow, not wrong: keep
    the agents' tables on the bulk path."""
    tables = _app_tables()
    assert all(bulk_capable(t) for t in tables.values()), [
        n for n, t in tables.items() if not bulk_capable(t)
    ]


def test_applied_batch_sets_deletes_and_remembers_partitions() -> None:
    table = _app_tables()["accepted_by_sender"]
    app = table.app
    store = table.data
    store.data.clear()
    fetched = [
        _Fetched(b"a", orjson.dumps({"n": 1}), 0),
        _Fetched(b"b", orjson.dumps({"n": 2}), 1),
        _Fetched(b"a", None, 2),  # a tombstone removes "a"
        _Fetched(b"c", orjson.dumps({"n": 3}), 3),
    ]
    table.apply_changelog_batch(decode_batch(app, table, 2, fetched))
    assert dict(store.data) == {"b": {"n": 2}, "c": {"n": 3}}
    assert store._key_partition["b"] == 2
    # keys of partitions this worker no longer holds go at the end of recovery, as with
    # Faust's own path
    import asyncio

    asyncio.run(store.on_recovery_completed({TP(table.changelog_topic.get_topic_name(), 0)}, set()))
    assert dict(store.data) == {}

"""The design's CommunicationTracker over the `comms_records` table.

Storing (`fold_record`, in `streams.tables.monitoring`): one table entry per record, keyed
``r␟agent␟kind␟time␟record-id``, and per agent a ``c␟agent`` entry with the number of
retained records per kind. A record already stored (same id and time — a replay) is not
counted twice. Records older than `comms_retention_s` relative to the agent's newest
record are deleted by the fold, and so is an agent (its records and counts) with no
record for `comms_retention_s` by its partition's append clock; queries also hide
records older than the retention relative to the wall clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentstream.schemas.comms import COMM_KINDS
from agentstream.streams.tables.monitoring import SEP, count_key, fold_record, split_record_key

__all__ = ["COMM_KINDS", "counts", "fold_record", "query"]


def query(
    items: Iterable[tuple[str, Any]],
    *,
    agent_id: str | None = None,
    kind: str | None = None,
    since: float | None = None,
    until: float | None = None,
    now: float | None = None,
    retention_s: float | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Records matching every given filter, oldest first (at most `limit`, the newest)."""
    floor = now - retention_s if now is not None and retention_s is not None else None
    lo = max(x for x in (since, floor, float("-inf")) if x is not None)
    prefix = f"r{SEP}{agent_id}{SEP}" if agent_id is not None else f"r{SEP}"
    out = []
    for key, value in items:
        if value is None or not str(key).startswith(prefix):
            continue
        parsed = split_record_key(key)
        if parsed is None:
            continue
        _agent, k, ts, _rid = parsed
        if kind is not None and k != kind:
            continue
        if ts < lo or (until is not None and ts >= until):
            continue
        out.append(value)
    out.sort(key=lambda r: (r["recorded_at"], r["agent_id"], r["record_id"]))
    return out[-limit:] if limit and len(out) > limit else out


def counts(
    items: Iterable[tuple[str, Any]], *, agent_id: str | None = None
) -> dict[str, dict[str, int]]:
    """agent → {kind: retained records}."""
    out: dict[str, dict[str, int]] = {}
    want = count_key(agent_id) if agent_id is not None else None
    for key, value in items:
        key = str(key)
        if not key.startswith(f"c{SEP}") or (want is not None and key != want):
            continue
        out[key[2:]] = {k: int(v) for k, v in (value or {}).items() if int(v)}
    return out

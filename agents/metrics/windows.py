"""Windowed aggregates of metric samples: reading them back.

The fold that builds the windows lives with the table (`streams.tables.monitoring`,
`fold_sample`): each sample lands in the window ``[floor(ts / interval) * interval, +interval)``
of its series and label set, which keeps count, sum, min, max and the last value. Windows
whose end is more than the retention older than the newest sample of the same series and
label set are deleted by the fold, and so is a series and label set not seen for the
retention by its partition's append clock; the readers below also hide windows older
than the retention relative to the wall clock (a series that stopped reporting, in a
partition that gets no other sample, ages out of the views all the same).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import Any

from agentstream.streams.tables.monitoring import (
    SEP,
    fold_sample,
    labels_key,
    make_metrics_fold,
    split_window_key,
)

__all__ = [
    "exported_series",
    "fold_sample",
    "labels_key",
    "latest_values",
    "make_metrics_fold",
    "series_between",
]


def _matches(labels: Mapping[str, str], wanted: Mapping[str, str] | None) -> bool:
    return not wanted or all(labels.get(k) == v for k, v in wanted.items())


def series_between(
    items: Iterable[tuple[str, Any]],
    series: str,
    start: float,
    end: float,
    *,
    labels: Mapping[str, str] | None = None,
    now: float | None = None,
    retention_s: float | None = None,
) -> list[dict[str, Any]]:
    """Windows of `series` overlapping [start, end), oldest first; `labels` filters on a
    subset of the label set."""
    floor = now - retention_s if now is not None and retention_s is not None else None
    out = []
    for key, value in items:
        parsed = split_window_key(key)
        if parsed is None or parsed[0] != series or value is None:
            continue
        w_start, w_end = float(value["start"]), float(value["end"])
        if w_end <= start or w_start >= end:
            continue
        if floor is not None and w_end <= floor:
            continue
        if not _matches(value.get("labels") or {}, labels):
            continue
        w = dict(value)
        w["avg"] = float(value["sum"]) / int(value["count"]) if value["count"] else None
        out.append(w)
    out.sort(key=lambda w: (w["start"], labels_key(w.get("labels") or {})))
    return out


def latest_values(
    items: Iterable[tuple[str, Any]], *, now: float | None = None, retention_s: float | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """(series, labels-json) → the newest window's record (its `last` is the latest value)."""
    floor = now - retention_s if now is not None and retention_s is not None else None
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in items:
        parsed = split_window_key(key)
        if parsed is None or value is None:
            continue
        if floor is not None and float(value["end"]) <= floor:
            continue
        group = (parsed[0], parsed[1])
        cur = best.get(group)
        if cur is None or float(value["last_ts"]) >= float(cur["last_ts"]):
            best[group] = value
    return best


def exported_series(
    items: Iterable[tuple[str, Any]], *, now: float, retention_s: float, limit: int
) -> tuple[list[tuple[str, str, float]], int]:
    """What `agentstream_series_last_value` exports: (series, labels-json, latest value)
    of at most `limit` series and label sets, the first ones in (series, labels) order,
    and how many more there were.

    The table holds as many label sets as producers invent, and a scrape of every one
    made Prometheus a series each (and the text of the answer as large as the table):
    beyond `limit` they are counted, not exported. The order keeps the choice stable
    from one scrape to the next, so no exported series flaps."""
    latest = latest_values(items, now=now, retention_s=retention_s)
    kept = sorted(latest) if len(latest) <= limit else heapq.nsmallest(limit, latest)
    return [(s, lk, float(latest[(s, lk)]["last"])) for s, lk in kept], len(latest) - len(kept)


def group_name(series: str, labels_json: str) -> str:
    return f"{series}{SEP}{labels_json}"

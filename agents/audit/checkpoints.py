"""Checkpoints: every worker periodically (`AGENTSTREAM_CHECKPOINT_INTERVAL_S`) and on
demand (`POST /checkpoints`, `agentstream checkpoints take`) writes a `CheckpointWritten`
with the digest and size of each table it holds and the committed offsets of the table
sources it consumes, to `pipeline.checkpoints`.

A digest covers the keys this worker holds (its active partitions and standbys); the
offsets are the *committed* ones, so the state covers at least the events before them
(it may already include some after them, processed but not yet committed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

from faust.web import View

from agentstream.schemas import CheckpointWritten, Event, utc_now
from agentstream.streams.app import app, settings
from agentstream.streams.processing import emit
from agentstream.streams.replay import ReplayRecord, replay
from agentstream.streams.settings import Settings
from agentstream.streams.tables import TABLES, digest
from agentstream.streams.topics import PIPELINE_CHECKPOINTS
from agentstream.streams.web_cluster import gather, is_local, is_restoring, restoring

log = logging.getLogger(__name__)
SOURCE = "checkpointer"


def snapshot(
    tables: Any,
    assigned: Sequence[Any],
    committed: dict[Any, int | None],
    *,
    reason: str,
    worker_id: str,
) -> CheckpointWritten:
    """A checkpoint of `tables` (name → mapping) and the committed offsets of the
    assigned partitions of their sources; pure, so tests build one from plain dicts."""
    digests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    sources: set[str] = set()
    for name, spec in sorted(TABLES.items()):
        table = tables.get(name)
        if table is None:
            continue
        items = spec.comparable_items(table.items())
        digests[name] = digest(items)
        sizes[name] = len(items)
        sources.update(settings.topic(s) for s in spec.sources)
    offsets: dict[str, int] = {}
    for tp in assigned:
        off = committed.get(tp)
        if tp.topic in sources and off is not None:
            offsets[f"{tp.topic}:{tp.partition}"] = int(off)
    return CheckpointWritten(
        checkpoint_id=uuid4().hex,
        worker_id=worker_id,
        taken_at=utc_now(),
        tables=digests,
        sizes=sizes,
        offsets=offsets,
        reason=reason,
    )


async def write_checkpoint(reason: str = "on_demand") -> CheckpointWritten:
    consumer = app.consumer
    assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
    committed = dict(getattr(consumer, "_committed_offset", {}) or {})
    cp = snapshot(app.tables, assigned, committed, reason=reason, worker_id=settings.worker_id)
    await emit(PIPELINE_CHECKPOINTS, Event.of(cp, source=SOURCE))
    return cp


@app.timer(settings.checkpoint_interval_s)
async def periodic_checkpoint() -> None:
    await take_periodic_checkpoint()


async def take_periodic_checkpoint() -> None:
    if is_restoring():
        # tables being restored (or not yet assigned) would be checkpointed half empty:
        # digests no rebuild matches; the next interval takes it
        log.info("periodic checkpoint skipped: this worker's tables are being restored")
        return
    try:
        await write_checkpoint("periodic")
    except Exception:  # a failed checkpoint must not stop the worker; the next one retries
        log.exception("periodic checkpoint failed")


#: a preview's digests are reused this long: each one lists, sorts, serialises and hashes
#: every table on the event loop, and a reader polling GET /checkpoints (which asks every
#: worker) stalled processing and the group heartbeats of all of them
PREVIEW_REUSE_S = 5.0
_previewed: list[tuple[float, CheckpointWritten]] = []


def _preview() -> CheckpointWritten:
    now = time.monotonic()
    if _previewed and now - _previewed[0][0] < PREVIEW_REUSE_S:
        return _previewed[0][1]
    cp = _snapshot_now()
    _previewed[:] = [(time.monotonic(), cp)]
    return cp


def _snapshot_now() -> CheckpointWritten:
    consumer = app.consumer
    return snapshot(
        app.tables,
        list(consumer.assignment()),
        dict(getattr(consumer, "_committed_offset", {}) or {}),
        reason="preview",
        worker_id=settings.worker_id,
    )


@app.page("/checkpoints")
class CheckpointsView(View):
    """GET: this worker's current digests (nothing written), and every other worker's in
    ``by_worker`` (``?local=1``: this worker's only); POST: this worker writes a
    checkpoint (each worker checkpoints the tables it holds: ask each one)."""

    async def get(self, request: Any) -> Any:
        refused = restoring(self)  # digests of tables still being restored
        if refused is not None:
            return refused
        body = _preview().model_dump(mode="json")
        if is_local(request):
            return self.json(body)
        got = await gather(request, body)
        return self.json({**body, "by_worker": dict(got.answers), **got.meta()})

    async def post(self, request: Any) -> Any:
        refused = restoring(self)
        if refused is not None:
            return refused
        cp = await write_checkpoint("on_demand")
        return self.json(cp.model_dump(mode="json"))


async def list_checkpoints(
    cfg: Settings, since: Any = None, until: Any = "now", worker: str | None = None
) -> list[tuple[ReplayRecord, CheckpointWritten]]:
    out = []
    async for rec in replay(
        cfg, [PIPELINE_CHECKPOINTS], since=since, until=until, agent=worker, include_invalid=False
    ):
        ev = rec.event_or_none()
        if ev is not None and isinstance(ev.payload, CheckpointWritten):
            out.append((rec, ev.payload))
    return out

"""The replay and recovery stage.

``replay_eps``: `streams.replay.replay` over the run's N events on
`agent.messages.accepted` (group-less consumer, k-way merge of all partitions, filters
off), each written as a JSON line to a file — what `agentstream replay --out FILE` does.
Goal: at least half of ``raw_consume_eps`` (the bare aiokafka consumer of the core stage).

``recovery_rps``: a worker running only `agents.audit` folds the N events into its table
(one changelog record each); a second worker is then started on the same app id and the
changelog records it restores are divided by the time its recovery took: from the
recovery's "Highwater for active changelog partitions" log line (it has asked the broker
where the changelogs end, and starts reading) to its "Recovery complete" — the bulk
restore (`streams.tables.restore`) and whatever Faust's own recovery reads after it.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from agentstream.streams.replay import replay_batches
from agentstream.streams.settings import Settings
from agentstream.streams.topics import AGENT_MESSAGES_ACCEPTED
from bench.context import BenchContext, BenchError, log

NAME = "replay"
STAGE_TIMEOUT_S = 300.0
_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


async def run(ctx: BenchContext) -> dict[str, float]:
    env = ctx.new_env(
        AGENTSTREAM_AGENTS="audit",
        AGENTSTREAM_LOG_LEVEL="INFO",
        AGENTSTREAM_CHECKPOINT_INTERVAL_S="3600",
    )
    await ctx.ensure_topics(env)
    values, keys = ctx.payloads()
    n = len(values)
    source = ctx.topic(env, AGENT_MESSAGES_ACCEPTED)
    await ctx.produce(source, values, keys)
    out: dict[str, float] = {}

    settings = Settings.from_env(env)
    path = Path(ctx.work_dir) / "replay.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    t0 = time.monotonic()
    with path.open("wb") as fh:
        pending: list[bytes] = []
        async for batch in replay_batches(
            settings, [AGENT_MESSAGES_ACCEPTED], since=None, until=None
        ):
            pending.extend(rec.json_line() for rec in batch)
            if len(pending) >= 2000:
                fh.write(b"".join(pending))
                written += len(pending)
                pending.clear()
        fh.write(b"".join(pending))
        written += len(pending)
    elapsed = time.monotonic() - t0
    if written != n:
        raise BenchError(f"replay wrote {written} of {n} records")
    out["replay_eps"] = n / elapsed
    raw = ctx.results.get("raw_consume_eps")
    ratio = f" ({out['replay_eps'] / raw:.0%} of raw consume)" if isinstance(raw, float) else ""
    log(f"replay: {out['replay_eps']:,.0f} ev/s to {path}{ratio}")

    changelog = f"{env['AGENTSTREAM_APP_ID']}-accepted_by_sender-changelog"
    first = ctx.start_worker(env)
    try:
        await ctx.wait_for_count(changelog, n, STAGE_TIMEOUT_S)
    finally:
        first.stop()
    records = await ctx.count(changelog)
    second = ctx.start_worker(env)
    try:
        await second.wait_ready(STAGE_TIMEOUT_S)
        span = restore_span(second.log_path.read_text(errors="replace"))
    finally:
        second.stop()
    out["recovery_rps"] = records / max(span, 1e-3)
    log(
        f"replay: restored {records:,} changelog records in {span:.2f}s "
        f"= {out['recovery_rps']:,.0f} rec/s"
    )
    return out


def restore_span(log_text: str) -> float:
    """Seconds from the start of the changelog restore to its end, from the worker's log."""
    start = end = None
    for line in log_text.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        if start is None and "Highwater for active changelog partitions" in line:
            start = _parse(m.group(1))
        elif start is not None and "Recovery complete" in line:
            end = _parse(m.group(1))
            break
    if start is None or end is None:
        raise BenchError("no changelog restore in the worker's log")
    return (end - start).total_seconds()


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")

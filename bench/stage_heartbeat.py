"""The heartbeat monitor stage: 10,000 agents on one worker with the default settings.

1. ``heartbeat_eps``: `agent.heartbeats` is pre-filled with ROUNDS rounds of heartbeats
   for AGENTS agents, then a worker running only `agents.heartbeat` starts. Every
   accepted heartbeat is one write to the `agent_heartbeats` table, i.e. one record on
   its changelog; and the monitor decides nothing before it has caught up with the
   backlog, so the changelog's growth is exactly the heartbeats folded. Timed from the
   first changelog record to the last (start-up excluded). 10,000 agents beating every
   5 s need 2,000/s.
2. ``down_detection_delay_s``: once caught up, one fresh round of heartbeats is sent
   (every agent comes up: 10,000 `AgentStatusChanged`), then silence. The delay is from
   that last heartbeat to the moment the 10,000th ``down`` event is on `agent.status` —
   the timeout (15 s) plus up to one check interval (5 s) plus the cost of the check
   and of publishing 10,000 events.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from agentstream.schemas import Event, Heartbeat, encode
from agentstream.streams.topics import AGENT_HEARTBEATS, AGENT_STATUS
from bench.context import BenchContext, log

NAME = "heartbeat"
AGENTS = 10_000
ROUNDS = 6
TIMEOUT_S = 15.0
INTERVAL_S = 5.0


def heartbeats(round_no: int, sent_at: float) -> tuple[list[bytes], list[bytes]]:
    values, keys = [], []
    when = datetime.fromtimestamp(sent_at, UTC)
    for i in range(AGENTS):
        agent = f"bench-agent-{i:05d}"
        hb = Heartbeat(agent_id=agent, sent_at=when, sequence=round_no)
        values.append(encode(Event.of(hb, source=agent)))
        keys.append(agent.encode())
    return values, keys


async def run(ctx: BenchContext) -> dict[str, float]:
    env = ctx.new_env(
        AGENTSTREAM_AGENTS="heartbeat",
        AGENTSTREAM_HEARTBEAT_INTERVAL_S=str(INTERVAL_S),
        AGENTSTREAM_HEARTBEAT_TIMEOUT_S=str(TIMEOUT_S),
        AGENTSTREAM_HEARTBEAT_MAX_MISSED="3",
    )
    await ctx.ensure_topics(env)
    source = ctx.topic(env, AGENT_HEARTBEATS)
    status = ctx.topic(env, AGENT_STATUS)
    changelog = f"{env['AGENTSTREAM_APP_ID']}-agent_heartbeats-changelog"

    base = time.time() - 60.0
    backlog = AGENTS * ROUNDS
    for r in range(ROUNDS):
        values, keys = heartbeats(r, base + r * INTERVAL_S)
        await ctx.produce(source, values, keys)
    log(f"heartbeat: {backlog} heartbeats of {AGENTS} agents pre-filled")
    # The monitor dates a heartbeat by the broker's append time, not by its sent_at: the
    # backlog is stale (brings nobody up, so each agent has one "up" and one "down"
    # below) only once it was appended more than the timeout ago.
    await asyncio.sleep(TIMEOUT_S + INTERVAL_S)

    worker = ctx.start_worker(env)
    try:
        measured = await ctx.watch_count(changelog, backlog, 600, worker=worker)
        out: dict[str, float] = {"heartbeat_eps": measured.eps}
        log(f"heartbeat: folded {out['heartbeat_eps']:,.0f} heartbeats/s")

        # the monitor decides after catching up; stale backlog beats bring nobody up
        values, keys = heartbeats(ROUNDS, time.time())
        t_last = time.monotonic()
        await ctx.produce(source, values, keys)
        await ctx.wait_for_count(status, AGENTS, 120)
        log("heartbeat: all agents up; silence")
        t_down = await ctx.wait_for_count(status, 2 * AGENTS, 120)
        out["down_detection_delay_s"] = t_down - t_last
        log(
            f"heartbeat: last of {AGENTS} down events {out['down_detection_delay_s']:.2f}s "
            f"after the last heartbeat (timeout {TIMEOUT_S:g}s, interval {INTERVAL_S:g}s)"
        )
        worker.check_alive()
        return out
    finally:
        worker.stop()

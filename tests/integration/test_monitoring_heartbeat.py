"""Agent status on the real broker: exactly one AgentStatusChanged per transition, across
a worker restart, with the views and the CLI answering over HTTP."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import murmur2

from agentstream.schemas import (
    AgentStatusChanged,
    ComponentHealthChanged,
    DeadLetter,
    Event,
    Heartbeat,
    encode,
)
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import (
    Follower,
    Worker,
    assert_rebuild_equal,
    await_until,
    cancel,
    cli,
    web_tokens,
)

pytestmark = pytest.mark.integration

HEARTBEATS = "agent_heartbeats"


class Beater:
    """Sends a heartbeat for every active agent every `period` seconds."""

    def __init__(self, client: AsyncClient, period: float = 0.2) -> None:
        self.client = client
        self.period = period
        self.active: set[str] = set()
        self.seq = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.seq += 1
            for agent in sorted(self.active):
                hb = Heartbeat(agent_id=agent, sent_at=datetime.now(UTC), sequence=self.seq)
                await self.client.publish("agent.heartbeats", hb, wait=False)
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel(self.task)


def by_agent(changes: list[AgentStatusChanged]) -> dict[str, list[tuple[Any, str]]]:
    out: dict[str, list[tuple[Any, str]]] = {}
    for c in changes:
        out.setdefault(c.agent_id, []).append((c.previous, c.current))
    return out


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_transitions_exactly_once_across_restarts(
    settings_env: dict[str, str], tmp_path: Path, guarantee: str
) -> None:
    # under exactly-once the status topic ends in transaction markers, and the timer's
    # transitions are sent outside any input's batch
    env = {
        **settings_env,
        "AGENTSTREAM_PROCESSING_GUARANTEE": guarantee,
        "AGENTSTREAM_AGENTS": "heartbeat,health",
        # Short enough to keep the test quick, long enough that a loaded 2-core CI
        # machine stalling the beater or the worker for a second is not a real silence.
        "AGENTSTREAM_HEARTBEAT_INTERVAL_S": "0.5",
        "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "3",
        "AGENTSTREAM_HEARTBEAT_MAX_MISSED": "6",
    }
    settings = Settings.from_env(env)
    base = f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}"
    log = tmp_path / "worker.log"
    worker = Worker(env, log)
    await asyncio.to_thread(worker.start)
    client = AsyncClient(settings, source="test")
    await client.start()
    beater = Beater(client)
    http = httpx.AsyncClient(base_url=base, timeout=10, headers=web_tokens(env).headers())

    follower = Follower(settings, ["agent.status", "pipeline.health"])

    def statuses() -> list[AgentStatusChanged]:
        return follower.payloads(AgentStatusChanged)

    async def count_status(n: int) -> bool:
        # a's and b's only: the x* backlog agents may come up (and go down) after the
        # restart too, depending on how fast the worker reads their heartbeats
        return len([c for c in statuses() if not c.agent_id.startswith("x")]) >= n

    async def deciding() -> bool:
        r = await http.get("/agents/status")
        return r.status_code == 200 and r.json()["deciding"]

    try:
        await follower.start()
        beater.active = {"a", "b"}
        beater.start()
        await await_until(lambda: count_status(2), 30, 0.5, "a and b up")
        beater.active = {"a"}
        await await_until(lambda: count_status(3), 30, 0.5, "b down")
        assert by_agent(statuses()) == {
            "a": [(None, "up")],
            "b": [(None, "up"), ("up", "down")],
        }

        # the views and the CLI
        r = await http.get("/agents/status/b")
        assert r.status_code == 200 and r.json()["status"] == "down"
        assert r.json()["missed_beats"] >= 3
        assert (await http.get("/agents/status/nobody")).status_code == 404
        listing = (await http.get("/agents/status", params={"state": "up"})).json()
        assert [x["agent_id"] for x in listing["agents"]] == ["a"]
        out = await asyncio.to_thread(cli, env, "agents", "status", "b")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:2] == ["b", "down"]
        ready = await http.get("/ready")
        body = ready.json()
        assert ready.status_code == 200, body
        assert body["components"]["agents"]["status"] == "degraded"
        assert body["components"]["broker"]["status"] == "ok"
        assert body["components"]["tables"]["status"] == "ok"
        assert (await http.get("/health")).json()["status"] == "alive"
        metrics = (await http.get("/metrics")).text
        assert 'agentstream_agents{state="down"} 1.0' in metrics

        # graceful restart while a keeps beating and b stays silent: nothing to publish.
        # A backlog of other agents' heartbeats queued meanwhile delays a's newest beats
        # past the timeout: deciding before catching up would mark a down (and up again).
        await asyncio.to_thread(worker.stop)
        backlog = [
            Heartbeat(agent_id=f"x{i}", sent_at=datetime.now(UTC), sequence=n)
            for n in range(10)
            for i in range(1000)
        ]
        await client.publish_many("agent.heartbeats", backlog)
        await asyncio.to_thread(worker.start)
        await await_until(deciding, 60, 0.3, "monitor deciding after restart")
        beater.active = {"a", "b"}
        await await_until(lambda: count_status(4), 30, 0.5, "b back up")

        # (a kill -9 restart is not run here: the broker only reassigns the dead member's
        # partitions after the 60 s session timeout; tests/unit/test_heartbeat_monitor.py
        # covers the crash between publishing and folding a transition)
        beater.active = {"b"}
        await await_until(lambda: count_status(5), 30, 0.5, "a down")
        # a duplicate caused by a restart would be published when the monitor starts
        # deciding, i.e. before a's silence reaches the timeout: it would be here already
        changes = [c for c in statuses() if not c.agent_id.startswith("x")]
        for agent, seq in by_agent(statuses()).items():
            if agent.startswith("x"):  # judged after its beats expired, or up then down
                assert seq in ([], [(None, "up")], [(None, "up"), ("up", "down")]), seq
        assert by_agent(changes) == {
            "a": [(None, "up"), ("up", "down")],
            "b": [(None, "up"), ("up", "down"), ("down", "up")],
        }, changes
        reasons = [c.reason for c in changes if c.agent_id == "b"]
        assert reasons[0] == "first_seen" and reasons[2] == "heartbeat"
        assert reasons[1] in ("timeout", "missed_beats")

        # degradation of the "agents" component was published for audit
        health = follower.payloads(ComponentHealthChanged)
        agent_changes = [c for c in health if c.component == "agents"]
        assert any(c.current == "degraded" for c in agent_changes), agent_changes
        assert not follower.undecodable, follower.undecodable[:3]
        assert worker.alive(), worker.tail()

        # quiesce (everyone silent and down, the last transition folded back), then a
        # rebuild of the table from both source topics equals the live table
        await beater.stop()

        async def settled() -> bool:
            # every transition the monitor decided is folded back into the table (the
            # x* agents' too: one published but not yet folded when the worker stops is
            # in agent.status, hence in the rebuild, but not yet in the changelog)
            body = (await http.get("/agents/status")).json()
            agents = body["agents"]
            ours = [x for x in agents if not x["agent_id"].startswith("x")]
            return (
                bool(ours)
                and all(x["confirmed_status"] == "down" for x in ours)
                and all(x["status"] == x["confirmed_status"] for x in agents)
                and not any(x["confirmed_status"] == "up" for x in agents)
            )

        await await_until(settled, 45, 0.3, "every agent down and folded")
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(
            assert_rebuild_equal,
            {**env, "AGENTSTREAM_AGENTS": "heartbeat,audit"},
            "agent_heartbeats",
        )
    finally:
        await beater.stop()
        await follower.stop()
        await http.aclose()
        await client.stop()
        worker.stop()


async def test_invented_agent_ids_are_bounded_and_expire(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """A producer inventing an agent id per heartbeat: each partition of the table holds
    at most AGENTSTREAM_HEARTBEAT_MAX_AGENTS_PER_PARTITION agents (the rest are dead
    letters, and the agents already held are not pushed out); agents silent for
    AGENTSTREAM_HEARTBEAT_EXPIRE_S by their partition's append clock leave it, which
    makes room again; a heartbeat keyed for another agent is refused; and a rebuild
    from the topics equals the live table."""
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "heartbeat",
        "AGENTSTREAM_HEARTBEAT_INTERVAL_S": "0.5",
        "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "3",
        "AGENTSTREAM_HEARTBEAT_MAX_MISSED": "6",
        "AGENTSTREAM_HEARTBEAT_EXPIRE_S": "35",  # the least allowed: 10 x (3 + 0.5)
        "AGENTSTREAM_HEARTBEAT_MAX_AGENTS_PER_PARTITION": "3",
    }
    settings = Settings.from_env(env)
    n = settings.topic_partitions

    def home(agent: str) -> int:
        return (murmur2(agent.encode()) & 0x7FFFFFFF) % n

    keepers = [
        next(f"keeper-{p}-{i}" for i in range(1000) if home(f"keeper-{p}-{i}") == p)
        for p in range(n)
    ]
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    client = AsyncClient(settings, source="test")
    await client.start()
    beater = Beater(client)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}",
        timeout=10,
        headers=web_tokens(env).headers(),
    )
    follower = Follower(settings, ["pipeline.deadletter"])

    async def agents() -> dict[str, dict[str, Any]]:
        r = await http.get("/agents/status")
        body = r.json()
        return {a["agent_id"]: a for a in body["agents"]} if body.get("deciding") else {}

    def refusals(word: str) -> list[DeadLetter]:
        return [d for d in follower.payloads(DeadLetter) if word in d.error_message]

    try:
        await follower.start()
        beater.active = set(keepers)  # one agent per partition, beating throughout
        beater.start()
        await await_until(lambda: _has(agents, keepers, "up"), 60, 0.3, "the keepers up")
        invented = [f"x-{i}" for i in range(40)]
        await client.publish_many(
            "agent.heartbeats",
            [Heartbeat(agent_id=a, sent_at=datetime.now(UTC)) for a in invented],
        )
        # a heartbeat of a keeper sent under another key: refused, whatever it says
        forged = Event.of(Heartbeat(agent_id=keepers[0], sent_at=datetime.now(UTC)), source="x")
        # (sent raw: the client itself refuses another key on this topic)
        await client.publish_raw("agent.heartbeats", encode(forged), key=b"mallory")
        await await_until(lambda: len(refusals("key mismatch")) == 1, 30, 0.3, "key refused")
        held = n * 3 - len(keepers)
        await await_until(
            lambda: len(refusals("table full")) == len(invented) - held, 30, 0.3, "refusals"
        )
        table = await agents()
        assert set(keepers) <= set(table) and len(table) == n * 3, sorted(table)
        assert sum(1 for a in table if a.startswith("x-")) == held
        # the keepers' partitions' clocks move on; the invented ones, silent, go down,
        # then leave the table (no keeper is ever refused or pushed out)
        await await_until(lambda: _only(agents, keepers), 90, 0.5, "the invented agents expired")
        assert all(t["status"] == "up" for t in (await agents()).values())
        # which made room: a new agent is taken again
        beater.active = {*keepers, "late-comer"}
        await await_until(lambda: _has(agents, ["late-comer"], "up"), 30, 0.3, "room again")
        await beater.stop()
        assert worker.alive(), worker.tail()

        async def settled() -> bool:  # every transition folded back: none on its way
            table = await agents()
            return bool(table) and all(
                t["status"] == t["confirmed_status"] == "down" for t in table.values()
            )

        await await_until(settled, 30, 0.3, "every agent down and folded")
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(
            assert_rebuild_equal, {**env, "AGENTSTREAM_AGENTS": "heartbeat,audit"}, HEARTBEATS
        )
    finally:
        await beater.stop()
        await follower.stop()
        await http.aclose()
        await client.stop()
        worker.stop()


async def _has(agents: Any, ids: list[str], status: str) -> bool:
    table = await agents()
    return all(table.get(a, {}).get("status") == status for a in ids)


async def _only(agents: Any, ids: list[str]) -> bool:
    table = await agents()
    return bool(table) and set(table) == set(ids)

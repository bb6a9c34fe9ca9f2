"""Web views answer for the whole cluster: two workers in one consumer group, each owning
one partition, no standby copies; every key-based view answers for every key on BOTH
workers (forwarded to the owner), and the aggregate views list every key on either."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentstream.schemas import CommunicationRecord, Heartbeat, MetricSample
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from agentstream.streams.tables.llm import partition_of
from tests.support import Worker, await_until, web_tokens

pytestmark = pytest.mark.integration

PARTITIONS = 2


def spread(prefix: str, count: int) -> list[str]:
    """`count` keys, at least one in each partition (Kafka's default partitioner)."""
    keys: list[str] = []
    i = 0
    while len(keys) < count or {partition_of(k, PARTITIONS) for k in keys} != {0, 1}:
        keys.append(f"{prefix}{i}")
        i += 1
    return keys


async def two_workers(
    settings_env: dict[str, str], tmp_path: Path, agents: str, **extra: str
) -> tuple[Settings, list[str], Worker, Worker]:
    """Two started workers of one group on `PARTITIONS` partitions, each with its own web
    port and data dir, and no standby copies: a worker holds nothing of the other's
    partitions, so an answer for a key it does not own can only have come from the owner."""
    from tests.conftest import _free_port

    base = {
        **settings_env,
        "AGENTSTREAM_AGENTS": agents,
        "AGENTSTREAM_TOPIC_PARTITIONS": str(PARTITIONS),
        "AGENTSTREAM_STANDBY_REPLICAS": "0",
        "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "3600",
        **extra,
    }
    env1 = {**base, "AGENTSTREAM_DATA_DIR": str(tmp_path / "w1")}
    env2 = {
        **base,
        "AGENTSTREAM_DATA_DIR": str(tmp_path / "w2"),
        "AGENTSTREAM_WEB_PORT": str(_free_port()),
    }
    urls = [f"http://127.0.0.1:{e['AGENTSTREAM_WEB_PORT']}" for e in (env1, env2)]
    w1 = Worker(env1, tmp_path / "w1.log")
    w2 = Worker(env2, tmp_path / "w2.log")
    await asyncio.to_thread(w1.start)
    await asyncio.to_thread(w2.start)
    return Settings.from_env(env1), urls, w1, w2


async def test_both_workers_answer_for_every_key(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings, urls, w1, w2 = await two_workers(
        settings_env,
        tmp_path,
        "heartbeat,metrics,comms,llm",
        # the killed worker must stay a member while its absence is checked (below)
        AGENTSTREAM_BROKER_SESSION_TIMEOUT_S="60",
    )
    http = httpx.AsyncClient(timeout=10, headers=web_tokens(settings_env).headers())
    try:
        # publish once both workers own a partition (Faust's /router/, on each): a worker
        # that folded records of a partition before handing it over keeps them in memory
        async def assigned() -> bool:
            for u in urls:
                r = await http.get(u + "/router/")
                if r.status_code != 200:
                    return False
                owning = {url for url, topics in r.json().items() if any(topics.values())}
                if owning != set(urls):
                    return False
            return True

        await await_until(assigned, 90, interval=0.5, what="a partition on each worker")
        agents = spread("agent-", 6)
        series = spread("series.", 4)
        requests = spread("req-", 4)
        now = datetime.now(UTC)
        async with AsyncClient(settings, source="test") as client:
            await client.publish_many(
                "agent.heartbeats",
                [Heartbeat(agent_id=a, sent_at=now, sequence=1) for a in agents],
            )
            await client.publish_many(
                "metrics.samples",
                [MetricSample(series=s, timestamp=time.time(), value=1.0) for s in series],
            )
            await client.publish_many(
                "comms.records",
                [
                    CommunicationRecord(
                        record_id=f"rec-{a}",
                        kind="token",
                        agent_id=a,
                        counterparty="peer",
                        recorded_at=now,
                        amount=1.0,
                        unit="tok",
                    )
                    for a in agents
                ],
            )
            await client.publish_many(
                "llm.requests",
                [
                    LLMRequest(
                        request_id=r,
                        agent_id="asker",
                        stream=False,
                        context=LLMContext(messages=[ChatMessage(role="user", content=r)]),
                        config=LLMConfig(model="local", max_tokens=16),
                    )
                    for r in requests
                ],
            )

        seen: dict[str, Any] = {}

        async def get(url: str, path: str, **params: str) -> httpx.Response:
            r = await http.get(url + path, params=params)
            seen[f"{url}{path}?{params}"] = (r.status_code, r.text[:300])
            return r

        # -- the keys are split: each worker's own share (?local=1) is a part of them ------
        async def split() -> bool:
            shares = []
            for u in urls:
                r = await get(u, "/agents/status", local="1")
                shares.append({d["agent_id"] for d in r.json()["agents"]})
            return (
                all(0 < len(share) < len(agents) for share in shares)
                and not shares[0] & shares[1]
                and shares[0] | shares[1] == set(agents)
            )

        await await_until(split, 90, interval=0.5, what=f"keys split over both workers {seen}")

        # -- key-based views: both workers answer for every key ----------------------------
        async def every_key_everywhere() -> bool:
            for u in urls:
                for a in agents:
                    r = await get(u, f"/agents/status/{a}")
                    if r.status_code != 200 or r.json()["agent_id"] != a:
                        return False
                for s in series:
                    r = await get(u, f"/metrics/series/{s}")
                    # one window; its count could be 2: at-least-once may fold a sample twice
                    if r.status_code != 200 or len(r.json()["windows"]) != 1:
                        return False
                for rid in requests:
                    r = await get(u, f"/llm/requests/{rid}")
                    final = r.json().get("final") if r.status_code == 200 else None
                    if not final or final["status"] != "completed":
                        return False
                for a in agents:
                    r = await get(u, "/comms", agent=a)
                    if r.status_code != 200 or [x["record_id"] for x in r.json()["records"]] != [
                        f"rec-{a}"
                    ]:
                        return False
            return True

        await await_until(every_key_everywhere, 90, interval=0.5, what=f"every key {seen}")
        assert (await http.get(urls[0] + "/agents/status/nobody")).status_code == 404
        assert (await http.get(urls[1] + "/agents/status/nobody")).status_code == 404

        # -- aggregate views: either worker lists every key, and says both answered --------
        for u in urls:
            body = (await get(u, "/agents/status")).json()
            assert [d["agent_id"] for d in body["agents"]] == sorted(agents), body
            assert body["partial"] is False and body["missing"] == []
            assert sorted(body["workers"]) == sorted(urls)
            statuses = [d["status"] for d in body["agents"]]
            assert body["counts"] == {"up": statuses.count("up"), "down": statuses.count("down")}

            comms = (await get(u, "/comms")).json()
            assert sorted(r["agent_id"] for r in comms["records"]) == sorted(agents)
            assert sorted(comms["counts"]) == sorted(agents)
            assert comms["partial"] is False

            usage = (await get(u, "/llm/usage")).json()
            assert usage["agent"]["asker"]["requests"] == len(requests), usage
            assert usage["partial"] is False and sorted(usage["workers"]) == sorted(urls)

            breakers = (await get(u, "/llm/breakers")).json()
            assert breakers["partial"] is False
            assert sorted(breakers["breakers"]["local"]["live_by_worker"]) == sorted(urls)

        # -- a worker that does not answer is reported, not dropped -------------------------
        # killed, it stays a group member until its session times out (60 s here): its
        # partition stays assigned to it, and unanswered
        w2.kill()
        body = (await get(urls[0], "/agents/status")).json()
        assert body["partial"] is True, body
        assert [m["worker"] for m in body["missing"]] == [urls[1]], body
        listed = {d["agent_id"] for d in body["agents"]}
        assert 0 < len(listed) < len(agents)
        orphan = next(a for a in agents if a not in listed)
        r = await get(urls[0], f"/agents/status/{orphan}")
        assert r.status_code == 503 and r.json()["worker"] == urls[1], r.text
    finally:
        await http.aclose()
        await asyncio.to_thread(w2.stop)
        await asyncio.to_thread(w1.stop)


async def test_two_workers_advertising_one_url_say_so_instead_of_answering_wrong(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """The mistake the docs warn about — the same advertised URL on two workers (the
    default 127.0.0.1 on two hosts) — must not make a worker answer "unknown" for keys it
    does not hold: Faust's assignment map collapses the two into one entry."""
    shared = f"http://127.0.0.1:{settings_env['AGENTSTREAM_WEB_PORT']}"
    settings, urls, w1, w2 = await two_workers(
        settings_env, tmp_path, "heartbeat", AGENTSTREAM_WEB_ADVERTISED_URL=shared
    )
    http = httpx.AsyncClient(timeout=10, headers=web_tokens(settings_env).headers())
    try:
        agents = spread("agent-", 6)
        async with AsyncClient(settings, source="test") as client:
            await client.publish_many(
                "agent.heartbeats",
                [Heartbeat(agent_id=a, sent_at=datetime.now(UTC), sequence=1) for a in agents],
            )

        async def split() -> bool:  # each worker folds the agents of its own partition
            shares = []
            for u in urls:
                r = await http.get(u + "/agents/status", params={"local": "1"})
                shares.append({d["agent_id"] for d in r.json()["agents"]})
            return all(shares) and shares[0] | shares[1] == set(agents)

        await await_until(split, 90, interval=0.5, what="agents split over both workers")
        statuses: list[int] = []
        for u in urls:
            for a in agents:
                r = await http.get(f"{u}/agents/status/{a}")
                statuses.append(r.status_code)
                # the owner's answer, or a 503 that says what is wrong: never a 404 for
                # an agent that exists, answered from a table that lacks its partition
                assert r.status_code in (200, 503), (u, a, r.status_code, r.text)
                if r.status_code == 200:
                    assert r.json()["agent_id"] == a
            listing = (await http.get(u + "/agents/status")).json()
            if len(listing["agents"]) < len(agents):
                assert listing["partial"] is True, listing
        assert 503 in statuses
        conflicts = [
            (await http.get(f"{u}/agents/status/{a}")).json() for u in urls for a in agents
        ]
        assert any("advertises the same URL" in c.get("error", "") for c in conflicts), conflicts
    finally:
        await http.aclose()
        await asyncio.to_thread(w2.stop)
        await asyncio.to_thread(w1.stop)

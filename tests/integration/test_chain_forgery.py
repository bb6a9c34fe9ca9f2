"""The audit trail cannot be forged, on the real broker: a worker signs its decision chain;
a decision appended with a raw producer and chained with the project's own hashing (as
anyone with produce access could) is reported by `agentstream audit verify`, and after a
restart the worker links its next decisions to its last genuine record, not to the
forgery. `verify` also names the signed policy version behind each decision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agentstream.schemas import AgentMessage, Event, PolicyDecision, encode
from agentstream.schemas.security import ANY_LEVEL, SecurityPolicy
from agentstream.streams.audit_chain import ChainSigner, seal
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from agentstream.streams.signing import new_private_key
from agentstream.streams.topics import AGENT_MESSAGES, SECURITY_DECISIONS, SECURITY_POLICIES
from tests.support import AdminSigner, Worker, cli, read_topic, with_admin_key

pytestmark = pytest.mark.integration


def message(i: int, tag: str) -> AgentMessage:
    return AgentMessage(
        message_id=f"{tag}{i}",
        sender_id=f"agent-{i % 8}",  # both partitions
        recipient_id="bob",
        content="forbidden words" if i % 3 == 0 else "fine",
    )


async def send(settings: Settings, tag: str, n: int) -> None:
    async with AsyncClient(settings, source="test") as client:
        await client.publish_many(AGENT_MESSAGES, [message(i, tag) for i in range(n)])


async def decisions(settings: Settings, expect: int) -> dict[int, list[tuple[int, Any]]]:
    """{partition: [(offset, payload)]} of security.decisions, once `expect` are there."""
    recs = await read_topic(
        settings.bootstrap, settings.topic(SECURITY_DECISIONS), expect=expect, timeout=120
    )
    assert len(recs) >= expect, f"{len(recs)} of {expect} decisions"
    out: dict[int, list[tuple[int, Any]]] = {}
    for rec, ev in sorted(recs, key=lambda r: (r[0].partition, r[0].offset)):
        assert ev is not None
        out.setdefault(rec.partition, []).append((rec.offset, ev.payload))
    return out


def forgery(head: str, i: int, signer: ChainSigner | None = None) -> bytes:
    return encode(
        seal(
            Event.of(
                PolicyDecision(
                    message_id=f"forged{i}",
                    message_event_id="x",
                    sender_id="agent-0",
                    verdict="allow",
                    evaluated_at="2026-01-01T00:00:00Z",
                    evaluation_us=0,
                ),
                source="enforce_policy",
            ),
            head,
            signer,
        )
    )


def verify(env: dict[str, str], *extra: str) -> tuple[int, dict[str, Any]]:
    res = cli(env, "audit", "verify", "--topics", SECURITY_DECISIONS, "--json", *extra)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


async def test_forged_decisions_are_reported_and_never_continued(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    admin = AdminSigner()
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "security,audit"}, tmp_path, admin)
    settings = Settings.from_env(env)
    assert cli(env, "topics", "create").returncode == 0

    # the admin publishes this host's chain key (created in the keychain) and a policy
    res = cli(env, "audit", "worker-key", "publish")
    assert res.returncode == 0, res.stderr
    listed = cli(env, "audit", "worker-key", "list", "--json")
    keys = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(k["key_id"], k["revoked"], k["signed_by"]) for k in keys] == [
        ("worker", False, "admin")
    ]
    policy = admin.record(
        SecurityPolicy(policy_id="std", version=2, level=ANY_LEVEL, blocked_patterns=["forbidden"])
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(SECURITY_POLICIES), policy[1], key=policy[0])
    finally:
        await producer.stop()

    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        n = 24
        await send(settings, "a", n)
        chains = await decisions(settings, n)
        assert set(chains) == {0, 1}, chains.keys()
        for part, recs in chains.items():
            assert recs[-1][1].signed_by == "worker", part  # batch ends are signed
            assert recs[-1][1].signature

        code, result = verify(env)
        assert code == 0, result["findings"]
        assert result["signed"] >= 2 and result["trusted_keys"] == ["worker"]
        assert result["require_signatures"] is True
        assert sum(r["decisions"] for r in result["policy_versions"]) == n

        # -- forge: one unsigned record in partition 0, one signed with a key of the same
        # id the attacker made up in partition 1, both correctly chained to the head
        genuine = {part: recs[-1][1].hash for part, recs in chains.items()}
        offsets = {part: recs[-1][0] + 1 for part, recs in chains.items()}
        eve = ChainSigner("worker", new_private_key())
        topic = settings.topic(SECURITY_DECISIONS)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, forgery(genuine[0], 0), key=b"agent-0", partition=0)
            await producer.send_and_wait(
                topic, forgery(genuine[1], 1, eve), key=b"agent-1", partition=1
            )
        finally:
            await producer.stop()

        code, result = verify(env)
        assert code == 1
        found = sorted((f["partition"], f["offset"], f["kind"]) for f in result["findings"])
        assert found == [(0, offsets[0], "unsigned"), (1, offsets[1], "forged")]
        text = cli(env, "audit", "verify", "--topics", SECURITY_DECISIONS)
        assert text.returncode == 1 and "UNSIGNED" in text.stdout and "FORGED" in text.stdout
        # an auditor who pins another key trusts nothing the worker signed
        code, pinned = verify(env, "--trust-key", f"other={eve.public_b64}")
        assert code == 1 and pinned["counts"]["forged"] >= 2

        # -- the worker reads its heads back from the topic after a restart: it must link
        # to its last genuine records, never to the forgeries
        worker.stop()
        worker.start()
        m = 16
        await send(settings, "b", m)
        later = await decisions(settings, n + 2 + m)
        for part in (0, 1):
            after = [p for off, p in later[part] if off > offsets[part]]  # past the forgery
            assert after, part
            assert after[0].prev_hash == genuine[part], part
            assert after[-1].signed_by == "worker"

        code, result = verify(env)
        assert code == 1
        found = sorted((f["partition"], f["offset"], f["kind"]) for f in result["findings"])
        # the same two records, and nothing else: no break where the chain skips them
        assert found == [(0, offsets[0], "unsigned"), (1, offsets[1], "forged")]
        details = {f["partition"]: f["detail"] for f in result["findings"]}
        assert "the record before it" in details[0]
        assert result["counts"]["inserted"] == result["counts"]["deleted"] == 0
        assert worker.alive()
        worker.stop()

        # a revoked key vouches for nothing any more
        assert cli(env, "audit", "worker-key", "revoke", "worker").returncode == 0
        listed = cli(env, "audit", "worker-key", "list", "--json")
        assert [json.loads(line)["revoked"] for line in listed.stdout.splitlines()] == [True]
        code, revoked = verify(env)
        assert code == 1 and revoked["trusted_keys"] == []
        forged = [f for f in revoked["findings"] if f["kind"] == "forged"]
        assert len(forged) >= 3 and all("revoked" in f["detail"] for f in forged)

        # every decision names the signed policy version it applied, still on the topic
        assert result["policy_versions"] == [
            {
                "policy_id": "std",
                "version": 2,
                "signed_by": "admin",
                "decisions": n + m,
                "on_topic": True,
                "signature_valid": True,
            }
        ]
    finally:
        worker.stop()

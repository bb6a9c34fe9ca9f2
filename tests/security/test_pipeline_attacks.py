"""A hostile sender against the running pipeline on the real broker: spoofed roles,
replays (the same bytes again, re-wrapped in a fresh envelope, put on another partition),
stale signatures. Identities and policies are admin-signed records on their topics, the
sender keys live in a real (encrypted-file) keychain, and every verdict is read back from
`security.decisions` and the result topics."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from agentstream.agents.security.crypto import new_key, sign_message
from agentstream.schemas import AgentMessage, Event, encode, utc_now
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy
from agentstream.streams.admin import ensure_topics
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings
from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES
from tests.support import AdminSigner, Worker, read_topic, with_admin_key

pytestmark = pytest.mark.integration

PARTITIONS = 2


def _msg(mid: str, sender: str, content: str, **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id=mid, sender_id=sender, recipient_id="boss", content=content, **kw
    )


async def test_spoofed_roles_replays_and_stale_signatures_are_denied(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    signer = AdminSigner()
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "security"}, tmp_path, signer)
    settings = Settings.from_env(env)
    intern_key, planner_key = new_key(), new_key()
    provider = KeychainCredentialsProvider(settings)
    await provider.set_signing_key("intern-1", intern_key)
    await provider.set_signing_key("planner-1", planner_key)

    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        rules = [
            SecurityPolicy(
                policy_id="interns-report-only",
                level="*",
                applies_to_roles=["intern"],
                allowed_patterns=["^report:"],
            ),
            SecurityPolicy(policy_id="plans", level="confidential", allowed_roles=["planner"]),
            SecurityConfig(default_action="allow"),
        ]
        for payload in rules:
            key, value = signer.record(payload)
            await producer.send_and_wait(settings.topic(SECURITY_POLICIES), value, key=key)
        for grant in (
            AgentIdentity(agent_id="intern-1", roles=["intern"]),
            AgentIdentity(agent_id="planner-1", roles=["planner"]),
        ):
            key, value = signer.record(grant)
            await producer.send_and_wait(settings.topic(SECURITY_IDENTITIES), value, key=key)

        worker = Worker(env, tmp_path / "worker.log").start()
        try:
            now = utc_now()
            plan = sign_message(
                _msg("plan", "planner-1", "the plan", security_level="confidential"),
                planner_key,
                issued_at=now,
            )
            plan_event = Event.of(plan, source="planner-1")
            cases: list[tuple[str, AgentMessage | bytes, str | None]] = [
                # an intern claiming roles it was not granted, in every spelling
                (
                    "claim-agent",
                    sign_message(
                        _msg("claim-agent", "intern-1", "chit chat", sender_role="agent"),
                        intern_key,
                    ),
                    None,
                ),
                (
                    "claim-own",
                    sign_message(
                        _msg("claim-own", "intern-1", "chit chat", sender_role="Intern "),
                        intern_key,
                    ),
                    None,
                ),
                (
                    "unsigned-claim",
                    _msg("unsigned-claim", "intern-1", "report: x", sender_role="intern"),
                    None,
                ),
                (
                    "claim-planner",
                    sign_message(
                        _msg(
                            "claim-planner",
                            "intern-1",
                            "the plan",
                            sender_role="planner",
                            security_level="confidential",
                        ),
                        intern_key,
                    ),
                    None,
                ),
                # the genuine message, then the same bytes again, re-wrapped, and elsewhere
                ("plan", encode(plan_event), None),
                ("plan", encode(plan_event), None),
                ("plan", encode(Event.of(plan, source="replayer")), None),
                ("plan", encode(Event.of(plan, source="replayer")), "other"),
                (
                    "stale",
                    sign_message(
                        _msg("stale", "planner-1", "x"),
                        planner_key,
                        issued_at=now - timedelta(minutes=10),
                    ),
                    None,
                ),
            ]
            home = (murmur2(b"planner-1") & 0x7FFFFFFF) % PARTITIONS
            topic = settings.topic("agent.messages")
            for _name, item, where in cases:
                if isinstance(item, AgentMessage):
                    item = encode(Event.of(item, source=item.sender_id))
                sender = b"planner-1" if _name in ("plan", "stale") else b"intern-1"
                partition = (1 - home) if where == "other" else None
                await producer.send_and_wait(topic, item, key=sender, partition=partition)

            decisions = await read_topic(
                settings.bootstrap, settings.topic("security.decisions"), expect=len(cases)
            )
        finally:
            worker.stop()
    finally:
        await producer.stop()

    assert len(decisions) == len(cases), worker.tail()
    by_id: dict[str, list[Any]] = {}
    for _rec, event in sorted(decisions, key=lambda d: (d[0].partition, d[0].offset)):
        assert event is not None
        by_id.setdefault(event.payload.message_id, []).append(event.payload)

    def only(mid: str) -> Any:
        (decision,) = by_id[mid]
        return decision

    assert "role_not_granted" in only("claim-agent").rules
    assert only("claim-own").rules == ["allowed_patterns"]  # its own role, spelled oddly
    assert only("claim-own").roles == ["intern"] and only("claim-own").verified
    unsigned = only("unsigned-claim")
    assert not unsigned.verified and unsigned.roles == ["anonymous"]
    assert "role_not_granted" in unsigned.rules
    assert {"role_not_granted", "allowed_roles"} <= set(only("claim-planner").rules)
    assert only("stale").rules == ["issued_at"]

    plans = sorted(by_id["plan"], key=lambda d: (d.source_partition, d.source_offset))
    verdicts = [(d.verdict.value, d.rules) for d in plans]
    assert verdicts.count(("allow", [])) == 1, verdicts
    replays = [d for d in plans if d.verdict.value == "deny"]
    assert len(replays) == 3, verdicts
    home_replays = [d for d in replays if d.source_partition == home]
    assert [d.rules for d in home_replays] == [["replay"], ["replay"]], verdicts
    (elsewhere,) = [d for d in replays if d.source_partition != home]
    assert "misrouted" in elsewhere.rules, verdicts

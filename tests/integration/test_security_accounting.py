"""Accounting over a mixed stream of 10,000 messages: every input ends in exactly one of
accepted, rejected or dead-letter; security.decisions holds exactly one decision per
decoded message, hash-chained per partition across a worker restart; policies survive
the restart without being published again."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agentstream.agents.security.crypto import encrypt_content, new_key, sign_message
from agentstream.schemas import AgentMessage, Event, encode
from agentstream.schemas.security import AgentIdentity
from agentstream.streams.audit_chain import GENESIS
from agentstream.streams.client import AsyncClient
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings
from tests.support import AdminSigner, Worker, cli, read_topic, web_tokens, with_admin_key

pytestmark = pytest.mark.integration

TOTAL = 10_000
POLICY_FILE = {
    "default_action": "deny",
    "policies": [
        {
            "policy_id": "std",
            "level": "standard",
            "max_message_size": 500,
            "blocked_patterns": ["forbidden", "(a+)+$"],
            "allowed_roles": ["anonymous", "agent", "restricted"],
        },
        {
            "policy_id": "restricted",
            "level": "standard",
            "applies_to_roles": ["restricted"],
            "allowed_patterns": ["^report:"],
        },
        {
            "policy_id": "conf",
            "level": "confidential",
            "require_encryption": True,
            "require_authentication": True,
        },
    ],
}
#: category → the rules its messages violate (None: not decodable, a dead letter)
CATEGORIES: dict[str, set[str] | None] = {
    "valid": set(),
    "valid_conf": set(),
    "too_big": {"max_message_size"},
    "blocked": {"blocked_patterns"},
    "not_allowed": {"allowed_patterns"},
    "role": {"allowed_roles"},
    "plaintext": {"require_encryption"},
    "unsigned": {"require_authentication"},
    "no_policy": {"default_action"},
    "bad_cipher": {"decryption", "require_encryption"},
    "undecodable": None,
    "invalid": None,
    "oversized": None,  # larger than the worker's AGENTSTREAM_MAX_EVENT_BYTES
}
ORDER = [c for c in CATEGORIES if c != "oversized"]
MAX_EVENT_BYTES = 100_000


def _build(i: int, cat: str, sign_key: bytes, enc_key: bytes) -> tuple[bytes, bytes]:
    """(key, value) of input number i."""
    sender = f"agent-{i % 13}"
    base: dict[str, Any] = {
        "message_id": f"m{i}",
        "sender_id": sender,
        "recipient_id": "hub",
        "content": f"message {i}",
    }
    conf = {"security_level": "confidential"}
    if cat == "oversized":
        big = AgentMessage(**{**base, "content": "o" * (MAX_EVENT_BYTES + 10)})
        return sender.encode(), encode(Event.of(big, source=sender))
    if cat == "undecodable":
        return sender.encode(), b'{"type": "agent.message", "payload": ' + str(i).encode()
    if cat == "invalid":
        return sender.encode(), orjson.dumps(
            {
                "type": "agent.message",
                "schema_version": 2,
                "source": "t",
                "payload": {"message_id": i},
            }
        )
    if cat == "valid":
        msg = AgentMessage(**base)
    elif cat == "valid_conf":
        msg = sign_message(encrypt_content(AgentMessage(**base, **conf), enc_key, "k1"), sign_key)
    elif cat == "too_big":
        msg = AgentMessage(**{**base, "content": "z" * 501})
    elif cat == "blocked":
        msg = AgentMessage(**{**base, "content": f"{i} is forbidden"})
    elif cat == "not_allowed":
        msg = sign_message(AgentMessage(**base, sender_role="restricted"), sign_key)
    elif cat == "role":
        msg = sign_message(AgentMessage(**base, sender_role="intern"), sign_key)
    elif cat == "plaintext":
        msg = sign_message(AgentMessage(**base, **conf), sign_key)
    elif cat == "unsigned":
        msg = encrypt_content(AgentMessage(**base, **conf), enc_key, "k1")
    elif cat == "no_policy":
        msg = AgentMessage(**base, security_level="public")
    elif cat == "bad_cipher":
        msg = sign_message(encrypt_content(AgentMessage(**base, **conf), new_key(), "k1"), sign_key)
    else:
        raise AssertionError(cat)
    return sender.encode(), encode(Event.of(msg, source=sender))


async def test_every_input_accounted_for_exactly_once(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    signer = AdminSigner()
    env = with_admin_key(
        {
            **settings_env,
            "AGENTSTREAM_AGENTS": "security",
            "AGENTSTREAM_LOG_LEVEL": "WARNING",
            "AGENTSTREAM_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        },
        tmp_path,
        signer,
    )
    settings = Settings.from_env(env)
    sign_key, enc_key = new_key(), new_key()
    provider = KeychainCredentialsProvider(settings)
    for n in range(13):
        await provider.set_signing_key(f"agent-{n}", sign_key)
    await provider.set_encryption_key("k1", enc_key)
    policy_file = tmp_path / "policies.json"
    policy_file.write_text(json.dumps(POLICY_FILE))
    res = cli(env, "policy", "apply", str(policy_file))
    assert res.returncode == 0, res.stderr
    # roles come from identities: every agent may act as agent, restricted or intern
    async with AsyncClient(settings) as client:
        for n in range(13):
            grant = AgentIdentity(
                agent_id=f"agent-{n}",
                roles=["agent", "restricted", "intern"],
                encryption_key_ids=["k1"],
            )
            await client.publish("security.identities", signer.event(grant))

    category = {i: "oversized" if i % 1000 == 999 else ORDER[i % len(ORDER)] for i in range(TOTAL)}
    inputs = [_build(i, category[i], sign_key, enc_key) for i in range(TOTAL)]
    expected = Counter(category.values())
    decoded = sum(n for c, n in expected.items() if CATEGORIES[c] is not None)
    n_ok = expected["valid"] + expected["valid_conf"]

    async def send(part: range) -> None:
        async with AsyncClient(settings) as client:
            futures = [
                await client._producer.send(
                    settings.topic("agent.messages"),  # type: ignore[union-attr]
                    value=inputs[i][1],
                    key=inputs[i][0],
                )
                for i in part
            ]
            for fut in futures:
                await fut

    half = TOTAL // 2
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        await send(range(half))
        first = sum(1 for i in range(half) if CATEGORIES[category[i]] is not None)
        await read_topic(
            settings.bootstrap, settings.topic("security.decisions"), expect=first, timeout=90
        )
    finally:
        worker.stop()
    # exact counts below need a clean stop (its last commit): a kill -9 is processed again
    assert not worker.stop_killed, worker.tail()
    # a new worker: policies come back from the compacted topic, the chain continues
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        await send(range(half, TOTAL))
        decisions = await read_topic(
            settings.bootstrap, settings.topic("security.decisions"), expect=decoded, timeout=90
        )
        accepted = await read_topic(
            settings.bootstrap, settings.topic("agent.messages.accepted"), expect=n_ok, timeout=30
        )
        rejected = await read_topic(
            settings.bootstrap,
            settings.topic("agent.messages.rejected"),
            expect=decoded - n_ok,
            timeout=30,
        )
        letters = await read_topic(
            settings.bootstrap,
            settings.topic("pipeline.deadletter"),
            expect=TOTAL - decoded,
            timeout=30,
        )
        web = f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}"
        async with httpx.AsyncClient(headers=web_tokens(env).headers()) as http:
            in_force = (await http.get(f"{web}/security/policies/")).json()
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()

    assert {p["policy_id"]: p["version"] for p in in_force["policies"]} == {
        "std": 1,
        "restricted": 1,
        "conf": 1,
    }

    def mid(ev: Event[Any]) -> int:
        return int(ev.payload.message_id[1:])

    acc = [mid(ev) for _, ev in accepted]
    rej = [ev for _, ev in rejected]
    dec = [ev for _, ev in decisions]
    dead = [ev.payload for _, ev in letters]
    # exact counts: nothing lost, nothing duplicated
    assert len(acc) == n_ok and len(set(acc)) == n_ok
    assert len(rej) == decoded - n_ok and len({mid(e) for e in rej}) == len(rej)
    assert len(dec) == decoded and len({mid(e) for e in dec}) == decoded
    assert len(dead) == TOTAL - decoded
    # and each in the right place, for the right reasons
    assert {category[i] for i in acc} == {"valid", "valid_conf"}
    for ev in rej:
        want = CATEGORIES[category[mid(ev)]]
        assert set(ev.payload.metadata["rejection_rules"]) == want, (
            category[mid(ev)],
            ev.payload.metadata["rejection_reasons"],
        )
    assert Counter(category[mid(e)] for e in rej) == {
        c: n for c, n in expected.items() if CATEGORIES[c]
    }
    assert Counter(d.error_class for d in dead) == {
        "UndecodableEvent": expected["undecodable"] + expected["oversized"],
        "InvalidEvent": expected["invalid"],
    }
    assert {d.consumer for d in dead} == {"enforce_policy"}
    # one unbroken chain per partition, across the restart
    heads: dict[int, str] = {}
    for rec, ev in decisions:
        assert ev.payload.prev_hash == heads.get(rec.partition, GENESIS)
        assert ev.payload.source_partition == rec.partition
        heads[rec.partition] = ev.payload.hash
    assert all(d.payload.policies for d in dec if category[mid(d)] != "no_policy")

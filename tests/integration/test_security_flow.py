"""enforce_policy end to end on the real broker, with keys in a real (encrypted file) keyring:
each rule denies what it should with all reasons, policies applied at runtime take effect
on the running worker, a bad policy file changes nothing, and no token or key appears on
any output topic or in the worker's log."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentstream.agents.security.agent import forwarded_id
from agentstream.agents.security.crypto import encrypt_content, new_key, sign_message
from agentstream.schemas import AgentMessage, Event, encode, utc_now
from agentstream.schemas.messages import AuthProof
from agentstream.streams.audit_chain import GENESIS, compute_hash
from agentstream.streams.client import AsyncClient
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.redaction import redact_raw
from agentstream.streams.settings import Settings
from tests.support import Worker, await_until, cli, read_topic, web_tokens, with_admin_key

pytestmark = pytest.mark.integration

POLICIES = {
    "enabled": True,
    "default_action": "deny",
    "policies": [
        {
            "policy_id": "std-basic",
            "level": "standard",
            "max_message_size": 200,
            "blocked_patterns": [r"(?i)password\s*[:=]", "(a+)+$"],
        },
        {
            "policy_id": "std-restricted",
            "level": "standard",
            "applies_to_roles": ["restricted"],
            "allowed_patterns": ["^report:"],
        },
        {
            "policy_id": "conf",
            "level": "confidential",
            "require_encryption": True,
            "require_authentication": True,
            "allowed_roles": ["planner"],
            "blocked_patterns": ["launch code"],
        },
    ],
}


def _msg(mid: str, content: str = "hello", **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id=mid,
        sender_id=kw.pop("sender_id", "signer"),
        recipient_id="bob",
        content=content,
        **kw,
    )


async def test_policies_enforced_live_and_secrets_never_leave(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    # the fixture's encrypted-file keyring (tmp_path/keyring.json, holding the web tokens)
    master = settings_env["AGENTSTREAM_KEYRING_PASSWORD"]
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "security"}, tmp_path)
    settings = Settings.from_env(env)
    provider = KeychainCredentialsProvider(settings)
    signing_key, enc_key = new_key(), new_key()
    await provider.write_credentials(7, token)
    await provider.set_signing_key("signer", signing_key)
    await provider.set_encryption_key("k1", enc_key)
    keyring_text = (tmp_path / "keyring.json").read_text()
    assert token not in keyring_text and base64.b64encode(signing_key).decode() not in keyring_text

    # -- apply: a file with one dangerous pattern publishes nothing --------------------------
    good = tmp_path / "policies.yaml"
    good.write_text(json.dumps(POLICIES))
    res = cli(env, "policy", "apply", str(good))
    assert res.returncode == 0, res.stderr + res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "policies:\n  - policy_id: ok-one\n    blocked_patterns: [fine]\n"
        "  - policy_id: evil\n    blocked_patterns: ['(a)\\1', '(?=x)y']\n"
    )
    res = cli(env, "policy", "apply", str(bad))
    assert res.returncode == 1
    assert "(a)\\\\1" in res.stderr or "(a)\\1" in res.stderr, res.stderr
    assert "nothing published" in res.stderr
    # roles come from the sender's identity, never from what a message claims
    granted = cli(
        env,
        "identity",
        "grant",
        "signer",
        "--role",
        "planner",
        "--role",
        "restricted",
        "--role",
        "intern",
        "--token-user",
        "7",
        "--encryption-key-id",
        "k1",
    )
    assert granted.returncode == 0, granted.stderr + granted.stdout
    listed = cli(env, "policy", "list", "--json")
    state = json.loads(listed.stdout)
    assert set(state) == {"__config__", "std-basic", "std-restricted", "conf"}
    assert state["std-basic"]["version"] == 1

    worker = Worker(env, tmp_path / "worker.log").start()
    web = f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}"
    try:
        conf = {"security_level": "confidential", "sender_role": "planner"}
        good_conf = sign_message(
            encrypt_content(_msg("c-ok", "the plan", **conf), enc_key, "k1"), signing_key
        )
        tampered = good_conf.model_copy(update={"message_id": "c-tampered"})  # breaks aad + hmac
        wrong_key = sign_message(
            encrypt_content(_msg("c-wrongkey", "x", **conf), new_key(), "k1"), signing_key
        )
        by_token = encrypt_content(_msg("c-token", "the plan", **conf), enc_key, "k1").model_copy(
            update={
                "auth": AuthProof(
                    method="access-token", token=token, user_id=7, issued_at=utc_now()
                )
            }
        )
        bad_token = encrypt_content(
            _msg("c-badtoken", "the plan", **conf), enc_key, "k1"
        ).model_copy(
            update={
                "auth": AuthProof(
                    method="access-token", token=token + "x", user_id=7, issued_at=utc_now()
                )
            }
        )
        cases: dict[str, tuple[AgentMessage, set[str]]] = {
            "s-ok": (_msg("s-ok", "all good"), set()),
            "s-big": (_msg("s-big", "y" * 201), {"max_message_size"}),
            "s-pw": (_msg("s-pw", "my Password: x"), {"blocked_patterns"}),
            # over the size limit: denied without running a pattern (bounded cost)
            "s-big-pw": (_msg("s-big-pw", "password=" + "z" * 300), {"max_message_size"}),
            "s-redos": (_msg("s-redos", "a" * 150 + "!"), set()),
            "r-ok": (
                sign_message(_msg("r-ok", "report: fine", sender_role="restricted"), signing_key),
                set(),
            ),
            "r-no": (
                sign_message(_msg("r-no", "chatter", sender_role="restricted"), signing_key),
                {"allowed_patterns"},
            ),
            # an unverified sender claiming a role: denied for the claim, and anonymous
            "r-claim": (
                _msg("r-claim", "report: fine", sender_role="restricted"),
                {"role_not_granted"},
            ),
            "c-ok": (good_conf, set()),
            "c-token": (by_token, set()),
            "c-badtoken": (
                bad_token,
                {"require_authentication", "role_not_granted", "allowed_roles"},
            ),
            "c-plain": (
                _msg("c-plain", "x", **conf),
                {"require_encryption", "require_authentication", "role_not_granted"}
                | {"allowed_roles"},
            ),
            "c-role": (
                sign_message(
                    encrypt_content(
                        _msg("c-role", "x", security_level="confidential", sender_role="intern"),
                        enc_key,
                        "k1",
                    ),
                    signing_key,
                ),
                {"allowed_roles"},
            ),
            "c-tampered": (
                tampered,
                {"decryption", "require_encryption", "require_authentication"}
                | {"role_not_granted", "allowed_roles"},
            ),
            "c-wrongkey": (wrong_key, {"decryption", "require_encryption"}),
            "c-launch": (
                sign_message(
                    encrypt_content(_msg("c-launch", "the launch code", **conf), enc_key, "k1"),
                    signing_key,
                ),
                {"blocked_patterns"},
            ),
            "u-level": (_msg("u-level", "x", security_level="public"), {"default_action"}),
        }
        sent: dict[str, Event[Any]] = {}
        #: message id -> where its input was written
        where: dict[str, tuple[int, int]] = {}
        invalid = Event.of(by_token.model_copy(update={"message_id": "c-invalid"}), source="t")
        invalid_raw = encode(invalid).replace(b'"recipient_id":"bob",', b"")  # schema error
        truncated = encode(invalid)[: encode(invalid).index(token.encode()) + 10]
        bad_sent: list[tuple[bytes, int, int]] = []
        async with AsyncClient(settings) as client:
            for raw in (invalid_raw, truncated):  # dead letters must not carry the token
                assert token.encode() in raw[:-1] or token[:6].encode() in raw
                md = await client.publish_raw("agent.messages", raw, key=b"signer")
                bad_sent.append((raw, md.partition, md.offset))
            for mid, (msg, _) in cases.items():
                sent[mid] = Event.of(msg, source="test")
                md = await client.publish("agent.messages", sent[mid])
                where[mid] = (md.partition, md.offset)

            # -- a policy applied at runtime reaches the running worker --------------------
            live = tmp_path / "live.yaml"
            live.write_text(
                "policy_id: std-words\nlevel: standard\nblocked_patterns: [forbidden]\n"
            )
            res = cli(env, "policy", "apply", str(live))
            assert res.returncode == 0, res.stderr

            async def _live() -> bool:
                async with httpx.AsyncClient(headers=web_tokens(env).headers()) as http:
                    body = (await http.get(f"{web}/security/policies/")).json()
                return any(p["policy_id"] == "std-words" for p in body["policies"])

            await await_until(_live, 30, what="std-words in force on the worker")
            msg = _msg("s-live", "this is forbidden")
            sent["s-live"] = Event.of(msg, source="test")
            cases["s-live"] = (msg, {"blocked_patterns"})
            md = await client.publish("agent.messages", sent["s-live"])
            where["s-live"] = (md.partition, md.offset)

        n = len(cases)
        want_ok = {m for m, (_, rules) in cases.items() if not rules}
        accepted = await read_topic(
            settings.bootstrap,
            settings.topic("agent.messages.accepted"),
            expect=len(want_ok),
            timeout=45,
        )
        rejected = await read_topic(
            settings.bootstrap,
            settings.topic("agent.messages.rejected"),
            expect=n - len(want_ok),
            timeout=45,
        )
        decisions = await read_topic(
            settings.bootstrap, settings.topic("security.decisions"), expect=n, timeout=45
        )
        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=2, timeout=30
        )
        assert sorted(ev.payload.error_class for _, ev in letters) == [
            "InvalidEvent",
            "UndecodableEvent",
        ]
        # each carries its record's bytes with the token blanked (the output topics are
        # searched for secrets below, but a dead letter holds its bytes base64-encoded)
        by_coord = {(ev.payload.partition, ev.payload.offset): ev.payload for _, ev in letters}
        for raw, partition, offset in bad_sent:
            letter = by_coord[(partition, offset)]
            assert letter.topic == settings.topic("agent.messages")
            assert letter.consumer == "enforce_policy" and letter.error_message
            kept = base64.b64decode(letter.original_b64)
            assert kept == redact_raw(raw) and letter.original_size == len(kept)
            assert token[:8].encode() not in kept and b'"token":"[REDACTED]"' in kept
        assert {ev.payload.message_id for _, ev in accepted} == want_ok
        by_mid = {ev.payload.message_id: ev for _, ev in rejected}
        assert set(by_mid) == set(cases) - want_ok
        for mid, ev in by_mid.items():
            rules = set(ev.payload.metadata["rejection_rules"])
            assert rules == cases[mid][1], (mid, ev.payload.metadata["rejection_reasons"])
            assert ev.causation_id == str(sent[mid].event_id)
            assert str(ev.event_id) == forwarded_id(settings.topic("agent.messages"), *where[mid])
        assert any(
            "'forbidden'" in r and "std-words v1" in r
            for r in by_mid["s-live"].payload.metadata["rejection_reasons"]
        )
        for _, ev in accepted:
            assert ev.causation_id == str(sent[ev.payload.message_id].event_id)
            # its own id, derived from where its input was read
            expected = forwarded_id(settings.topic("agent.messages"), *where[ev.payload.message_id])
            assert str(ev.event_id) == expected
            auth = ev.payload.auth
            assert auth is None or auth.token is None
        token_fwd = next(ev for _, ev in accepted if ev.payload.message_id == "c-token")
        assert token_fwd.payload.auth.redacted

        # one decision per message, with the policy versions, chained per partition
        dec = [ev for _, ev in decisions]
        assert sorted(d.payload.message_id for d in dec) == sorted(cases)
        versions = {d.payload.message_id: d.payload.policies for d in dec}
        assert versions["s-ok"] == {"std-basic": 1}
        assert versions["r-no"] == {"std-basic": 1, "std-restricted": 1}
        assert versions["s-live"] == {"std-basic": 1, "std-words": 1}
        assert versions["u-level"] == {}
        heads: dict[int, str] = {}
        for rec, ev in decisions:
            assert ev.payload.prev_hash == heads.get(rec.partition, GENESIS)
            assert ev.payload.hash == compute_hash(
                ev.model_copy(update={"payload": ev.payload.model_copy(update={"hash": ""})})
            )
            heads[rec.partition] = ev.payload.hash

        async with httpx.AsyncClient(headers=web_tokens(env).headers()) as http:
            counts = (await http.get(f"{web}/security/decisions/")).json()["counts"]
        assert counts["allow"]["*"] == len(want_ok)
        assert counts["deny"]["*"] == n - len(want_ok)
        assert counts["deny"]["blocked_patterns"] == sum(
            "blocked_patterns" in r for _, r in cases.values()
        )
        assert worker.alive()
    finally:
        worker.stop()

    # -- remove: the policy leaves the table, the others stay ------------------------------
    res = cli(env, "policy", "remove", "std-restricted")
    assert res.returncode == 0, res.stderr
    assert cli(env, "policy", "remove", "std-restricted").returncode == 1  # no longer in force
    listed = cli(env, "policy", "list")
    assert "std-restricted" not in listed.stdout and "std-words" in listed.stdout
    assert "config v1: security enabled, default deny, signed by admin" in listed.stdout

    # -- no secret on any output topic nor in the log ---------------------------------------
    needles = [
        token,
        base64.b64encode(signing_key).decode(),
        base64.b64encode(enc_key).decode(),
        signing_key.hex(),
        enc_key.hex(),
        master,
    ]
    raw_needles = [n.encode() for n in needles] + [signing_key, enc_key]
    blobs = await _all_records(settings)
    assert settings.topic("security.decisions") in blobs
    assert any("changelog" in t for t in blobs)  # Faust's own topics are searched too
    for topic, records in blobs.items():
        if topic == settings.topic("agent.messages"):
            continue  # the producers' input: tokens travel there by design
        for blob in records:
            for needle in raw_needles:
                assert needle not in blob, f"a secret leaked to {topic}"
    log_text = (tmp_path / "worker.log").read_bytes()
    for needle in raw_needles:
        assert needle not in log_text, "a secret leaked to the worker log"


async def _all_records(settings: Settings) -> dict[str, list[bytes]]:
    """key + value of every record of every topic of this test (catalogue and Faust's)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        mine = (settings.topic_prefix, settings.app_id)
        names = [t for t in cluster.topics() if t.startswith(mine)]
        tps = [TopicPartition(t, p) for t in names for p in cluster.partitions_for_topic(t) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, list[bytes]] = {t: [] for t in names}
        pending = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                out[tp.topic] += [(r.value or b"") + (r.key or b"") for r in records]
            # positions, not record offsets: transaction markers occupy offsets too
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        assert not pending, f"could not read {pending}"
        return out
    finally:
        await consumer.stop()

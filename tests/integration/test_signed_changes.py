"""Signed rule changes on the real broker: whoever can produce to the rule topics cannot
change what a running worker enforces — an unsigned config switching security off, a
forged signature, an unsigned removal, a signed policy replayed under the config's key,
a replayed older signed version, a tombstone, an unsigned identity — and
`security.changes.rejected` gets exactly one event per such record, with the reason.
`identity grant` publishes a record that verifies, and `identity list` shows it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agentstream.schemas import AgentMessage, Event, encode
from agentstream.schemas.security import (
    AgentIdentity,
    SecurityChangeRejected,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
)
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import (
    AdminSigner,
    Follower,
    Worker,
    await_until,
    cli,
    read_topic,
    web_tokens,
    with_admin_key,
)

pytestmark = pytest.mark.integration


def _policy_file(path: Path, blocked: list[str]) -> Path:
    path.write_text(
        json.dumps(
            {
                "enabled": True,
                "default_action": "allow",
                "policies": [
                    {"policy_id": "no-secrets", "level": "*", "blocked_patterns": blocked}
                ],
            }
        )
    )
    return path


def _unsigned(payload: Any) -> tuple[bytes, bytes]:
    event = Event.of(payload, source="mallory")
    return event.key.encode(), encode(event)


def _message(mid: str, content: str) -> Event[Any]:
    # an anonymous sender (no proof) at level standard: a blocked pattern denies it
    return Event.of(
        AgentMessage(message_id=mid, sender_id="mallory", recipient_id="bob", content=content),
        source="mallory",
    )


async def test_forged_rule_changes_are_ignored_and_reported(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "security"}, tmp_path)
    settings = Settings.from_env(env)
    topic = settings.topic("security.policies")

    # -- signed changes through the CLI ----------------------------------------------------
    res = cli(env, "policy", "apply", str(_policy_file(tmp_path / "v1.json", ["forbidden"])))
    assert res.returncode == 0, res.stderr + res.stdout
    res = cli(env, "identity", "grant", "alice", "--role", "planner", "--level", "standard")
    assert res.returncode == 0, res.stderr + res.stdout
    listed = cli(env, "identity", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["identities"]["alice"]["roles"] == ["planner"]
    assert doc["identities"]["alice"]["signed_by"] == "admin"
    assert [(r["key"], r["applied"], r["reason"]) for r in doc["records"]] == [
        ("alice", True, None)
    ]
    assert "verified, applied" in cli(env, "identity", "list").stdout
    v1 = [rec for rec, ev in await read_topic(settings.bootstrap, topic, expect=2) if ev]
    v1_policy = next(r for r in v1 if r.key == b"no-secrets")

    worker = Worker(env, tmp_path / "worker.log").start()
    web = f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}"

    async def in_force() -> dict[str, Any]:
        # admin: the test compares the patterns in force, which a read token does not see
        async with httpx.AsyncClient(headers=web_tokens(env).headers("admin")) as http:
            body: dict[str, Any] = (await http.get(f"{web}/security/policies/")).json()
        return body

    def versions(body: dict[str, Any]) -> dict[str, int]:
        return {p["policy_id"]: p["version"] for p in body["policies"]}

    try:
        async with (
            Follower(
                settings,
                ["security.changes.rejected", "agent.messages.accepted", "agent.messages.rejected"],
            ) as follow,
            AsyncClient(settings) as client,
        ):
            res = cli(
                env,
                "policy",
                "apply",
                str(_policy_file(tmp_path / "v2.json", ["forbidden", "banned"])),
            )
            assert res.returncode == 0, res.stderr + res.stdout

            async def v2_in_force() -> bool:
                return versions(await in_force()).get("no-secrets") == 2

            await await_until(v2_in_force, 60, what="no-secrets v2 on the worker")

            # -- what anyone with produce access can write ---------------------------------
            rogue = AdminSigner("admin")  # claims the trusted key id, signs with another
            forged: dict[str, tuple[str, tuple[bytes | None, bytes | None]]] = {
                "config-off": (
                    "unsigned",
                    _unsigned(SecurityConfig(version=99, enabled=False, default_action="allow")),
                ),
                "forged-policy": (
                    "bad_signature",
                    rogue.record(SecurityPolicy(policy_id="no-secrets", version=50)),
                ),
                "unsigned-removal": (
                    "unsigned",
                    _unsigned(SecurityPolicyRemoved(policy_id="no-secrets", version=60)),
                ),
                "under-config-key": ("reserved_key", (b"__config__", v1_policy.value)),
                "replayed-v1": ("rollback", (b"no-secrets", v1_policy.value)),
                "tombstone": ("tombstone", (b"no-secrets", None)),
            }
            where: dict[tuple[str, int], str] = {}
            for name, (_, (key, value)) in forged.items():
                md = await client.publish_raw("security.policies", value, key=key)
                where[(topic, md.offset)] = name
            identity_topic = settings.topic("security.identities")
            md = await client.publish_raw(
                "security.identities",
                *reversed(_unsigned(AgentIdentity(agent_id="mallory", roles=["admin"]))),
            )
            where[(identity_topic, md.offset)] = "unsigned-identity"
            forged["unsigned-identity"] = ("unsigned", (b"mallory", None))

            # a signed change after the forgeries: once it is in force, the worker's
            # store has read past every forged record
            sentinel = tmp_path / "sentinel.yaml"
            sentinel.write_text("policy_id: sentinel\nlevel: public\n")
            assert cli(env, "policy", "apply", str(sentinel)).returncode == 0

            async def sentinel_in_force() -> dict[str, Any] | None:
                body = await in_force()
                return body if "sentinel" in versions(body) else None

            body = await await_until(sentinel_in_force, 60, what="sentinel policy in force")
            assert body["enabled"] is True and body["default_action"] == "allow"
            assert versions(body) == {"no-secrets": 2, "sentinel": 1}
            no_secrets = next(p for p in body["policies"] if p["policy_id"] == "no-secrets")
            assert no_secrets["blocked_patterns"] == ["forbidden", "banned"]
            assert no_secrets["signed_by"] == "admin"

            # -- the worker still decides with the signed rules ----------------------------
            for mid, content in (("m-one", "this is forbidden"), ("m-two", "banned!")):
                await client.publish("agent.messages", _message(mid, content))
            await client.publish("agent.messages", _message("m-fine", "hello"))

            def rejected_ids() -> set[str]:
                return {ev.payload.message_id for ev in follow.events("agent.messages.rejected")}

            try:
                await await_until(
                    lambda: {"m-one", "m-two"} <= rejected_ids(), 60, what="rejections"
                )
            except AssertionError as exc:  # where enforce_policy waits, for the diagnosis
                seen = {
                    name: [ev.payload for ev in follow.events(name)]
                    for name in ("agent.messages.accepted", "agent.messages.rejected")
                }
                raise AssertionError(f"{exc}: {seen}\n{worker.task_dump()}") from None
            await await_until(
                lambda: any(
                    ev.payload.message_id == "m-fine"
                    for ev in follow.events("agent.messages.accepted")
                ),
                60,
                what="the harmless message accepted",
            )
            accepted = {ev.payload.message_id for ev in follow.events("agent.messages.accepted")}
            assert not accepted & {"m-one", "m-two"}

            # -- one report per forged record, with its reason -----------------------------
            await await_until(
                lambda: len(follow.payloads(SecurityChangeRejected)) >= len(forged),
                60,
                what="a rejection report per forged record",
            )
            all_reports = await read_topic(
                settings.bootstrap, settings.topic("security.changes.rejected"), idle=2.0
            )
            reports = [ev.payload for _, ev in all_reports if ev is not None]
            assert len(reports) == len(forged), reports
            reported = Counter(where.get((settings.topic(r.topic), r.offset), "?") for r in reports)
            assert reported == Counter(list(forged)), reported
            for report in reports:
                name = where[(settings.topic(report.topic), report.offset)]
                assert report.reason.split(":", 1)[0] == forged[name][0], (name, report)
                assert report.partition == 0
            by_name = {where[(settings.topic(r.topic), r.offset)]: r for r in reports}
            assert by_name["under-config-key"].key == "__config__"
            assert by_name["under-config-key"].signed_by == "admin"
            assert by_name["forged-policy"].event_type == "security.policy"
            assert "does not verify" in by_name["forged-policy"].reason
            assert by_name["replayed-v1"].reason.startswith("rollback: security.policy")
            assert worker.alive()

            # -- a restarted guard starts mid-topic and still knows what is in force -------
            worker.stop()
            md = await client.publish_raw("security.policies", v1_policy.value, key=b"no-secrets")
            worker.start()
            await await_until(
                lambda: len(follow.payloads(SecurityChangeRejected)) > len(forged),
                60,
                what="the replay published while the worker was down reported",
            )
            last = follow.payloads(SecurityChangeRejected)[-1]
            assert (last.offset, last.reason.split(":")[0]) == (md.offset, "rollback")
            assert len(follow.payloads(SecurityChangeRejected)) == len(forged) + 1
    finally:
        worker.stop()

    # the CLI reads the topic as workers do: the forgeries changed nothing
    listed = cli(env, "policy", "list", "--json")
    state = json.loads(listed.stdout)
    assert state["__config__"]["enabled"] is True
    assert state["no-secrets"]["version"] == 2
    assert orjson.loads(v1_policy.value)["payload"]["version"] == 1

"""Signed rule changes: which records of the rule topics a worker applies
(`streams.tables.security.check_record`, shared by the policy store, the guard agent and
the CLI), the store built on it, and the CLI commands that need no broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from agentstream.agents.security.cli import (
    PolicyFileError,
    parse_policy_file,
    validate_policies,
    version_floor,
)
from agentstream.agents.security.store import PolicyStore
from agentstream.schemas import Event, encode
from agentstream.schemas.security import (
    AgentIdentity,
    AgentIdentityRevoked,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
    WorkerKeyPublished,
)
from agentstream.streams.cli import cli
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.tables import rebuild
from agentstream.streams.tables.security import (
    BAD_SIGNATURE,
    CONFIG_KEY,
    IDENTITIES,
    KEY_MISMATCH,
    MISPLACED,
    POLICIES,
    REMOVED_KEY,
    RESERVED_KEY,
    ROLLBACK,
    TOMBSTONE,
    UNDECODABLE,
    UNSIGNED,
    UNTRUSTED_KEY,
    check_event,
    check_record,
    fold_change,
    policy_view,
    signers_of,
    trusted_admin_keys,
)
from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES, SECURITY_WORKER_KEYS
from tests.support import AdminSigner, with_admin_key

MAX = 1 << 20
ADMIN = AdminSigner("ops")


def _raw(payload: Any) -> tuple[bytes, bytes]:
    """An unsigned change as a producer with write access would publish it."""
    event = Event.of(payload, source="attacker")
    return event.key.encode(), encode(event)


def _code(topic: str, key: bytes | None, value: bytes | None, state: dict[str, Any]) -> str:
    checked = check_record(topic, key, value, state, ADMIN.trusted, max_bytes=MAX)
    return checked.refusal.code if checked.refusal else "apply"


def _fold(topic: str, records: list[tuple[bytes | None, bytes | None]]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in records:
        checked = check_record(topic, key, value, state, ADMIN.trusted, max_bytes=MAX)
        if checked.apply:
            assert checked.event is not None
            fold_change(topic, state, checked.event, ADMIN.trusted)
    return state


def test_signed_changes_apply_and_forgeries_do_not() -> None:
    state = _fold(
        SECURITY_POLICIES,
        [
            ADMIN.record(SecurityPolicy(policy_id="p", blocked_patterns=["x"])),
            ADMIN.record(SecurityConfig(enabled=True, default_action="deny")),
        ],
    )
    assert set(policy_view(state)) == {"p", CONFIG_KEY}
    # an unsigned config that would switch security off
    assert _code(SECURITY_POLICIES, *_raw(SecurityConfig(enabled=False, version=9)), state) == (
        UNSIGNED
    )
    # an unsigned removal
    removal = SecurityPolicyRemoved(policy_id="p", version=2)
    assert _code(SECURITY_POLICIES, *_raw(removal), state) == UNSIGNED
    # signed by a key nobody trusts
    rogue = AdminSigner("rogue")
    assert _code(SECURITY_POLICIES, *rogue.record(removal), state) == UNTRUSTED_KEY
    # a trusted key id with a forged signature
    forged = AdminSigner("ops")
    assert _code(SECURITY_POLICIES, *forged.record(removal), state) == BAD_SIGNATURE
    # a signed change altered after signing
    key, value = ADMIN.record(SecurityPolicy(policy_id="p", version=3, blocked_patterns=["x"]))
    tampered = value.replace(b'"blocked_patterns":["x"]', b'"blocked_patterns":[]')
    assert tampered != value
    assert _code(SECURITY_POLICIES, key, tampered, state) == BAD_SIGNATURE
    # the signed one applies
    assert _code(SECURITY_POLICIES, *ADMIN.record(removal), state) == "apply"


def test_reserved_keys_and_ids_never_land_on_the_config() -> None:
    state: dict[str, Any] = {}
    policy_key, policy_value = ADMIN.record(SecurityPolicy(policy_id="p"))
    # a validly signed policy replayed under the config's key
    assert _code(SECURITY_POLICIES, b"__config__", policy_value, state) == RESERVED_KEY
    # ... or under another policy's key (compaction would erase that one)
    assert _code(SECURITY_POLICIES, b"q", policy_value, state) == KEY_MISMATCH
    # a policy named __config__ does not even decode
    body = orjson.loads(policy_value)
    body["payload"]["policy_id"] = "__config__"
    assert _code(SECURITY_POLICIES, b"__config__", orjson.dumps(body), state) == UNDECODABLE
    assert _code(SECURITY_POLICIES, b"__config__", b"not json", state) == UNDECODABLE
    # tombstones delete nothing
    state = _fold(SECURITY_POLICIES, [(policy_key, policy_value)])
    assert _code(SECURITY_POLICIES, b"__config__", None, state) == TOMBSTONE
    assert _code(SECURITY_POLICIES, b"p", None, state) == TOMBSTONE
    # a signed identity is not a policy change, nor a policy an identity
    grant = ADMIN.record(AgentIdentity(agent_id="a", roles=["planner"]))
    assert _code(SECURITY_POLICIES, *grant, state) == MISPLACED
    assert _code(SECURITY_IDENTITIES, policy_key, policy_value, {}) == MISPLACED
    assert _code(SECURITY_IDENTITIES, *grant, {}) == "apply"


def test_replayed_older_versions_never_roll_back() -> None:
    v1 = ADMIN.record(SecurityPolicy(policy_id="p", version=1, max_message_size=10))
    v2 = ADMIN.record(SecurityPolicy(policy_id="p", version=2, max_message_size=20))
    state = _fold(SECURITY_POLICIES, [v1, v2])
    assert state["p"]["version"] == 2
    assert _code(SECURITY_POLICIES, *v1, state) == ROLLBACK
    assert _code(SECURITY_POLICIES, *v2, state) == ROLLBACK  # not newer: a replay
    # a removal must be newer than the removed policy
    old_removal = ADMIN.record(SecurityPolicyRemoved(policy_id="p", version=2))
    assert _code(SECURITY_POLICIES, *old_removal, state) == ROLLBACK
    removal = ADMIN.record(SecurityPolicyRemoved(policy_id="p", version=3))
    state = _fold(SECURITY_POLICIES, [v1, v2, removal])
    assert "p" not in state and state[REMOVED_KEY] == {"p": 3}
    # a policy removed stays removed: its old versions are not applied again
    assert _code(SECURITY_POLICIES, *v2, state) == ROLLBACK
    assert version_floor(state, "p", REMOVED_KEY) == 3
    v4 = ADMIN.record(SecurityPolicy(policy_id="p", version=4))
    state = _fold(SECURITY_POLICIES, [v1, v2, removal, v4])
    assert state["p"]["version"] == 4 and REMOVED_KEY not in state
    # configs
    c1 = ADMIN.record(SecurityConfig(version=1, enabled=True))
    c2 = ADMIN.record(SecurityConfig(version=2, enabled=False))
    state = _fold(SECURITY_POLICIES, [c1, c2])
    assert _code(SECURITY_POLICIES, *c1, state) == ROLLBACK
    # identities and their revocations
    g1 = ADMIN.record(AgentIdentity(agent_id="a", version=1, roles=["planner"]))
    r2 = ADMIN.record(AgentIdentityRevoked(agent_id="a", version=2))
    state = _fold(SECURITY_IDENTITIES, [g1, r2])
    assert "a" not in state
    assert _code(SECURITY_IDENTITIES, *g1, state) == ROLLBACK
    assert _code(SECURITY_IDENTITIES, *r2, state) == ROLLBACK
    # worker keys
    k1 = ADMIN.record(WorkerKeyPublished(key_id="w", public_key=ADMIN.public, version=1))
    state = _fold(SECURITY_WORKER_KEYS, [k1])
    assert _code(SECURITY_WORKER_KEYS, *k1, state) == ROLLBACK
    assert _code(
        SECURITY_WORKER_KEYS, *_raw(WorkerKeyPublished(key_id="x", public_key="k")), {}
    ) == (UNSIGNED)


def test_store_applies_only_signed_changes_and_exposes_identities_and_signers() -> None:
    store = PolicyStore(Settings(), trusted=ADMIN.trusted)
    records = [
        ADMIN.record(SecurityPolicy(policy_id="p", blocked_patterns=["secret"])),
        ADMIN.record(SecurityConfig(version=1, enabled=True, default_action="deny")),
        _raw(SecurityConfig(version=5, enabled=False, default_action="allow")),
        _raw(SecurityPolicyRemoved(policy_id="p", version=7)),
        (b"__config__", ADMIN.record(SecurityPolicy(policy_id="q"))[1]),
        ADMIN.record(SecurityPolicy(policy_id="p", version=1, blocked_patterns=[])),
    ]
    codes = [store.apply_record(k, v).refusal for k, v in records]
    assert [c.code if c else None for c in codes] == [
        None,
        None,
        UNSIGNED,
        UNSIGNED,
        RESERVED_KEY,
        ROLLBACK,
    ]
    grant = ADMIN.record(AgentIdentity(agent_id="a", roles=["Planner "]))
    assert store.apply_record(*grant, topic=SECURITY_IDENTITIES).apply
    store.commit()
    assert store.policy_set.enabled
    assert [p.policy.policy_id for p in store.policy_set.policies] == ["p"]
    assert store.signers == {"p": "ops"}
    ident = store.identities.get("a")
    assert ident is not None and ident.roles == frozenset({"planner"})
    assert ident.signed_by == "ops"
    assert store.ignored == {UNSIGNED: 2, RESERVED_KEY: 1, ROLLBACK: 1}
    assert store.problem is None


@pytest.mark.parametrize("spec", ["", "  ", "ops=not-base64!", "no-equals-sign"])
def test_no_trusted_admin_key_applies_nothing(spec: str) -> None:
    store = PolicyStore(Settings(security_admin_keys=spec, security_default_action="allow"))
    assert store.trusted == {} and store.problem
    assert "no change applies" in store.problem
    assert not store.apply_record(*ADMIN.record(SecurityConfig(enabled=False))).apply
    assert not store.apply_record(*ADMIN.record(SecurityPolicy(policy_id="p"))).apply
    store.commit()
    assert store.policy_set.enabled and not store.policy_set.policies  # the settings hold
    assert store.policy_set.default_action.value == "allow"


def test_store_reads_its_admin_keys_from_settings() -> None:
    store = PolicyStore(Settings(security_admin_keys=f" {ADMIN.setting} ,"))
    assert store.problem is None and set(store.trusted) == {"ops"}
    assert store.apply_record(*ADMIN.record(SecurityPolicy(policy_id="p"))).apply
    assert trusted_admin_keys("a=AAAA")[1]  # not a 32-byte key


def test_inline_config_policies_are_signed_by_the_config() -> None:
    state = _fold(
        SECURITY_POLICIES,
        [
            ADMIN.record(SecurityConfig(policies=[SecurityPolicy(policy_id="inline")])),
            ADMIN.record(SecurityPolicy(policy_id="p")),
        ],
    )
    assert signers_of(state) == {"inline": "ops", "p": "ops"}


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminSigner]:
    """This process's settings trust ADMIN (for the TableSpec folds, which read them)."""
    monkeypatch.setenv("AGENTSTREAM_SECURITY_ADMIN_KEYS", ADMIN.setting)
    get_settings.cache_clear()
    yield ADMIN
    get_settings.cache_clear()


def test_rebuild_folds_like_the_store(admin_env: AdminSigner) -> None:
    events = [
        ADMIN.event(SecurityPolicy(policy_id="a", max_message_size=10)),
        ADMIN.event(SecurityPolicy(policy_id="b")),
        Event.of(SecurityPolicyRemoved(policy_id="a", version=5), source="attacker"),
        ADMIN.event(SecurityPolicy(policy_id="a", version=2, max_message_size=20)),
        ADMIN.event(SecurityPolicyRemoved(policy_id="b", version=2)),
        ADMIN.event(SecurityPolicy(policy_id="a", version=1)),
        ADMIN.event(SecurityConfig(enabled=False, default_action="allow")),
        Event.of(SecurityConfig(version=2, enabled=True), source="attacker"),
    ]
    state = rebuild(POLICIES, events)
    assert set(policy_view(state)) == {"a", CONFIG_KEY}
    assert state["a"]["version"] == 2 and state["__config__"]["enabled"] is False
    store = PolicyStore(Settings.from_env())
    for ev in events:
        store.apply_record(ev.key.encode(), encode(ev))
    assert store.state == state
    ids = [ADMIN.event(AgentIdentity(agent_id="x", roles=["r"]))]
    assert set(rebuild(IDENTITIES, ids)) == {"x"}


def test_deeply_nested_policy_file_is_one_error() -> None:
    with pytest.raises(PolicyFileError, match="nested too deeply"):
        parse_policy_file("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyFileError):
        parse_policy_file("policies: " + "[" * 100_000)


def test_versions_continue_after_a_removal() -> None:
    state = _fold(
        SECURITY_POLICIES,
        [
            ADMIN.record(SecurityPolicy(policy_id="p", version=1)),
            ADMIN.record(SecurityPolicyRemoved(policy_id="p", version=2)),
        ],
    )
    out, unchanged, problems = validate_policies([{"policy_id": "p"}], state)
    assert not problems and not unchanged and out[0].version == 3
    _, _, problems = validate_policies([{"policy_id": "p", "version": 2}], state)
    assert problems and "not newer" in problems[0]
    _, _, problems = validate_policies([{"policy_id": "p", "signature": "x"}], state)
    assert problems and "set by the CLI" in problems[0]
    _, _, problems = validate_policies([{"policy_id": "__config__"}], state)
    assert problems and "reserved" in problems[0]


@pytest.fixture
def keyring_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = with_admin_key({}, tmp_path, AdminSigner("ops"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AGENTSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


def test_publishing_without_the_admin_key_is_exit_2(
    keyring_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSTREAM_SECURITY_ADMIN_KEY_ID", "someone-else")
    get_settings.cache_clear()
    policy = tmp_path / "p.yaml"
    policy.write_text("policy_id: p\n")
    runner = CliRunner()
    for args in (
        ["policy", "apply", str(policy)],
        ["policy", "remove", "p"],
        ["identity", "grant", "a", "--role", "planner"],
        ["identity", "revoke", "a"],
    ):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        assert "admin_key.someone-else" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_admin_keygen_refuses_to_overwrite(keyring_env: dict[str, str]) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["admin", "keygen", "--id", "new"])
    assert res.exit_code == 0, res.output
    line = [x for x in res.output.splitlines() if x.startswith("AGENTSTREAM_SECURITY_ADMIN_KEYS=")]
    spec = line[0].split("=", 1)[1]
    keys, problem = trusted_admin_keys(spec)
    assert problem is None and set(keys) == {"new"}
    again = runner.invoke(cli, ["admin", "keygen", "--id", "new"])
    assert again.exit_code == 1 and "--force" in again.output
    forced = runner.invoke(cli, ["admin", "keygen", "--id", "new", "--force"])
    assert forced.exit_code == 0 and spec not in forced.output
    # the existing admin key (made by with_admin_key) is refused too
    assert runner.invoke(cli, ["admin", "keygen", "--id", "ops"]).exit_code == 1


def test_check_event_without_a_kafka_key() -> None:
    event = ADMIN.event(SecurityPolicy(policy_id="p"))
    assert check_event(SECURITY_POLICIES, event, {}, ADMIN.trusted) is None
    assert check_event(SECURITY_POLICIES, event, {}, {}) is not None


def test_a_record_the_kafka_client_could_not_parse_is_never_applied() -> None:
    """A record whose header key is not UTF-8 reaches every fold as a stand-in carrying
    its value bytes: a well-signed change among them is refused with that reason, not
    applied by one reader and refused by another."""
    from agentstream.streams.record_batches import Unreadable

    key, value = ADMIN.record(SecurityPolicy(policy_id="p", blocked_patterns=["x"]))
    assert _code(SECURITY_POLICIES, key, value, {}) == "apply"
    stand_in = Unreadable(
        value, reason="header key b'\\xff' is not UTF-8", first_offset=4, last_offset=4
    )
    checked = check_record(SECURITY_POLICIES, key, stand_in, {}, ADMIN.trusted, max_bytes=MAX)
    assert checked.refusal is not None and not checked.apply
    assert checked.refusal.code == UNDECODABLE
    assert checked.refusal.detail.startswith(
        "a record the Kafka client cannot parse: offset 4: header key"
    )

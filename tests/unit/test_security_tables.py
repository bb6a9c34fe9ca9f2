"""Security table folds, the policy store's record handling, the key cache and the policy
file validation of `agentstream policy apply`."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from agentstream.agents.security.cli import PolicyFileError, parse_policy_file, validate_policies
from agentstream.agents.security.policy import KeyRequest
from agentstream.agents.security.store import KeyCache, PolicyStore
from agentstream.schemas import Event, encode
from agentstream.schemas.security import (
    PolicyDecision,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
    Verdict,
)
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.tables import TABLES, rebuild
from agentstream.streams.tables.security import (
    DECISION_COUNTS,
    POLICIES,
    apply_decision,
    counted,
    counter_value,
    keys_for,
    policy_view,
    summarise_counts,
)
from tests.support import AdminSigner


def _ev(payload: Any) -> Event[Any]:
    return Event.of(payload, source="test")


def test_policy_fold_and_rebuild_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # rule changes apply only when signed by a trusted admin key (tests/unit/
    # test_security_store.py has the refusals)
    admin = AdminSigner()
    monkeypatch.setenv("AGENTSTREAM_SECURITY_ADMIN_KEYS", admin.setting)
    get_settings.cache_clear()
    events = [
        admin.event(SecurityPolicy(policy_id="a", max_message_size=10)),
        admin.event(SecurityPolicy(policy_id="b")),
        admin.event(SecurityPolicy(policy_id="a", version=2, max_message_size=20)),
        admin.event(SecurityPolicyRemoved(policy_id="b", version=2)),
        admin.event(SecurityConfig(enabled=False, default_action="allow")),
    ]
    state = policy_view(rebuild(POLICIES, events))
    get_settings.cache_clear()
    assert set(state) == {"a", "__config__"}
    assert state["a"]["version"] == 2 and state["a"]["max_message_size"] == 20
    assert state["__config__"]["enabled"] is False
    assert TABLES["security_policies"] is POLICIES
    assert TABLES["security_decision_counts"] is DECISION_COUNTS

    store = PolicyStore(Settings(), trusted=admin.trusted)
    for ev in events:
        store.apply_record(ev.key.encode(), encode(ev))
    store.apply_record(b"x", b"not json")
    store.apply_record(b"a", None)  # tombstone
    store.commit()
    assert store.state == {
        "a": state["a"],
        "__config__": state["__config__"],
        "__removed__": {"b": 2},
    }
    assert store.invalid_records == 1 and not store.policy_set.enabled


def _decision(
    verdict: Verdict, rules: list[str], partition: int, offset: int | None = None
) -> Event[Any]:
    return _ev(
        PolicyDecision(
            message_id=f"m{offset}",
            message_event_id=f"e{offset}",
            sender_id="s",
            verdict=verdict,
            rules=rules,
            reasons=[f"{r}: x" for r in rules],
            evaluated_at=datetime.now(UTC),
            evaluation_us=3,
            source_partition=partition,
            source_offset=offset,
        )
    )


def _crash_and_restart(rng: random.Random, exact: bool) -> tuple[dict[str, int], dict[str, int]]:
    """One at-least-once kill -9 of the worker counting one partition's decisions, as a
    model: batches of messages are decided, their decisions and their counters' changelog
    records sent; the kill keeps a prefix of each (independently: two partitions of two
    topics); the offsets are committed up to a batch both had fully written. The restarted
    worker restores the counters from the changelog kept and decides again from the
    committed offset. Returns the live counts and the rebuild's, from the decisions kept
    and written after the restart; `exact` False counts as the table did before it kept
    offsets (a bare count per key)."""
    n, size = rng.randint(20, 60), rng.randint(1, 7)
    verdicts = [
        (Verdict.DENY, ["blocked_patterns"]) if rng.random() < 0.3 else (Verdict.ALLOW, [])
        for _ in range(n)
    ]

    def run(
        start: int, state: dict[str, Any]
    ) -> tuple[list[Event[Any]], list[tuple[str, Any]], list[tuple[int, int, int]]]:
        decisions: list[Event[Any]] = []
        changelog: list[tuple[str, Any]] = []
        ends: list[tuple[int, int, int]] = []  # (decisions, changelog records, next offset)
        for first in range(start, n, size):
            offsets: dict[str, list[int]] = {}
            for o in range(first, min(first + size, n)):
                v, rules = verdicts[o]
                decisions.append(_decision(v, rules, 0, o))
                for key in keys_for(0, v.value, rules):
                    offsets.setdefault(key, []).append(o)
            for key, offs in offsets.items():
                new = (
                    counted(state.get(key), offs)
                    if exact
                    else counter_value(state.get(key))[0] + len(offs)
                )
                if new is not None:
                    state[key] = new
                    changelog.append((key, new))
            ends.append((len(decisions), len(changelog), min(first + size, n)))
        return decisions, changelog, ends

    decisions, changelog, ends = run(0, {})
    kept_d, kept_c = rng.randint(0, len(decisions)), rng.randint(0, len(changelog))
    done = [end for d, c, end in ends if d <= kept_d and c <= kept_c]
    committed = rng.choice([0, *done])
    restored: dict[str, Any] = dict(changelog[:kept_c])
    again, _, _ = run(committed, restored)
    topic = decisions[:kept_d] + again
    rebuilt = rebuild(DECISION_COUNTS, topic) if exact else {}
    if not exact:
        for ev in topic:
            for key in keys_for(0, ev.payload.verdict.value, ev.payload.rules):
                rebuilt[key] = rebuilt.get(key, 0) + 1
    see = DECISION_COUNTS.comparable_items
    live = dict(see(restored.items()))
    if exact:  # one count per message: what each key counts among the n, once
        truth: dict[str, int] = {}
        for v, rules in verdicts:
            for key in keys_for(0, v.value, rules):
                truth[key] = truth.get(key, 0) + 1
        assert live == truth
    return live, dict(see(rebuilt.items()))


def test_counts_equal_their_rebuild_after_an_at_least_once_crash() -> None:
    """Messages decided again after a crash were counted again live, and their decisions
    written again counted again in a rebuild: the two differed by whichever of the outputs
    and the changelog records the kill kept (`security_decision_counts` was a tolerated
    difference in the fault-injection suite). With the offset kept in each counter both
    count every message once."""
    drifted = 0
    for seed in range(400):  # (each also checked against the true counts)
        live, rebuilt = _crash_and_restart(random.Random(seed), exact=True)
        assert live == rebuilt, seed
        plain_live, plain_rebuilt = _crash_and_restart(random.Random(seed), exact=False)
        drifted += plain_live != plain_rebuilt
    assert drifted > 40  # the model crashes where counting alone drifts


def test_decision_counts_by_verdict_and_rule_across_partitions() -> None:
    state: dict[str, Any] = {}
    for ev in [
        _decision(Verdict.ALLOW, [], 0),
        _decision(Verdict.ALLOW, [], 1),
        _decision(Verdict.DENY, ["blocked_patterns", "max_message_size"], 0),
        _decision(Verdict.DENY, ["blocked_patterns"], 1),
    ]:
        apply_decision(state, ev)
    # decisions without the offset of their message (written before they carried it) each
    # count
    assert state["0|deny|blocked_patterns"] == state["1|deny|blocked_patterns"] == [1, -1]
    assert summarise_counts(state.items()) == {
        "allow": {"*": 2},
        "deny": {"*": 2, "blocked_patterns": 2, "max_message_size": 1},
    }


async def test_key_cache_asks_the_keychain_once_per_ttl() -> None:
    now = [100.0]
    calls: list[KeyRequest] = []

    async def fetch(request: KeyRequest) -> bytes | str | None:
        calls.append(request)
        return {"signing": b"k" * 32, "token": "tok"}.get(request.kind)

    cache = KeyCache(fetch, ttl_s=30, miss_ttl_s=5, clock=lambda: now[0])
    wanted = {KeyRequest("signing", "a"), KeyRequest("token", "7"), KeyRequest("encryption", "k9")}
    view = await cache.view(wanted)
    assert view.signing_key("a") == b"k" * 32 and view.access_token(7) == "tok"
    assert view.encryption_key("k9") is None
    await cache.view(wanted)
    assert len(calls) == 3
    now[0] += 6  # the miss expired, the hits did not
    await cache.view(wanted)
    assert len(calls) == 4 and calls[-1] == KeyRequest("encryption", "k9")
    now[0] += 30
    await cache.view(wanted)
    assert len(calls) == 7


def test_policy_file_shapes() -> None:
    single, cfg = parse_policy_file("policy_id: a\nmax_message_size: 3\n")
    assert single == [{"policy_id": "a", "max_message_size": 3}] and cfg is None
    many, cfg = parse_policy_file('{"policies": [{"policy_id": "a"}], "default_action": "allow"}')
    assert many == [{"policy_id": "a"}] and cfg == {"default_action": "allow"}
    listed, _ = parse_policy_file("- policy_id: a\n- policy_id: b\n")
    assert [p["policy_id"] for p in listed] == ["a", "b"]
    for bad in ("{{{", "42", "policies: 3", "polices: []"):
        with pytest.raises(PolicyFileError):
            parse_policy_file(bad)


def test_policy_validation_names_patterns_and_assigns_versions() -> None:
    current = {
        "a": SecurityPolicy(policy_id="a", version=4, max_message_size=10).model_dump(mode="json")
    }
    out, unchanged, problems = validate_policies(
        [{"policy_id": "a", "max_message_size": 10}, {"policy_id": "b"}], current
    )
    assert (
        problems == []
        and unchanged == ["a"]
        and [(p.policy_id, p.version) for p in out] == [("b", 1)]
    )
    out, _, _ = validate_policies([{"policy_id": "a", "max_message_size": 11}], current)
    assert out[0].version == 5
    _, _, problems = validate_policies([{"policy_id": "a", "version": 4}], current)
    assert problems and "not newer than v4" in problems[0]
    _, _, problems = validate_policies(
        [
            {"policy_id": "x", "blocked_patterns": ["ok", "(a)\\1"]},
            {"policy_id": "y", "level": ""},
            {"policy_id": "x"},
            {"policy_id": "z", "allowed_patterns": ["a" * 2000]},
        ],
        {},
    )
    text = "\n".join(problems)
    assert "'(a)\\\\1' refused" in text
    assert "policy #2 (y): level" in text
    assert "appears twice" in text
    assert "policy #4 (z): allowed_patterns" in text


def test_a_counter_of_another_shape_is_compared_as_it_is() -> None:
    # an undecodable changelog record reads as {"undecodable_changelog_value": ...}: a
    # difference in the comparison, not an error ending it
    odd = {"undecodable_changelog_value": "eA=="}
    items = [("0|allow|*", [3, 7]), ("1|allow|*", 2), ("2|allow|*", odd), ("3|x|*", [1, "a"])]
    assert DECISION_COUNTS.comparable_items(items) == [
        ("0|allow|*", 3),
        ("1|allow|*", 2),
        ("2|allow|*", odd),
        ("3|x|*", [1, "a"]),
    ]
    assert counted(odd, [5]) == [1, 5]

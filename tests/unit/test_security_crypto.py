"""Canonical bytes, HMAC signatures and AES-GCM envelopes."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from agentstream.agents.security import crypto
from agentstream.schemas.messages import AgentMessage, AuthProof

ISSUED = datetime(2026, 12, 4, 22, 10, 0, 123456, tzinfo=UTC)


def _msg(**kw: object) -> AgentMessage:
    base: dict[str, object] = {
        "message_id": "m1",
        "sender_id": "alice",
        "recipient_id": "bob",
        "content": "héllo",
        "metadata": {"b": 1, "a": [1, "x"]},
    }
    base.update(kw)
    return AgentMessage.model_validate(base)


def _with_proof(message: AgentMessage, **changes: Any) -> AgentMessage:
    assert message.auth is not None
    proof = AuthProof.model_validate({**message.auth.model_dump(), **changes})
    return message.model_copy(update={"auth": proof})


def _v1_canonical_bytes(message: AgentMessage) -> bytes:
    """What main signed before v2 (no issue time, proof metadata not covered)."""
    data = {name: getattr(message, name) for name in crypto.SIGNED_FIELDS}
    if message.encryption is not None:
        data["encryption"] = message.encryption.model_dump(mode="json")
    return b"agentstream.agent-message.v1\n" + orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


# -- canonical bytes and signatures -----------------------------------------------------


def test_canonical_bytes_are_documented_exactly() -> None:
    expected = (
        b"agentstream.agent-message.v2\n"
        b'{"auth_method":"hmac-sha256","content":"h\xc3\xa9llo","content_type":"text/plain",'
        b'"encryption":null,"issued_at":"2026-12-04T22:10:00.123456Z","key_id":"team",'
        b'"message_id":"m1","metadata":{"a":[1,"x"],"b":1},"recipient_id":"bob",'
        b'"security_level":"standard","sender_id":"alice","sender_role":""}'
    )
    got = crypto.canonical_bytes(_msg(), auth_method="hmac-sha256", issued_at=ISSUED, key_id="team")
    assert got == expected
    key = b"k" * 32
    mac = hmac.new(key, expected, hashlib.sha256).hexdigest()
    assert crypto.signature(_msg(), key, issued_at=ISSUED, key_id="team") == mac
    signed = crypto.sign_message(_msg(), key, key_id="team", issued_at=ISSUED)
    assert signed.auth is not None
    assert signed.auth.signature == mac
    assert signed.auth.model_dump(mode="json")["issued_at"] == "2026-12-04T22:10:00.123456Z"


def test_canonical_bytes_without_issue_time_or_key_id_carry_null() -> None:
    got = crypto.canonical_bytes(_msg(), auth_method="hmac-sha256", issued_at=None, key_id=None)
    assert b'"issued_at":null' in got and b'"key_id":null' in got
    whole_second = ISSUED.replace(microsecond=0)
    got = crypto.canonical_bytes(
        _msg(), auth_method="hmac-sha256", issued_at=whole_second, key_id=None
    )
    assert b'"issued_at":"2026-12-04T22:10:00Z"' in got


def test_issue_time_is_signed_in_utc() -> None:
    key = crypto.new_key()
    plus_one = ISSUED.astimezone(timezone(timedelta(hours=1)))
    signed = crypto.sign_message(_msg(), key, issued_at=plus_one)
    assert signed.auth is not None and signed.auth.issued_at == ISSUED
    assert signed.auth.model_dump(mode="json")["issued_at"] == "2026-12-04T22:10:00.123456Z"
    assert signed.auth.signature == crypto.signature(_msg(), key, issued_at=ISSUED, key_id=None)
    # the same instant written with another offset is the same signed issue time
    relabelled = _with_proof(signed, issued_at=plus_one)
    assert crypto.verify_signature(relabelled, key, signed.auth.signature)
    with pytest.raises(ValueError, match="timezone-aware"):
        crypto.sign_message(_msg(), key, issued_at=datetime(2026, 12, 4, 22, 10))


def test_sign_message_dates_the_proof_now_by_default() -> None:
    before = datetime.now(UTC)
    signed = crypto.sign_message(_msg(), crypto.new_key())
    after = datetime.now(UTC)
    assert signed.auth is not None and signed.auth.issued_at is not None
    assert before <= signed.auth.issued_at <= after
    assert signed.auth.issued_at.utcoffset() == timedelta(0)
    assert signed.auth.key_id is None and signed.auth.method == "hmac-sha256"


def test_signature_ignores_the_proof_and_verifies_in_both_cases() -> None:
    key = crypto.new_key()
    signed = crypto.sign_message(_msg(), key)
    assert signed.auth is not None and signed.auth.signature
    assert crypto.verify_signature(signed, key, signed.auth.signature)
    assert crypto.verify_signature(signed, key, signed.auth.signature.upper())
    assert not crypto.verify_signature(signed, key, "00" * 32)
    assert not crypto.verify_signature(signed, crypto.new_key(), signed.auth.signature)
    # the message's own fields are covered
    for change in ({"content": "hello"}, {"security_level": "public"}, {"sender_role": "x"}):
        moved = signed.model_copy(update=change)
        assert not crypto.verify_signature(moved, key, signed.auth.signature)
    # without a proof there is no issue time, method or key id to verify against
    unproven = signed.model_copy(update={"auth": None})
    assert not crypto.verify_signature(unproven, key, signed.auth.signature)


def test_signed_message_verifies_after_a_wire_round_trip() -> None:
    key = crypto.new_key()
    signed = crypto.sign_message(crypto.encrypt_content(_msg(), key, "k1"), key, key_id="team")
    received = AgentMessage.model_validate_json(signed.model_dump_json())
    assert received.auth is not None and received.auth.signature
    assert crypto.verify_signature(received, key, received.auth.signature)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"issued_at": ISSUED + timedelta(microseconds=1)}, id="issued_at-later"),
        pytest.param({"issued_at": ISSUED - timedelta(days=1)}, id="issued_at-earlier"),
        pytest.param({"issued_at": None}, id="issued_at-removed"),
        pytest.param({"key_id": "other"}, id="key_id-relabelled"),
        pytest.param({"key_id": None}, id="key_id-removed"),
        pytest.param({"method": "access-token", "token": "t", "user_id": 1}, id="method"),
    ],
)
def test_signature_covers_the_proof_metadata(changes: dict[str, Any]) -> None:
    """Main signed no proof metadata: each of these re-dated/re-labelled proofs verified."""
    key = crypto.new_key()
    signed = crypto.sign_message(_msg(), key, key_id="team", issued_at=ISSUED)
    assert signed.auth is not None and signed.auth.signature
    assert crypto.verify_signature(signed, key, signed.auth.signature)
    tampered = _with_proof(signed, **changes)
    assert not crypto.verify_signature(tampered, key, signed.auth.signature)


@pytest.mark.parametrize("issued_at", [None, ISSUED], ids=["undated", "dated"])
def test_v1_signatures_no_longer_verify(issued_at: datetime | None) -> None:
    key = crypto.new_key()
    message = _msg()
    old = hmac.new(key, _v1_canonical_bytes(message), hashlib.sha256).hexdigest()
    proof = AuthProof(method="hmac-sha256", signature=old, issued_at=issued_at)
    captured = message.model_copy(update={"auth": proof})
    assert not crypto.verify_signature(captured, key, old)


TRICKY_IDS = [
    "a",
    "a\x00b",
    "a\x00",
    "\x00a",
    'a"',
    'a","recipient_id":"b',
    'a\\",\\"b',
    "a\\",
    "a\\\\",
    "é",
    "e\u0301",
    "\u2028",
    "\U0001f600",
    "a\nb",
    "a b",
    "null",
]


def test_canonical_bytes_are_injective_over_tricky_ids() -> None:
    seen: dict[bytes, tuple[str, ...]] = {}
    for sender in TRICKY_IDS:
        for recipient in TRICKY_IDS:
            for role in ("", "a\x00", 'a"'):
                key_id = recipient if role else None
                message = _msg(sender_id=sender, recipient_id=recipient, sender_role=role)
                got = crypto.canonical_bytes(
                    message, auth_method="hmac-sha256", issued_at=ISSUED, key_id=key_id
                )
                fields = (sender, recipient, role, str(key_id))
                assert seen.setdefault(got, fields) == fields, (fields, seen[got])
                # the bytes decode back to exactly these values: no field leaks into another
                assert got.startswith(crypto.CANONICAL_PREFIX)
                decoded = orjson.loads(got[len(crypto.CANONICAL_PREFIX) :])
                assert decoded["sender_id"] == sender
                assert decoded["recipient_id"] == recipient
                assert decoded["sender_role"] == role
                assert decoded["key_id"] == key_id
                assert decoded["issued_at"] == "2026-12-04T22:10:00.123456Z"
                assert decoded["auth_method"] == "hmac-sha256"
    assert len(seen) == len(TRICKY_IDS) ** 2 * 3


# -- encryption envelopes -------------------------------------------------------------


def test_aad_is_documented_exactly() -> None:
    message = _msg(sender_id="alice", recipient_id="bób", security_level="secret", sender_role="")
    assert crypto.aad_for(message, "k1") == (
        b"agentstream.content.v2"
        b"\x00\x00\x00\x05alice"
        b"\x00\x00\x00\x04b\xc3\xb3b"
        b"\x00\x00\x00\x02m1"
        b"\x00\x00\x00\x06secret"
        b"\x00\x00\x00\x00"
        b"\x00\x00\x00\x02k1"
    )


def test_envelope_round_trip_and_binding() -> None:
    key = crypto.new_key()
    sealed = crypto.encrypt_content(_msg(), key, "k1")
    assert sealed.content == "" and sealed.encryption is not None
    assert sealed.encryption.key_id == "k1"
    assert crypto.plaintext_size(sealed.encryption) == len("héllo".encode())
    assert crypto.decrypt_content(sealed, key) == "héllo"
    with pytest.raises(crypto.EnvelopeError, match="authenticate"):
        crypto.decrypt_content(sealed, crypto.new_key())
    with pytest.raises(crypto.EnvelopeError, match="authenticate"):
        crypto.decrypt_content(sealed.model_copy(update={"recipient_id": "eve"}), key)
    with pytest.raises(ValueError, match="32-byte"):
        crypto.encrypt_content(_msg(), b"short", "k1")


def test_nul_join_collision_no_longer_decrypts_across() -> None:
    """Main's AAD joined ids with NUL: these two messages had the same associated data."""
    key = crypto.new_key()
    first = _msg(sender_id="a", recipient_id="b\x00c")
    second = _msg(sender_id="a\x00b", recipient_id="c")
    assert crypto.aad_for(first, "k1") != crypto.aad_for(second, "k1")
    sealed = crypto.encrypt_content(first, key, "k1")
    assert crypto.decrypt_content(sealed, key) == "héllo"
    moved = second.model_copy(update={"content": "", "encryption": sealed.encryption})
    with pytest.raises(crypto.EnvelopeError, match="authenticate"):
        crypto.decrypt_content(moved, key)
    # and the other way round
    sealed = crypto.encrypt_content(second, key, "k1")
    moved = first.model_copy(update={"content": "", "encryption": sealed.encryption})
    with pytest.raises(crypto.EnvelopeError, match="authenticate"):
        crypto.decrypt_content(moved, key)


@pytest.mark.parametrize(
    "field, value",
    [
        # not bound on main: a ciphertext moved to these decrypted
        ("security_level", "public"),
        ("security_level", "Confidential"),  # a case change only: raw values are bound
        ("security_level", "confidential "),
        ("sender_role", "planner"),
        ("sender_role", ""),
        # bound on main too (kept as regression guards)
        ("message_id", "m2"),
        ("sender_id", "mallory"),
        ("recipient_id", "eve"),
    ],
)
def test_ciphertext_cannot_move_to_another_message(field: str, value: str) -> None:
    key = crypto.new_key()
    original = _msg(security_level="confidential", sender_role="auditor")
    sealed = crypto.encrypt_content(original, key, "k1")
    assert crypto.decrypt_content(sealed, key) == "héllo"
    moved = sealed.model_copy(update={field: value})
    with pytest.raises(crypto.EnvelopeError, match="authenticate"):
        crypto.decrypt_content(moved, key)


def test_ciphertext_cannot_be_relabelled_with_another_key_id() -> None:
    """Two key ids holding the same key (an alias, a rotation): the label is still bound."""
    key = crypto.new_key()
    sealed = crypto.encrypt_content(_msg(), key, "k1")
    assert sealed.encryption is not None
    for other in ("k2", "k1 ", "K1"):
        relabelled = sealed.encryption.model_copy(update={"key_id": other})
        moved = sealed.model_copy(update={"encryption": relabelled})
        with pytest.raises(crypto.EnvelopeError, match="authenticate"):
            crypto.decrypt_content(moved, key)


def test_tokens_compare_by_value() -> None:
    assert crypto.tokens_equal("abc", "abc")
    assert not crypto.tokens_equal("abc", "abd")
    assert not crypto.tokens_equal("abc", "abcd")


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 4, 12, 0, tzinfo=UTC),
        datetime(2026, 12, 4, 12, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 12, 4, 13, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))),
        datetime(1999, 1, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_the_issue_time_is_written_exactly_as_pydantic_writes_it(when: datetime) -> None:
    from pydantic import AwareDatetime, TypeAdapter

    expected = TypeAdapter(AwareDatetime).dump_python(when.astimezone(UTC), mode="json")
    assert crypto.issued_at_text(when) == expected

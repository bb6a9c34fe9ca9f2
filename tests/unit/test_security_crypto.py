"""Canonical bytes, HMAC signatures and AES-GCM envelopes."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from agents.security import crypto
from schemas.messages import AgentMessage


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


def test_canonical_bytes_are_documented_exactly() -> None:
    expected = (
        b"agentstream.agent-message.v1\n"
        b'{"content":"h\xc3\xa9llo","content_type":"text/plain","encryption":null,'
        b'"message_id":"m1","metadata":{"a":[1,"x"],"b":1},"recipient_id":"bob",'
        b'"security_level":"standard","sender_id":"alice","sender_role":"agent"}'
    )
    assert crypto.canonical_bytes(_msg()) == expected
    key = b"k" * 32
    assert crypto.signature(_msg(), key) == hmac.new(key, expected, hashlib.sha256).hexdigest()


def test_signature_ignores_the_proof_and_verifies_in_both_cases() -> None:
    key = crypto.new_key()
    signed = crypto.sign_message(_msg(), key)
    assert signed.auth is not None and signed.auth.signature
    assert crypto.verify_signature(signed, key, signed.auth.signature)
    assert crypto.verify_signature(signed, key, signed.auth.signature.upper())
    assert not crypto.verify_signature(signed, key, "00" * 32)
    assert not crypto.verify_signature(signed, crypto.new_key(), signed.auth.signature)


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


def test_tokens_compare_by_value() -> None:
    assert crypto.tokens_equal("abc", "abc")
    assert not crypto.tokens_equal("abc", "abd")
    assert not crypto.tokens_equal("abc", "abcd")

"""Message signatures (HMAC-SHA256) and content encryption (AES-256-GCM).

Canonical message bytes
-----------------------
A signature covers every field of an `AgentMessage` that says what the message is, who
sends it to whom, and what it carries — everything except the proof itself (`auth`)::

    canonical = b"agentstream.agent-message.v1\\n" + JSON

where JSON is the UTF-8 encoding of one object with exactly these keys, sorted by key,
without whitespace (``orjson.dumps(obj, option=OPT_SORT_KEYS)``; non-ASCII characters are
written as UTF-8, not escaped)::

    content, content_type, encryption, message_id, metadata, recipient_id,
    security_level, sender_id, sender_role

`encryption` is null or the envelope object {algorithm, ciphertext, key_id, nonce}
(so the signature covers the ciphertext, and a signed encrypted message is
encrypt-then-MAC). The signature is the lowercase hex HMAC-SHA256 of these bytes under the
sender's signing key (the raw key bytes).

Encryption envelope
-------------------
AES-256-GCM with a 12-byte random nonce; `ciphertext` is base64(ciphertext || 16-byte tag)
and `nonce` is base64 of the nonce. The associated data binds the ciphertext to the
message it travels in, so it cannot be cut and pasted into another one::

    aad = b"agentstream.content.v1\\x00" + sender_id + b"\\x00" + recipient_id
          + b"\\x00" + message_id
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.messages import AgentMessage, AuthProof, EncryptionEnvelope

CANONICAL_PREFIX = b"agentstream.agent-message.v1\n"
AAD_PREFIX = b"agentstream.content.v1\x00"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNED_FIELDS = (
    "content",
    "content_type",
    "encryption",
    "message_id",
    "metadata",
    "recipient_id",
    "security_level",
    "sender_id",
    "sender_role",
)


class EnvelopeError(ValueError):
    """The envelope is malformed, or the ciphertext does not authenticate under the key."""


def canonical_bytes(message: AgentMessage) -> bytes:
    data: dict[str, Any] = {}
    for name in SIGNED_FIELDS:
        value = getattr(message, name)
        data[name] = (
            value.model_dump(mode="json") if isinstance(value, EncryptionEnvelope) else value
        )
    return CANONICAL_PREFIX + orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def signature(message: AgentMessage, key: bytes) -> str:
    return hmac.new(key, canonical_bytes(message), hashlib.sha256).hexdigest()


def verify_signature(message: AgentMessage, key: bytes, claimed: str) -> bool:
    expected = signature(message, key)
    # compare_digest on equal-length ASCII: constant time in the content of the digest
    return hmac.compare_digest(expected.encode(), claimed.strip().lower().encode())


def tokens_equal(stored: str, claimed: str) -> bool:
    """Constant-time comparison of access tokens (hashed first so lengths do not leak)."""
    a = hashlib.sha256(stored.encode()).digest()
    b = hashlib.sha256(claimed.encode()).digest()
    return hmac.compare_digest(a, b)


def sign_message(message: AgentMessage, key: bytes, *, key_id: str | None = None) -> AgentMessage:
    """A copy of `message` carrying an hmac-sha256 proof (producers and tests)."""
    proof = AuthProof(method="hmac-sha256", signature=signature(message, key), key_id=key_id)
    return message.model_copy(update={"auth": proof})


def aad_for(sender_id: str, recipient_id: str, message_id: str) -> bytes:
    return b"\x00".join(
        (AAD_PREFIX[:-1], sender_id.encode(), recipient_id.encode(), message_id.encode())
    )


def encrypt_content(message: AgentMessage, key: bytes, key_id: str) -> AgentMessage:
    """A copy of `message` whose `content` is moved into an AES-256-GCM envelope."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256 needs a {KEY_BYTES}-byte key")
    nonce = os.urandom(NONCE_BYTES)
    aad = aad_for(message.sender_id, message.recipient_id, message.message_id)
    sealed = AESGCM(key).encrypt(nonce, message.content.encode(), aad)
    envelope = EncryptionEnvelope(
        key_id=key_id,
        nonce=base64.b64encode(nonce).decode(),
        ciphertext=base64.b64encode(sealed).decode(),
    )
    return message.model_copy(update={"content": "", "encryption": envelope})


def parse_envelope(envelope: EncryptionEnvelope) -> tuple[bytes, bytes]:
    """(nonce, ciphertext-with-tag) of a well-formed envelope, else `EnvelopeError`."""
    try:
        nonce = base64.b64decode(envelope.nonce, validate=True)
        sealed = base64.b64decode(envelope.ciphertext, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("envelope nonce or ciphertext is not base64") from None
    if len(nonce) != NONCE_BYTES:
        raise EnvelopeError(f"nonce is {len(nonce)} bytes, AES-GCM needs {NONCE_BYTES}")
    if len(sealed) < TAG_BYTES:
        raise EnvelopeError("ciphertext is shorter than the GCM tag")
    return nonce, sealed


def plaintext_size(envelope: EncryptionEnvelope) -> int:
    """GCM adds exactly the tag: the content size is known without the key."""
    return len(parse_envelope(envelope)[1]) - TAG_BYTES


def decrypt_content(message: AgentMessage, key: bytes) -> str:
    envelope = message.encryption
    if envelope is None:
        raise EnvelopeError("message has no encryption envelope")
    nonce, sealed = parse_envelope(envelope)
    if len(key) != KEY_BYTES:
        raise EnvelopeError(f"key {envelope.key_id!r} is not {KEY_BYTES} bytes")
    aad = aad_for(message.sender_id, message.recipient_id, message.message_id)
    try:
        plain = AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise EnvelopeError("ciphertext does not authenticate (wrong key or tampered)") from None
    try:
        return plain.decode()
    except UnicodeDecodeError:
        raise EnvelopeError("decrypted content is not UTF-8") from None


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)

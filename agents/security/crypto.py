"""Message signatures (HMAC-SHA256) and content encryption (AES-256-GCM).

Canonical message bytes (v2)
----------------------------
A signature covers every field of an `AgentMessage` that says what the message is, who
sends it to whom, and what it carries — everything except the proof itself (`auth`) — plus
the proof's own metadata (method, issue time, key id), so that a signature can be neither
re-dated nor re-labelled to another key::

    canonical = b"agentstream.agent-message.v2\\n" + JSON

where JSON is the UTF-8 encoding of one object with exactly these keys, sorted by key,
without whitespace (``orjson.dumps(obj, option=OPT_SORT_KEYS)``; non-ASCII characters are
written as UTF-8, not escaped)::

    auth_method, content, content_type, encryption, issued_at, key_id, message_id,
    metadata, recipient_id, security_level, sender_id, sender_role

`encryption` is null or the envelope object {algorithm, ciphertext, key_id, nonce}
(so the signature covers the ciphertext, and a signed encrypted message is
encrypt-then-MAC). `auth_method`, `issued_at` and `key_id` are the proof's: `auth_method`
is ``"hmac-sha256"``; `issued_at` is null or the issue time in UTC as pydantic writes it
in JSON mode — ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, the fraction (always 6 digits) omitted
when it is zero, e.g. ``"2026-12-04T22:10:00.123456Z"`` (a proof dated with another UTC
offset is signed as the same instant in UTC); `key_id` is null or the id of the signing key
(``signing_key.<key_id>`` in the keychain). For example::

    agentstream.agent-message.v2
    {"auth_method":"hmac-sha256","content":"hi","content_type":"text/plain",
     "encryption":null,"issued_at":"2026-12-04T22:10:00.123456Z","key_id":null,
     "message_id":"m1","metadata":{},"recipient_id":"bob","security_level":"standard",
     "sender_id":"alice","sender_role":""}

(one line after the prefix). The signature is the lowercase hex HMAC-SHA256 of these bytes
under the signing key (the raw key bytes). Two different messages never share canonical
bytes: every value is a JSON string, number, null or object, whose encoding escapes
quotes, backslashes and control characters (NUL included), so no character of a field can
end it or forge another key.

v1 signatures (prefix ``agentstream.agent-message.v1``, no issue time, proof metadata not
covered) no longer verify: a v1 signature carries no signed issue time, so a captured
message could be replayed forever in a fresh event envelope. Producers must re-sign with
`sign_message`.

Encryption envelope (AAD v2)
----------------------------
AES-256-GCM with a 12-byte random nonce; `ciphertext` is base64(ciphertext || 16-byte tag)
and `nonce` is base64 of the nonce. The associated data binds the ciphertext to the
message it travels in, so it cannot be cut and pasted into another one, nor moved to
another security level or claimed role, nor relabelled with another key id::

    aad = b"agentstream.content.v2"
          + for each of sender_id, recipient_id, message_id, security_level, sender_role,
            key_id (the envelope's), in this order:
                len(utf8(field)).to_bytes(4, "big") + utf8(field)

Length prefixes make the encoding injective (with the old NUL-joined v1 form, sender
``"a"`` / recipient ``"b\\0c"`` and sender ``"a\\0b"`` / recipient ``"c"`` collided). The
fields are bound exactly as they are on the wire, not normalised (no case folding,
trimming or default filling): any change of a bound field — even one the policy engine
would normalise away, e.g. ``"Confidential"`` vs ``"confidential"`` — must fail to
decrypt, and binding the exact bytes is strictly stronger than binding a normal form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentstream.schemas.base import utc_now
from agentstream.schemas.messages import AgentMessage, AuthProof, EncryptionEnvelope

CANONICAL_PREFIX = b"agentstream.agent-message.v2\n"
AAD_PREFIX = b"agentstream.content.v2"
SIGNATURE_METHOD = "hmac-sha256"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: the message's own fields covered by a signature (the proof's metadata is added to them)
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
#: the message fields bound by the AES-GCM associated data, in order (then the key id)
AAD_FIELDS = ("sender_id", "recipient_id", "message_id", "security_level", "sender_role")


class EnvelopeError(ValueError):
    """The envelope is malformed, or the ciphertext does not authenticate under the key."""


def issued_at_text(issued_at: datetime | None) -> str | None:
    """The issue time as the canonical bytes carry it: UTC, as pydantic writes it in JSON."""
    if issued_at is None:
        return None
    if issued_at.utcoffset() is None:
        raise ValueError("issued_at must be timezone-aware")
    # pydantic's JSON form ("...:00.123456Z", no fraction when it is zero), without a
    # pydantic round trip per verified message; a unit test checks both agree
    return issued_at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def canonical_bytes(
    message: AgentMessage,
    *,
    auth_method: str | None,
    issued_at: datetime | None,
    key_id: str | None,
) -> bytes:
    """The bytes a signature covers: the message's SIGNED_FIELDS and the proof's metadata
    (pass the proof's own values; `message.auth` itself is never read)."""
    data: dict[str, Any] = {name: getattr(message, name) for name in SIGNED_FIELDS}
    if message.encryption is not None:
        data["encryption"] = message.encryption.model_dump(mode="json")
    data["auth_method"] = auth_method
    data["issued_at"] = issued_at_text(issued_at)
    data["key_id"] = key_id
    return CANONICAL_PREFIX + orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def message_digest(message: AgentMessage) -> str:
    """Lowercase hex SHA-256 of `message`'s canonical bytes, with its own proof's method,
    issue time and key id (all null without a proof): what `PolicyDecision.message_digest`
    records (when it records one: `decisions.bound_digest`). It covers everything a
    signature covers, so a copy that `enforce_policy` forwarded (token removed,
    `auth.verified` and `auth.redacted` set: not covered) has the digest of the message it
    decided; a copy with any other field changed does not."""
    proof = message.auth
    data = canonical_bytes(
        message,
        auth_method=proof.method if proof is not None else None,
        issued_at=proof.issued_at if proof is not None else None,
        key_id=proof.key_id if proof is not None else None,
    )
    return hashlib.sha256(data).hexdigest()


def signature(
    message: AgentMessage,
    key: bytes,
    *,
    issued_at: datetime | None,
    key_id: str | None,
    auth_method: str = SIGNATURE_METHOD,
) -> str:
    """Lowercase hex HMAC-SHA256 of the canonical bytes under `key`."""
    data = canonical_bytes(message, auth_method=auth_method, issued_at=issued_at, key_id=key_id)
    # the one-shot C implementation: several times cheaper than hmac.new(...).hexdigest()
    return hmac.digest(key, data, "sha256").hex()


def verify_signature(message: AgentMessage, key: bytes, claimed: str) -> bool:
    """Whether `claimed` is the signature of `message` under `key`, computed over the
    proof's own method, issue time and key id (`message.auth`; no proof → False).

    Only the cryptography: whether the issue time is recent enough, and whether the key
    id is one the sender may use, is the caller's decision."""
    proof = message.auth
    if proof is None:
        return False
    expected = signature(
        message, key, issued_at=proof.issued_at, key_id=proof.key_id, auth_method=proof.method
    )
    # compare_digest on ASCII bytes: constant time in the content of the digest
    return hmac.compare_digest(expected.encode(), claimed.strip().lower().encode())


def tokens_equal(stored: str, claimed: str) -> bool:
    """Constant-time comparison of access tokens (hashed first so lengths do not leak)."""
    a = hashlib.sha256(stored.encode()).digest()
    b = hashlib.sha256(claimed.encode()).digest()
    return hmac.compare_digest(a, b)


def sign_message(
    message: AgentMessage,
    key: bytes,
    *,
    key_id: str | None = None,
    issued_at: datetime | None = None,
) -> AgentMessage:
    """A copy of `message` carrying an hmac-sha256 proof (producers and tests).

    `issued_at` defaults to now; it is stored in UTC. `key_id` names the signing key
    (``signing_key.<key_id>``); None = the key stored under the sender's id."""
    if issued_at is None:
        when = utc_now()
    elif issued_at.utcoffset() is None:
        raise ValueError("issued_at must be timezone-aware")
    else:
        when = issued_at.astimezone(UTC)
    proof = AuthProof(
        method=SIGNATURE_METHOD,
        signature=signature(message, key, issued_at=when, key_id=key_id),
        key_id=key_id,
        issued_at=when,
    )
    return message.model_copy(update={"auth": proof})


def aad_for(message: AgentMessage, key_id: str) -> bytes:
    """The AES-GCM associated data of `message`'s content sealed under key `key_id`:
    AAD_PREFIX, then each of AAD_FIELDS and the key id as a 4-byte big-endian length and
    its UTF-8 bytes, exactly as they are (not normalised)."""
    parts = [AAD_PREFIX]
    for value in (*(getattr(message, name) for name in AAD_FIELDS), key_id):
        raw = value.encode()
        parts.append(len(raw).to_bytes(4, "big"))
        parts.append(raw)
    return b"".join(parts)


def encrypt_content(message: AgentMessage, key: bytes, key_id: str) -> AgentMessage:
    """A copy of `message` whose `content` is moved into an AES-256-GCM envelope."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256 needs a {KEY_BYTES}-byte key")
    nonce = os.urandom(NONCE_BYTES)
    aad = aad_for(message, key_id)
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
    try:
        aad = aad_for(message, envelope.key_id)
    except UnicodeEncodeError:
        # a lone surrogate (only possible for a message built in Python, never decoded)
        raise EnvelopeError("a bound field is not encodable as UTF-8") from None
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

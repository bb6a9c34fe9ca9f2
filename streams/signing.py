"""Ed25519 signatures: rule changes signed by an admin, hash chains signed by workers.

Two kinds of signer, one primitive:

* **Admin keys** sign rule changes (policies, removals, the security config, identities,
  worker keys) with `agentstream policy apply` / `identity grant` / ... . Workers hold only
  the public halves (`AGENTSTREAM_SECURITY_ADMIN_KEYS`), so a worker (or anyone who can
  read its configuration) cannot forge a rule change.
* **Chain keys** sign the hash chains a worker writes (`security.decisions`,
  `llm.responses`). Their public halves are published, admin-signed, on
  `security.worker_keys`, and auditors may pin them (`audit verify --trust-key`).

Ed25519 rather than HMAC because verifiers must not be able to sign: with a shared
secret, every worker and auditor could forge what it checks.

What is signed
--------------
A change::

    b"agentstream.change.v1\\n" + orjson.dumps({"type": TYPE, "payload": PAYLOAD},
                                                OPT_SORT_KEYS)

where PAYLOAD is the payload as JSON with ``signature`` = "" (``signed_by`` is covered, so
a signature cannot be re-attributed to another key). A chain record::

    b"agentstream.chain.v1\\n" + hash

(the record's sha256 hex, which covers every field but the signature, and every earlier
record of the partition through ``prev_hash``).

Private keys live in the keychain as base64 of the raw 32-byte seed, under
``admin_key.<id>`` and ``chain_key.<id>``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agentstream.streams.errors import PipelineError

CHANGE_PREFIX = b"agentstream.change.v1\n"
CHAIN_PREFIX = b"agentstream.chain.v1\n"
ADMIN_ENTRY = "admin_key.{}"
CHAIN_ENTRY = "chain_key.{}"


class SigningError(PipelineError):
    """A key or a key list cannot be read (never includes key material)."""


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_to_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def private_from_b64(text: str) -> Ed25519PrivateKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (binascii.Error, ValueError):
        raise SigningError(
            "the stored private key is not base64 of a 32-byte Ed25519 seed"
        ) from None


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise SigningError("not base64 of a 32-byte Ed25519 public key") from None


def parse_public_keys(spec: str) -> dict[str, Ed25519PublicKey]:
    """``"id=base64,id2=base64"`` (whitespace and empty items ignored) → {id: key}."""
    keys: dict[str, Ed25519PublicKey] = {}
    for item in spec.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        kid, sep, b64 = item.partition("=")
        if not sep or not kid.strip():
            raise SigningError(f"expected id=base64, got {item[:40]!r}")
        try:
            keys[kid.strip()] = public_from_b64(b64)
        except SigningError as exc:
            raise SigningError(f"key {kid.strip()!r}: {exc}") from None
    return keys


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


def verify(key: Ed25519PublicKey, data: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def change_bytes(event_type: str, payload: Mapping[str, Any]) -> bytes:
    """What an admin signs for a change: its type and its JSON payload, signature blanked."""
    body = dict(payload)
    body["signature"] = ""
    return CHANGE_PREFIX + orjson.dumps(
        {"type": event_type, "payload": body}, option=orjson.OPT_SORT_KEYS
    )


def sign_change(
    event_type: str, payload: Mapping[str, Any], key: Ed25519PrivateKey, key_id: str
) -> dict[str, Any]:
    """The payload (JSON form) with `signed_by` = key_id and its signature set."""
    body = dict(payload)
    body["signed_by"] = key_id
    body["signature"] = sign(key, change_bytes(event_type, body))
    return body


def check_change(
    event_type: str, payload: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """None when the change carries a valid signature by a trusted key, else why not."""
    signed_by = str(payload.get("signed_by") or "")
    signature = str(payload.get("signature") or "")
    if not signature or not signed_by:
        return "unsigned"
    key = trusted.get(signed_by)
    if key is None:
        return f"signed by {signed_by!r}, which is not a trusted admin key"
    if not verify(key, change_bytes(event_type, payload), signature):
        return f"the signature by {signed_by!r} does not verify"
    return None


def chain_bytes(record_hash: str) -> bytes:
    return CHAIN_PREFIX + record_hash.encode()

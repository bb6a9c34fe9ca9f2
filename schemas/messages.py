"""Agent-to-agent messages, the input of `enforce_policy`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload, Time
from agentstream.schemas.limits import MESSAGE_METADATA, check_json_size, check_tree, limits_apply
from agentstream.schemas.registry import registry


class EncryptionEnvelope(Payload):
    """Authenticated encryption of `content` (AES-256-GCM); fields are base64."""

    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    key_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    nonce: str = Field(min_length=1, max_length=64)
    ciphertext: str = Field(min_length=1)


class AuthProof(Payload):
    """Proof of the sender's identity: an HMAC-SHA256 signature or an access-token reference."""

    method: Literal["hmac-sha256", "access-token"]
    #: hex HMAC-SHA256 over the canonical message bytes (method hmac-sha256)
    signature: str | None = Field(default=None, max_length=512)
    #: the access token itself is a secret; producers put it here only on the
    #: agent.messages topic, which `enforce_policy` strips before forwarding.
    token: str | None = Field(default=None, max_length=4096)
    user_id: int | None = None
    #: which key signed (hmac-sha256: the keychain id ``signing_key.<key_id>``, granted to
    #: the sender by its identity; unset = the key stored under the sender's own id)
    key_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    #: when the sender issued the message; signed, and checked against the replay window
    issued_at: Time | None = None
    #: set by `enforce_policy` on the copies it forwards: the proof is an access-token one
    #: (or carried a token) and the copy has no token. Never set it on a message you send:
    #: a proof that has it does not verify
    redacted: bool = False
    #: set by `enforce_policy` on the copies it forwards: whether this proof verified with
    #: a credential the sender's identity grants (`PolicyDecision.verified`). What a sender
    #: puts here is never forwarded, and a proof that has it set does not verify. A reader
    #: of `agent.messages.accepted` trusts the sender id only when this is true
    verified: bool = False

    @model_validator(mode="after")
    def _has_material(self) -> AuthProof:
        if self.method == "hmac-sha256" and not self.signature:
            raise ValueError("hmac-sha256 proof needs a signature")
        if self.method == "access-token" and not self.token and not self.redacted:
            raise ValueError("access-token proof needs a token")
        return self


@registry.register
class AgentMessage(Payload):
    TYPE = "agent.message"
    VERSION = 3
    KEY_FIELD = "sender_id"

    message_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    sender_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    recipient_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    #: the role the sender claims; "" = none (its granted roles apply). A claim is only
    #: honoured when the verified sender is granted that role (agents/security/identity.py)
    sender_role: str = Field(default="", max_length=128)
    #: the security level the sender claims for this message (selects policies)
    security_level: str = Field(default="standard", max_length=64)
    #: plaintext; empty when `encryption` carries the content
    content: str = ""
    content_type: str = Field(default="text/plain", max_length=128)
    encryption: EncryptionEnvelope | None = None
    auth: AuthProof | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=MESSAGE_METADATA.json_schema()
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any], validation: ValidationInfo) -> dict[str, Any]:
        # Bounded so that every decoded message can be scanned, re-encoded (orjson stops
        # at 255 levels) and decided: a deeper or larger tree is a dead letter instead.
        # Depth and items always (a deeper tree cannot be re-encoded, history or not);
        # the size is a producer limit (a rejected copy adds the reasons to it).
        check_tree(value, max_depth=MAX_METADATA_DEPTH, max_items=MAX_METADATA_ITEMS)
        if limits_apply(validation):
            check_json_size(value, MESSAGE_METADATA.json_bytes)
        return value


#: how deep `AgentMessage.metadata` may nest, and how many keys and values it may hold
MAX_METADATA_DEPTH = MESSAGE_METADATA.depth
MAX_METADATA_ITEMS = MESSAGE_METADATA.items


@registry.upcaster("agent.message", 1)
def _agent_message_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 called the text `body` and the role `role`, and had no security level."""
    payload["content"] = payload.pop("body", "")
    if "role" in payload:
        payload["sender_role"] = payload.pop("role")
    payload.setdefault("security_level", "standard")
    return payload


@registry.upcaster("agent.message", 2)
def _agent_message_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 proofs had no `verified` (read as not verified, which a v2 copy never said)."""
    return payload

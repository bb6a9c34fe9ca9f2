"""Agent-to-agent messages, the input of `enforce_policy`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.base import MAX_ID_LENGTH, Payload
from schemas.registry import registry


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
    key_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    #: set by `enforce_policy` when it removed the token before forwarding the message
    redacted: bool = False

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
    VERSION = 2
    KEY_FIELD = "sender_id"

    message_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    sender_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    recipient_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    sender_role: str = Field(default="agent", max_length=128)
    #: the security level the sender claims for this message (selects policies)
    security_level: str = Field(default="standard", max_length=64)
    #: plaintext; empty when `encryption` carries the content
    content: str = ""
    content_type: str = Field(default="text/plain", max_length=128)
    encryption: EncryptionEnvelope | None = None
    auth: AuthProof | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


@registry.upcaster("agent.message", 1)
def _agent_message_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 called the text `body` and the role `role`, and had no security level."""
    payload["content"] = payload.pop("body", "")
    if "role" in payload:
        payload["sender_role"] = payload.pop("role")
    payload.setdefault("security_level", "standard")
    return payload

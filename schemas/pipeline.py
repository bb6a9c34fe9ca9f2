"""The pipeline's own events: dead letters and checkpoints."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from agentstream.schemas.base import Payload, Time
from agentstream.schemas.registry import registry


@registry.register
class DeadLetter(Payload):
    """An input a consumer could not process, with everything needed to find and replay it."""

    TYPE = "pipeline.dead_letter"
    VERSION = 2
    KEY_FIELD = "consumer"

    #: the original value, base64; truncated beyond `deadletter_max_original_bytes` or
    #: what the dead letter has room for (then flagged), empty when withheld (flagged too)
    original_b64: str
    original_size: int = Field(ge=0)
    original_truncated: bool = False
    #: the record's key, base64 (None: it had none, or it was withheld); cut, and flagged,
    #: only when the dead letter has no room for it whole
    key_b64: str | None = None
    #: the key's size (None: no key, or a v1 dead letter)
    key_size: int | None = Field(default=None, ge=0)
    key_truncated: bool = False
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    error_class: str
    error_message: str = Field(max_length=8192)
    consumer: str
    retriable: bool = False


@registry.upcaster(DeadLetter.TYPE, 1)
def _dead_letter_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 kept every key whole and did not say how large it was."""
    return payload


@registry.register
class CheckpointWritten(Payload):
    """Table digests and the source offsets they cover, written by a worker."""

    TYPE = "pipeline.checkpoint"
    VERSION = 1
    KEY_FIELD = "worker_id"

    checkpoint_id: str
    worker_id: str
    taken_at: Time
    #: table name → sha256 hex digest of its sorted items
    tables: dict[str, str] = Field(default_factory=dict)
    #: table name → item count
    sizes: dict[str, int] = Field(default_factory=dict)
    #: "topic:partition" → next offset consumed
    offsets: dict[str, int] = Field(default_factory=dict)
    reason: str = "periodic"

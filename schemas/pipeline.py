"""The pipeline's own events: dead letters and checkpoints."""

from __future__ import annotations

from pydantic import Field

from agentstream.schemas.base import Payload, Time
from agentstream.schemas.registry import registry


@registry.register
class DeadLetter(Payload):
    """An input a consumer could not process, with everything needed to find and replay it."""

    TYPE = "pipeline.dead_letter"
    VERSION = 1
    KEY_FIELD = "consumer"

    #: the original value, base64; truncated only beyond `max_original_bytes` (then flagged)
    original_b64: str
    original_size: int = Field(ge=0)
    original_truncated: bool = False
    key_b64: str | None = None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    error_class: str
    error_message: str = Field(max_length=8192)
    consumer: str
    retriable: bool = False


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

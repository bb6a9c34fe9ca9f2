"""Versioned event models (pydantic v2). Imports nothing of ours; everyone imports this.

`registry.decode(bytes)` turns wire bytes into a validated `Event`; `encode(event)` is the
reverse. Importing this package registers every event type.
"""

from schemas import comms, health, llm, messages, pipeline, security
from schemas.base import Event, Payload, utc_now
from schemas.comms import CommunicationRecord
from schemas.errors import (
    InvalidEvent,
    PipelineError,
    SchemaError,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from schemas.health import (
    AgentStatusChanged,
    ComponentHealthChanged,
    Heartbeat,
    MetricSample,
    SystemStats,
)
from schemas.llm import (
    BreakerStateChanged,
    LLMCancelRequested,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
    LLMStreamChunk,
)
from schemas.messages import AgentMessage
from schemas.pipeline import CheckpointWritten, DeadLetter
from schemas.registry import EventRegistry, encode, registry
from schemas.security import PolicyDecision, SecurityConfig, SecurityPolicy, SecurityPolicyRemoved

__all__ = [
    "AgentMessage",
    "AgentStatusChanged",
    "BreakerStateChanged",
    "CheckpointWritten",
    "CommunicationRecord",
    "ComponentHealthChanged",
    "DeadLetter",
    "Event",
    "EventRegistry",
    "Heartbeat",
    "InvalidEvent",
    "LLMCancelRequested",
    "LLMConfig",
    "LLMContext",
    "LLMRequest",
    "LLMResponse",
    "LLMStreamChunk",
    "MetricSample",
    "Payload",
    "PipelineError",
    "PolicyDecision",
    "SchemaError",
    "SecurityConfig",
    "SecurityPolicy",
    "SecurityPolicyRemoved",
    "SystemStats",
    "UndecodableEvent",
    "UnknownEventType",
    "UnsupportedSchemaVersion",
    "comms",
    "encode",
    "health",
    "llm",
    "messages",
    "pipeline",
    "registry",
    "security",
    "utc_now",
]

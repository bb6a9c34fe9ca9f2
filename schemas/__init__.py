"""Versioned event models (pydantic v2). Imports nothing of ours; everyone imports this.

`registry.decode(bytes)` turns wire bytes into a validated `Event`; `encode(event)` is the
reverse. Importing this package registers every event type.
"""

from agentstream.schemas import comms, health, limits, llm, messages, pipeline, security
from agentstream.schemas.base import Event, Payload, utc_now
from agentstream.schemas.comms import CommunicationRecord
from agentstream.schemas.errors import (
    InvalidEvent,
    PipelineError,
    SchemaError,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from agentstream.schemas.health import (
    AgentStatusChanged,
    ComponentHealthChanged,
    Heartbeat,
    MetricSample,
    SystemStats,
)
from agentstream.schemas.llm import (
    BreakerStateChanged,
    LLMCancelRequested,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
    LLMStreamChunk,
)
from agentstream.schemas.messages import AgentMessage
from agentstream.schemas.pipeline import CheckpointWritten, DeadLetter
from agentstream.schemas.registry import EventRegistry, encode, registry
from agentstream.schemas.security import (
    PolicyDecision,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
)

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
    "limits",
    "llm",
    "messages",
    "pipeline",
    "registry",
    "security",
    "utc_now",
]

"""The one error tree of agentstream, rooted here because `schemas` imports nothing of ours.

```
PipelineError                      (retriable: bool, class attribute, overridable per instance)
├── SchemaError                    an event's bytes or fields are not acceptable  (never retriable)
│   ├── UndecodableEvent           not JSON / not an object / too large
│   ├── UnknownEventType           `type` names no registered event
│   ├── UnsupportedSchemaVersion   `schema_version` is newer than we know, or has no upcaster
│   └── InvalidEvent               fields missing, of the wrong type, or out of bounds
└── (streams.errors extends the tree: BrokerError, ProviderError, CircuitOpen, ...)
```

Retry logic reads `retriable` instead of matching classes, as aiokafka's errors do, so a
new error class decides its own retry behaviour in one place.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every error agentstream raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        if retriable is not None:
            self.retriable = retriable
        self.context = context

    def __str__(self) -> str:
        return self.message


class SchemaError(PipelineError):
    """The input is not an acceptable event. Retrying the same bytes cannot help."""

    retriable = False


class UndecodableEvent(SchemaError):
    """The bytes are not a JSON object, or exceed the size limit."""


class UnknownEventType(SchemaError):
    """The `type` field names no registered event."""


class UnsupportedSchemaVersion(SchemaError):
    """The `schema_version` is newer than this code knows, or no upcaster reaches it."""


class InvalidEvent(SchemaError):
    """Fields are missing, of the wrong type or out of bounds."""

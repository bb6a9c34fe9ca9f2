"""The pipeline's error tree (rooted in `schemas.errors.PipelineError`).

```
PipelineError                         retriable: bool — retry logic reads only this flag
├── SchemaError …                     (schemas.errors: undecodable, unknown type, invalid)
├── SettingsError                     (streams.settings) bad configuration
├── BrokerError                       Kafka unreachable or refused            retriable
│   └── BrokerAuthError               TLS or SASL refused (who we are)        not retriable
├── PublishError                      the broker refused or never acked a      per cause
│                                     record (streams.client); topic, key, cause
├── ProcessingError                   an agent failed on one decoded event    not retriable
├── UnreadableRecord                  the Kafka client could not parse a      not retriable
│                                     record or batch (streams.record_batches)
├── CredentialsError                  keychain missing, backend refused       not retriable
│   └── CredentialsNotFound
└── ProviderError                     an LLM provider call failed             per status
    ├── ProviderTimeout                                                        retriable
    ├── ProviderConnectionError                                                retriable
    ├── ProviderRateLimited           429; carries retry_after_s               retriable
    ├── ProviderServerError           5xx; may carry retry_after_s             retriable
    ├── ProviderRequestError          other 4xx                                not retriable
    ├── ProviderProtocolError         malformed SSE / JSON from the provider   retriable
    ├── CircuitOpen                   breaker open, failing fast               not retriable
    └── RequestCancelled              an llm.cancellations event arrived       not retriable
```
"""

from __future__ import annotations

from typing import Any

from agentstream.schemas.errors import (
    InvalidEvent,
    PipelineError,
    SchemaError,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from agentstream.streams.settings import SettingsError

__all__ = [
    "BrokerAuthError",
    "BrokerError",
    "CircuitOpen",
    "CredentialsError",
    "CredentialsNotFound",
    "InvalidEvent",
    "PipelineError",
    "ProcessingError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderProtocolError",
    "ProviderRateLimited",
    "ProviderRequestError",
    "ProviderServerError",
    "ProviderTimeout",
    "PublishError",
    "RequestCancelled",
    "SchemaError",
    "SettingsError",
    "UndecodableEvent",
    "UnknownEventType",
    "UnreadableRecord",
    "UnsupportedSchemaVersion",
]


class BrokerError(PipelineError):
    retriable = True


class BrokerAuthError(BrokerError):
    """The broker refused who we are (SASL login, client certificate) or we refused its
    certificate: retrying with the same settings cannot help."""

    retriable = False


class PublishError(PipelineError):
    """The broker refused a record, or did not acknowledge it in time: topic not
    authorized, record too large, unknown topic, delivery timeout. Not a `BrokerError`:
    the connection is fine, this record is not (a caller that reconnects on `BrokerError`
    would not help). `retriable` follows the cause: a timeout or a leader change may pass,
    an authorization or a size refusal will not."""

    def __init__(
        self,
        message: str,
        *,
        topic: str,
        key: str | bytes | None = None,
        cause: BaseException | None = None,
        retriable: bool | None = None,
        **context: Any,
    ) -> None:
        if retriable is None:
            retriable = _retriable_cause(cause)
        super().__init__(message, retriable=retriable, **context)
        self.topic = topic
        self.key = key
        self.cause = cause


def _retriable_cause(cause: BaseException | None) -> bool:
    # aiokafka's errors carry `retriable` themselves, except that its KafkaTimeoutError
    # (a record not acknowledged within the request timeout) says False: for the sender
    # another try is worth it, as for any timeout. Matched by name so that this module
    # imports nothing of aiokafka, as before.
    if isinstance(cause, TimeoutError) or any(
        c.__name__ == "KafkaTimeoutError" and c.__module__.startswith("aiokafka")
        for c in type(cause).__mro__
    ):
        return True
    return bool(getattr(cause, "retriable", False))


class ProcessingError(PipelineError):
    retriable = False


class UnreadableRecord(PipelineError):
    """A record (or the rest of a record batch) the Kafka client could not parse: a
    header key that is not UTF-8, a codec it cannot decode (`streams.record_batches`).
    The same bytes fail the same way again."""

    retriable = False


class CredentialsError(PipelineError):
    retriable = False


class CredentialsNotFound(CredentialsError):
    pass


class ProviderError(PipelineError):
    retriable = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        retriable: bool | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, retriable=retriable, **context)
        self.provider = provider
        self.status_code = status_code


class ProviderTimeout(ProviderError):
    retriable = True


class ProviderConnectionError(ProviderError):
    retriable = True


class ProviderRateLimited(ProviderError):
    retriable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class ProviderServerError(ProviderError):
    retriable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        #: 503 / Anthropic's 529 (overloaded) may say when to come back, as 429 does
        self.retry_after_s = retry_after_s


class ProviderRequestError(ProviderError):
    retriable = False


class ProviderProtocolError(ProviderError):
    retriable = True


class CircuitOpen(ProviderError):
    retriable = False


class RequestCancelled(ProviderError):
    retriable = False

"""The pipeline's error tree (rooted in `schemas.errors.PipelineError`).

```
PipelineError                         retriable: bool — retry logic reads only this flag
├── SchemaError …                     (schemas.errors: undecodable, unknown type, invalid)
├── SettingsError                     (streams.settings) bad configuration
├── BrokerError                       Kafka unreachable or refused            retriable
│   └── BrokerAuthError               TLS or SASL refused (who we are)        not retriable
├── ProcessingError                   an agent failed on one decoded event    not retriable
├── CredentialsError                  keychain missing, backend refused       not retriable
│   └── CredentialsNotFound
└── ProviderError                     an LLM provider call failed             per status
    ├── ProviderTimeout                                                        retriable
    ├── ProviderConnectionError                                                retriable
    ├── ProviderRateLimited           429; carries retry_after_s               retriable
    ├── ProviderServerError           5xx                                      retriable
    ├── ProviderRequestError          other 4xx                                not retriable
    ├── ProviderProtocolError         malformed SSE / JSON from the provider   retriable
    ├── CircuitOpen                   breaker open, failing fast               not retriable
    └── RequestCancelled              an llm.cancellations event arrived       not retriable
```
"""

from __future__ import annotations

from typing import Any

from schemas.errors import (
    InvalidEvent,
    PipelineError,
    SchemaError,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from streams.settings import SettingsError

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
    "RequestCancelled",
    "SchemaError",
    "SettingsError",
    "UndecodableEvent",
    "UnknownEventType",
    "UnsupportedSchemaVersion",
]


class BrokerError(PipelineError):
    retriable = True


class BrokerAuthError(BrokerError):
    """The broker refused who we are (SASL login, client certificate) or we refused its
    certificate: retrying with the same settings cannot help."""

    retriable = False


class ProcessingError(PipelineError):
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


class ProviderRequestError(ProviderError):
    retriable = False


class ProviderProtocolError(ProviderError):
    retriable = True


class CircuitOpen(ProviderError):
    retriable = False


class RequestCancelled(ProviderError):
    retriable = False

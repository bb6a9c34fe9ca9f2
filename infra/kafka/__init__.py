"""Local Apache Kafka broker for development and tests (see :mod:`infra.kafka.launcher`).

``python -m agentstream.infra.kafka start|stop|status`` runs it from a shell; the project's own
CLI calls the same functions.  :class:`~infra.kafka.secured.SecuredKafka` runs a broker
with mutual TLS, SCRAM over SASL_SSL and ACLs; it is imported on first use, because it
needs ``cryptography`` and the plaintext launcher must work before the project's
dependencies are installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentstream.infra.kafka.launcher import (
    BrokerConfig,
    BrokerStartError,
    external_bootstrap,
    start,
    status,
    stop,
    wait_ready,
)

if TYPE_CHECKING:
    from agentstream.infra.kafka.secured import SecuredKafka

__all__ = [
    "BrokerConfig",
    "BrokerStartError",
    "SecuredKafka",
    "external_bootstrap",
    "start",
    "status",
    "stop",
    "wait_ready",
]


def __getattr__(name: str) -> Any:
    if name == "SecuredKafka":
        from agentstream.infra.kafka.secured import SecuredKafka

        return SecuredKafka
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

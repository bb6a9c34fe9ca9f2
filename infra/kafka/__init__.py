"""Local Apache Kafka broker for development and tests (see :mod:`infra.kafka.launcher`).

``python -m infra.kafka start|stop|status`` runs it from a shell; the project's own
CLI calls the same functions.
"""

from infra.kafka.launcher import (
    BrokerConfig,
    BrokerStartError,
    external_bootstrap,
    start,
    status,
    stop,
    wait_ready,
)

__all__ = [
    "BrokerConfig",
    "BrokerStartError",
    "external_bootstrap",
    "start",
    "status",
    "stop",
    "wait_ready",
]

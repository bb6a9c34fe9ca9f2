"""Toxiproxy for network fault injection (see :mod:`infra.toxiproxy.server`).

``python -m agentstream.infra.toxiproxy install|start|stop|status`` from a shell;
:mod:`infra.toxiproxy.client` drives a running server over HTTP and
:mod:`infra.toxiproxy.kafka` puts Kafka brokers behind it.  Importing this package
needs only the standard library; the client modules need ``httpx``.
"""

from agentstream.infra.toxiproxy.server import (
    DEFAULT_API_PORT,
    TOXIPROXY_VERSION,
    ServerConfig,
    ToxiproxyError,
    install,
    server_pid,
    start_server,
    stop_server,
)

__all__ = [
    "DEFAULT_API_PORT",
    "TOXIPROXY_VERSION",
    "ServerConfig",
    "ToxiproxyError",
    "install",
    "server_pid",
    "start_server",
    "stop_server",
]

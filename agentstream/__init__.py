"""agentstream: event-sourced stream processing for multi-agent LLM platforms on Kafka.

The distribution installs one top-level import name, ``agentstream``, so that it can share
an environment with the OpenAI Agents SDK (whose import name is ``agents``) and with any
other package called ``streams`` or ``schemas``. The repository's folders are its
subpackages:

- ``agentstream.schemas``: the versioned event models (pydantic v2);
- ``agentstream.streams``: the Faust app, settings, topics, tables, delivery, client, CLI;
- ``agentstream.agents``: the Faust agents, one subpackage each;
- ``agentstream.infra``: the local Kafka launcher and monitoring files.

The client is re-exported here: ``from agentstream import Client``. It is loaded on first
use, so ``import agentstream`` stays cheap (no Kafka or Faust import).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("agentstream")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from agentstream.streams.client import AsyncClient, Client
    from agentstream.streams.errors import PublishError

#: name → module of the names this package re-exports (loaded lazily, PEP 562)
_LAZY = {
    "Client": "agentstream.streams.client",
    "AsyncClient": "agentstream.streams.client",
    "PublishError": "agentstream.streams.errors",
}

__all__ = ["AsyncClient", "Client", "PublishError", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agentstream' has no attribute {name!r}")
    return getattr(import_module(module), name)

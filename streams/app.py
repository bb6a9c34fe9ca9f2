"""The Faust app: the one obvious entry point of the pipeline.

Main flow
---------
1. `Settings.from_env()` fixes every knob (``AGENTSTREAM_*``) before anything connects.
2. `agentstream worker` makes sure every catalogue topic exists (`streams.admin`), then
   runs this app's Faust worker. Faust's autodiscovery imports the `agents` package —
   this module never imports it, so the dependency arrow stays schemas ← streams ← agents.
3. Each agent reads raw bytes from its topic (`catalogue_topic`), decodes them through
   `streams.processing.decoded_batches` — which dead-letters what it cannot decode before
   the offset is acknowledged — and publishes typed events with `streams.processing.emit`.
4. Tables (`streams.tables`) hold the agents' state, recovered from their changelog on
   start; web views expose health, metrics and state on `AGENTSTREAM_WEB_PORT`.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

import faust

from streams.settings import Settings, get_settings
from streams.topics import CATALOGUE


class AgentStreamApp(faust.App):
    """faust.App whose autodiscovery fails loudly: a broken agent module must stop the
    worker at start, not leave it running with that agent silently missing."""

    def _on_autodiscovery_error(self, name: str) -> None:
        # venusian calls this inside its `except` block: chain the real error.
        cause = sys.exc_info()[1]
        raise ImportError(f"autodiscovery failed importing {name}: {cause!r}") from cause


def create_app(settings: Settings) -> AgentStreamApp:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return AgentStreamApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        autodiscover=[m.strip() for m in settings.agents.split(",") if m.strip()],
        origin="streams",
        store="memory://",
        datadir=str(settings.data_dir / settings.app_id),
        processing_guarantee=settings.processing_guarantee,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        table_standby_replicas=settings.standby_replicas,
        # Catalogue topics are created by `streams.admin` with their retention and
        # compaction; Faust only declares its own internal (changelog) topics.
        topic_allow_declare=True,
        producer_acks=-1,
        producer_linger_ms=5,
        producer_max_batch_size=512 * 1024,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=16_384,
        stream_wait_empty=False,
        web_enabled=settings.web_enabled,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # Every table over HTTP without auth would leak agent state: only our views.
        web_tables_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        loghandlers=[],
    )


settings = get_settings()
app = create_app(settings)


@cache
def catalogue_topic(name: str) -> Any:
    """The Faust topic for a catalogue entry (raw bytes in, raw bytes out)."""
    spec = CATALOGUE[name]
    return app.topic(
        settings.topic(name),
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions or settings.topic_partitions,
        retention=spec.retention,
        compacting=spec.compacted,
        internal=False,
    )

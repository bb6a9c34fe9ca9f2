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

How fetched records reach the agents, and when their offsets may be committed, is
`streams.delivery` (the consumer, flow control and agent classes this app is built from).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from functools import cache, partial
from typing import Any

import faust
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from agentstream.streams.delivery import (
    BatchAgent,
    RefetchingFlowControl,
    consumer_state,
    end_recovery_at_log_end,
    new_transport,
)
from agentstream.streams.kafka_security import faust_credentials
from agentstream.streams.logging_setup import file_handler
from agentstream.streams.settings import (
    PRODUCER_MAX_REQUEST_BYTES,
    Settings,
    SettingsError,
    get_settings,
    url_host,
)
from agentstream.streams.tables import KeyHashPartitioner
from agentstream.streams.tables.restore import BulkRestoringTableManager
from agentstream.streams.topics import CATALOGUE
from agentstream.streams.web_auth import server_ssl_context


class AgentStreamApp(faust.App):
    """faust.App whose autodiscovery fails loudly: a broken agent module must stop the
    worker at start, not leave it running with that agent silently missing."""

    def _on_autodiscovery_error(self, name: str) -> None:
        # venusian calls this inside its `except` block: chain the real error.
        cause = sys.exc_info()[1]
        raise ImportError(f"autodiscovery failed importing {name}: {cause!r}") from cause

    async def on_first_start(self) -> None:
        await super().on_first_start()
        if self.conf.web_enabled:
            # `agentstream worker` installed it already; any other way of starting this
            # app (`faust -A agentstream.streams.app worker`) gets it here, before the web server
            # starts — or fails loudly (aiohttp refuses a late middleware), never open
            from agentstream.streams import web_auth

            web_auth.install(self, self.agentstream_settings)
        tune_gc()
        if self.in_transaction:
            self.add_future(end_recovery_at_log_end(self))

    #: fetch.max.wait.ms of the worker's consumer (`Settings.consumer_fetch_max_wait_ms`)
    fetch_max_wait_ms = 100
    #: the settings `create_app` built this app from
    agentstream_settings: Settings

    def _new_transport(self) -> Any:
        return new_transport(self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return RefetchingFlowControl(self, loop=self.loop)


#: CPython collects generation 0 every 700 allocations; an agent holding a decoded batch
#: of pydantic models then spends a third of its time in the collector (bench: pipeline
#: 19.6k -> 28.5k events/s with 10,000 and the start-up heap frozen).
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Freeze the start-up heap out of collections and collect generation 0 less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gc.get_threshold()[0]), gen1, gen2)


def advertised_url(settings: Settings) -> str | None:
    """What the other workers use to reach this one's web views (None: Faust's default,
    http://<web_host>:<web_port>). A wildcard bind address is no address to give out."""
    if settings.web_advertised_url:
        return settings.web_advertised_url.rstrip("/")
    # a worker serving HTTPS must be called over HTTPS (Faust's default says http)
    scheme = "https" if settings.web_tls_certfile else "http"
    if settings.web_host in ("0.0.0.0", "::", ""):
        return f"{scheme}://{socket.getfqdn()}:{settings.web_port}"
    # Faust's default puts an IPv6 literal in the URL without its brackets
    if scheme == "https" or ":" in settings.web_host:
        return f"{scheme}://{url_host(settings.web_host)}:{settings.web_port}"
    return None


def create_app(settings: Settings) -> AgentStreamApp:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    canonical = advertised_url(settings)
    new = AgentStreamApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        # TLS / SASL for every client the worker builds (consumer, producers, admin)
        broker_credentials=faust_credentials(settings),
        autodiscover=settings.agent_modules,
        origin="agentstream.streams",
        # Faust reads ~80 variables of its own (BROKER_SESSION_TIMEOUT, WEB_PORT,
        # APP_DATADIR ...) from the environment *over* what is passed here: a WEB_PORT
        # set for another program would move the views. AGENTSTREAM_* is the one source.
        env={},
        store="memory://",
        datadir=str(settings.data_dir / settings.app_id),
        processing_guarantee=settings.processing_guarantee,
        # an agent that raises abandons its batch unacked (`BatchAgent`)
        Agent=BatchAgent,
        # active tables restored from their changelogs in bulk (streams.tables.restore)
        TableManager=BulkRestoringTableManager,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        table_standby_replicas=settings.standby_replicas,
        # Catalogue topics are created by `streams.admin` with their retention and
        # compaction; Faust only declares its own internal (changelog) topics.
        topic_allow_declare=True,
        producer_acks=-1,
        # Kafka's default partitioner with cached key hashes (aiokafka's murmur2 is Python)
        producer_partitioner=KeyHashPartitioner(),
        producer_linger=settings.producer_linger_ms / 1000,
        producer_max_batch_size=512 * 1024,
        # Faust's default, named: what every output must fit (dead letters are fitted to
        # it, `streams.processing.dead_letter_of`; table writes, `streams.tables.write`)
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        consumer_auto_offset_reset="earliest",
        # Faust's 1 MiB per partition leaves the worker idle between fetch rounds when
        # it has a backlog: the default 4 MiB took a 200k-event backlog from 13k to 22k
        # events/s in bench/ on the per-record path (8 MiB was no faster)
        consumer_max_fetch_size=settings.consumer_max_partition_fetch_bytes,
        broker_commit_every=10_000,
        # fail-over after a kill -9: Faust's 60 s session left a dead member's partitions
        # idle for a minute; static membership hands a restarted worker its partitions
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        **(
            {"consumer_group_instance_id": settings.group_instance_id}
            if settings.group_instance_id
            else {}
        ),
        broker_commit_interval=settings.commit_interval_s,
        stream_buffer_maxsize=16_384,
        stream_wait_empty=False,
        web_enabled=settings.web_enabled,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # HTTPS with AGENTSTREAM_WEB_TLS_CERTFILE/KEYFILE (None: plain HTTP)
        web_ssl_context=server_ssl_context(settings),
        # Every table over HTTP without auth would leak agent state: only our views.
        web_tables_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        # Faust resets the root handlers at worker start; ours must be passed in here.
        loghandlers=[h for h in [file_handler(settings)] if h is not None],
        **({"canonical_url": canonical} if canonical else {}),
    )
    new.fetch_max_wait_ms = settings.consumer_fetch_max_wait_ms
    new.agentstream_settings = settings
    return new


def _settings_or_exit() -> Settings:
    """The settings this module builds the app from. `agentstream` validates them before
    it imports this module (and `--help` never does); anything else importing it with a
    bad environment — `faust -A agentstream.streams.app worker` — ends with the CLI's `Error:` lines
    and exit 2 instead of a traceback: no app can be built from them."""
    try:
        return get_settings()
    except SettingsError as exc:
        for line in exc.problems:
            print(f"Error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings_or_exit()
app = create_app(settings)


@app.task
async def _dump_tasks_on_sigusr2() -> None:
    """`kill -USR2 <worker>` logs every task's await chain (streams.diagnostics)."""
    from agentstream.streams import diagnostics

    diagnostics.install(asyncio.get_running_loop(), partial(consumer_state, app))


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

"""collect_metrics: folds `metrics.samples` into the `metric_windows` table, and exports
the latest value of every series to Prometheus (`agentstream_series_last_value`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from agentstream.agents.metrics.windows import exported_series
from agentstream.schemas import MetricSample
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.app import app, catalogue_topic, settings
from agentstream.streams.observability import Throttled
from agentstream.streams.processing import (
    Inbound,
    dead_letter,
    decoded_batches,
    guarded,
    refuse_table_full,
)
from agentstream.streams.tables import origin_of
from agentstream.streams.tables.monitoring import (
    METRICS_TABLE,
    TableFull,
    fold_sample_record,
    invalidate_indexes,
    metrics_writer,
)
from agentstream.streams.topics import METRICS_SAMPLES

CONSUMER = "collect_metrics"
writer = metrics_writer()
log = logging.getLogger(__name__)
#: one WARNING a minute, at most, for samples refused because the table is full
full_warning = Throttled(log)


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    invalidate_indexes(writer)


@app.on_rebalance_complete.connect
async def _on_restored(sender: Any, **kwargs: Any) -> None:
    # the table was restored from its changelog (after the assignment, where a batch
    # still folding may have rebuilt the pruning index from the partial table): stale
    invalidate_indexes(writer)


@app.agent(catalogue_topic(METRICS_SAMPLES), name=CONSUMER)
async def collect_metrics(stream: Any) -> None:
    async for batch in decoded_batches(stream, consumer=CONSUMER, accept=[MetricSample.TYPE]):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _fold)


async def _fold(inbound: Inbound) -> None:
    p: MetricSample = inbound.event.payload
    msg = inbound.message
    try:
        fold_sample_record(
            writer.at(msg.partition),
            p,
            origin_of(msg, METRICS_SAMPLES),
            interval_s=settings.metrics_collection_interval_s,
            retention_s=settings.metrics_retention_s,
            max_series=settings.metrics_max_series_per_partition,
        )
    except TableFull as exc:
        await refuse_table_full(
            msg, exc, CONSUMER, METRICS_TABLE, "samples of new series and label sets", full_warning
        )
    except InvalidEvent as exc:
        # what a sender chose (its key, its partition, values whose sum overflows): a
        # dead letter saying why, without the traceback `guarded` logs for a failure of ours
        await dead_letter(msg, exc, CONSUMER)


class SeriesCollector(Collector):
    """Latest value of each collected series and label set, at scrape time: at most
    `metrics_export_max_series` of them, and how many more there were."""

    def __init__(self) -> None:
        self.dropping = False

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # the names, without scanning the table (registering would collect() otherwise)
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "agentstream_series_last_value",
                "Latest value of each collected metrics.samples series and label set",
                labels=["series", "labels"],
            ),
            GaugeMetricFamily(
                "agentstream_series_export_dropped",
                "Series and label sets left out of agentstream_series_last_value (over "
                "AGENTSTREAM_METRICS_EXPORT_MAX_SERIES) at this scrape",
            ),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam, dropped_fam = self._families()
        rows, dropped = exported_series(
            list(writer.items()),
            now=time.time(),
            retention_s=settings.metrics_retention_s,
            limit=settings.metrics_export_max_series,
        )
        for series, labels_json, value in rows:
            fam.add_metric([series, labels_json], value)
        dropped_fam.add_metric([], dropped)
        if dropped and not self.dropping:
            log.warning(
                "/metrics exports %d series and label sets of metrics.samples and leaves "
                "%d out (AGENTSTREAM_METRICS_EXPORT_MAX_SERIES); all are in the views",
                len(rows),
                dropped,
            )
        self.dropping = dropped > 0
        yield fam
        yield dropped_fam


_collector = SeriesCollector()
with contextlib.suppress(ValueError):  # already registered (module re-imported in tests)
    REGISTRY.register(_collector)

"""track_communications: folds `comms.records` into the `comms_records` table."""

from __future__ import annotations

import logging
from typing import Any

from agentstream.schemas import CommunicationRecord
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
    COMMS_TABLE,
    TableFull,
    comms_writer,
    fold_comms_record,
    invalidate_indexes,
)
from agentstream.streams.topics import COMMS_RECORDS

CONSUMER = "track_communications"
writer = comms_writer()
log = logging.getLogger(__name__)
#: one WARNING a minute, at most, for records refused because the table is full
full_warning = Throttled(log)


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    invalidate_indexes(writer)


@app.on_rebalance_complete.connect
async def _on_restored(sender: Any, **kwargs: Any) -> None:
    # the table was restored from its changelog (after the assignment, where a batch
    # still folding may have rebuilt the pruning index from the partial table): stale
    invalidate_indexes(writer)


@app.agent(catalogue_topic(COMMS_RECORDS), name=CONSUMER)
async def track_communications(stream: Any) -> None:
    async for batch in decoded_batches(
        stream, consumer=CONSUMER, accept=[CommunicationRecord.TYPE]
    ):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _fold)


async def _fold(inbound: Inbound) -> None:
    msg = inbound.message
    try:
        fold_comms_record(
            writer.at(msg.partition),
            inbound.event.payload,
            origin_of(msg, COMMS_RECORDS),
            retention_s=settings.comms_retention_s,
            max_agents=settings.comms_max_agents_per_partition,
        )
    except TableFull as exc:
        await refuse_table_full(
            msg, exc, CONSUMER, COMMS_TABLE, "records of new agent ids", full_warning
        )
    except InvalidEvent as exc:
        # what a sender chose (its key, its partition): a dead letter saying why, without
        # the traceback `guarded` logs for a failure of ours
        await dead_letter(msg, exc, CONSUMER)

"""track_accepted: per sender, the last accepted message (and the largest), the audit
agent's own table.

It is the audit trail's quick index ("what did agent X last get through?") and a table
whose live state the crash tests compare with a rebuild from history, whatever other
domains' tables exist.

The changelog key is the raw sender id — the same bytes as the source topic's key — and
each write goes (`streams.tables.TableWriter`) to the partition of the accepted message
being folded, so a key's changelog record lands in the same partition number as its
source records. (With batches spanning partitions, Faust's default of "the current
event's partition" would scatter keys over changelog partitions, and a worker restoring
only its own partitions after a rebalance would miss them.)
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from agentstream.schemas import AgentMessage, Event
from agentstream.streams.app import app, catalogue_topic, settings
from agentstream.streams.processing import Inbound, decoded_batches, guarded
from agentstream.streams.tables import TableSpec, TableWriter, register
from agentstream.streams.topics import AGENT_MESSAGES_ACCEPTED

CONSUMER = "track_accepted"
TABLE = "accepted_by_sender"


def apply_accepted(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    """Record one accepted message for its sender.

    Idempotent on purpose (last-writer-wins and max only, no counters): after a crash the
    worker re-applies the events since its last commit, and a fold that counted would
    count them twice — the changelog already holds their effect. Applying any suffix of a
    sender's events again leaves the same state, so the live table equals its rebuild
    after kill -9 under either processing guarantee. It assigns a new value: Faust
    tables only write a changelog record on assignment."""
    msg = event.payload
    prev = state.get(msg.sender_id) or {}
    size = len(msg.content.encode())
    state[msg.sender_id] = {
        "last_message_id": msg.message_id,
        "last_input_id": event.causation_id or str(event.event_id),
        "last_recipient": msg.recipient_id,
        "largest_content_bytes": max(int(prev.get("largest_content_bytes", 0)), size),
    }


SPEC = register(
    TableSpec(
        name=TABLE,
        sources=(AGENT_MESSAGES_ACCEPTED,),
        apply=apply_accepted,
        description="Per sender: the last accepted message and the largest content size",
        types=frozenset({AgentMessage.TYPE}),
    )
)

accepted_by_sender = app.Table(
    TABLE,
    default=None,
    partitions=settings.topic_partitions,
    key_type=str,
    help=SPEC.description,
)
# Faust derives "json" from key_type=str; the changelog keeps the source's raw key bytes
# (what changelogs written before hold). The changelog topic object was already built
# with "json" when the table registered itself, and recovery decodes with the topic's
# serializer: build it again.
accepted_by_sender.key_serializer = "raw"
accepted_by_sender.changelog_topic = accepted_by_sender._new_changelog_topic()
_writer = TableWriter(accepted_by_sender)


@app.agent(catalogue_topic(AGENT_MESSAGES_ACCEPTED), name=CONSUMER)
async def track_accepted(stream: Any) -> None:
    async for batch in decoded_batches(stream, consumer=CONSUMER, accept=[AgentMessage.TYPE]):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _apply)


async def _apply(inbound: Inbound) -> None:
    apply_accepted(_writer.at(inbound.message.partition), inbound.event)

"""Upgrade contracts: the private (and undocumented) members of Faust, mode, aiokafka and
httpcore/httpx that our delivery layer overrides, reads, writes or calls.

faust-streaming, mode-streaming and aiokafka are pinned to exact versions in
pyproject.toml. Bumping a pin must fail here first, naming every member the new release
removed, renamed or re-signed, before the fault-injection suite (`make chaos`) is
re-run — see docs/reliability.md, "Upgrading Faust and aiokafka".

Each `Contract` row is one test (its id is the library member). It checks, on the
installed library CLASS (never an instance talking to a broker):

* the member still exists — as a class attribute, or assigned to ``self.<name>`` in the
  source of the methods that set it up (``__init__`` and the like);
* for a method: the parameter names and kinds we override or call with (annotations
  are ignored). ``override``/``implement`` rows need the exact parameter list (the
  library calls our method, and we call ``super()`` with it); ``call`` rows need our
  parameters in order, with the same kinds, and any other parameter to have a default;
* ``contains``: source snippets the behaviour we rely on is built from (compared with
  the library source normalised by ``ast.unparse``, without docstrings);
* ``fingerprint``: a hash of the normalised source of a method we re-implement or
  whose exact behaviour our code compensates for: any change to it needs a review.

`where` names our uses as ``path::anchor`` (the anchor is a text on that line; the
line number is looked up when a test fails, since these files change often).
`test_contract_table_matches_the_tree` keeps the table honest in the other direction.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import inspect
import re
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

#: distributions pinned to an exact version in pyproject.toml (and checked below)
PINNED_DISTRIBUTIONS = ("faust-streaming", "mode-streaming", "aiokafka")

#: top-level module → distribution, for the failure messages
DISTRIBUTION_OF = {
    "faust": "faust-streaming",
    "mode": "mode-streaming",
    "aiokafka": "aiokafka",
    "httpcore": "httpcore",
    "httpx": "httpx",
    "asyncio": "python",
}

APP = "streams/app.py"
DELIVERY = "streams/delivery.py"
PROC = "streams/processing.py"
WRITER = "streams/tables/writer.py"
RESTORE = "streams/tables/restore.py"
REPLAY = "streams/replay.py"
LLM_TABLES = "streams/tables/llm.py"
SEC_AGENT = "agents/security/agent.py"
NET = "agents/llm/providers/_net.py"
HTTP = "agents/llm/providers/_http.py"
BATCHES = "streams/record_batches.py"

D_AIO = "faust.transport.drivers.aiokafka"
CONSUMER = f"{D_AIO}.Consumer"  # the class BatchDeliveryConsumer is mixed into
THREAD = f"{D_AIO}.AIOKafkaConsumerThread"
PRODUCER = f"{D_AIO}.Producer"
TXN = "faust.transport.consumer.TransactionManager"
SUB = "aiokafka.consumer.subscription_state"
FORCE_METADATA = (
    "streams/client.py::_client.force_metadata_update",
    "streams/replay.py::_client.force_metadata_update",
    "agents/llm/cli.py::_client.force_metadata_update",
    "agents/security/store.py::_client.force_metadata_update",
    "bench/context.py::_client.force_metadata_update",
    "bench/stage_core.py::_client.force_metadata_update",
    "bench/stage_llm.py::_client.force_metadata_update",
    "bench/stage_policy.py::_client.force_metadata_update",
    "tests/support.py::_client.force_metadata_update",
)
COMMITTED_READERS = (
    f"{DELIVERY}::self._committed_offset.get(tp)",
    f"{DELIVERY}::consumer._committed_offset.get(ftp)",
    "agents/audit/checkpoints.py::_committed_offset",
    "agents/health/views.py::_committed_offset",
    "agents/heartbeat/agent.py::_committed_offset",
)


@dataclass(frozen=True)
class Contract:
    #: dotted path of the library member: module[.Class].member
    target: str
    #: override | implement | call | read | write | subclass
    use: str
    #: our uses, "path::anchor" (the first one is named in failure messages)
    where: tuple[str, ...]
    #: for methods: the parameters we rely on, as a def's parameter list
    params: str | None = None
    #: for instance attributes: the methods (on the class or its bases) assigning them
    assigned_in: tuple[str, ...] = ("__init__",)
    #: snippets of the normalised source of `source_of` (default: the member itself)
    contains: tuple[str, ...] = ()
    source_of: str | None = None
    #: sha256[:16] of the normalised source of the member (see `normalised_source`)
    fingerprint: str | None = None

    @property
    def id(self) -> str:
        return self.target


def c(target: str, use: str, *where: str, **kw: Any) -> Contract:
    return Contract(target, use, where, **kw)


CONTRACTS: list[Contract] = [
    # -- streams/app.py: AgentStreamApp(faust.App) -------------------------------------
    c(
        "faust.App._on_autodiscovery_error",
        "override",
        f"{APP}::def _on_autodiscovery_error",
        params="(self, name)",
        contains=("onerror=self._on_autodiscovery_error",),
        source_of="faust.App.discover",
    ),
    c("faust.App.on_first_start", "override", f"{APP}::def on_first_start", params="(self)"),
    c(
        "faust.App._new_transport",
        "override",
        f"{APP}::def _new_transport",
        params="(self)",
        contains=("self._transport = self._new_transport()",),
        source_of="faust.App.transport",
    ),
    c(
        "faust.App.flow_control",
        "override",
        f"{APP}::def flow_control",
        f"{PROC}::app_.flow_control.is_active()",
    ),
    # -- streams/delivery.py: new_transport, FetchWaitConsumerThread -------------------
    c("faust.transport.by_url", "call", f"{DELIVERY}::by_url(app.conf", params="(url)"),
    c("faust.transport.consumer.CONSUMER_FETCHING", "read", f"{DELIVERY}::CONSUMER_FETCHING)"),
    c(
        "faust.transport.base.Transport.__init__",
        "call",
        f'{DELIVERY}::{{"Consumer": consumer, "Producer": producer}})(',
        params="(self, url, app)",
    ),
    c(
        f"{D_AIO}.Transport.Consumer",
        "subclass",
        f"{DELIVERY}::(BatchDeliveryConsumer, base.Consumer)",
    ),
    c(
        f"{D_AIO}.Transport.Producer",
        "subclass",
        f"{DELIVERY}::(IdempotentProducer, base.Producer)",
    ),
    c(
        f"{PRODUCER}._settings_extra",
        "override",
        f"{DELIVERY}::def _settings_extra(self)",
        params="(self)",
        # what we extend: idempotence only in a transaction; the settings reach the
        # aiokafka producer through _new_producer
        contains=("return {'acks': 'all', 'enable_idempotence': True}",),
        fingerprint="3371b470381d46a7",
    ),
    c(
        f"{PRODUCER}._new_producer",
        "read",
        f"{DELIVERY}::class IdempotentProducer",
        contains=("**self._settings_extra()",),
        fingerprint="4703f30d76d025ff",
    ),
    c(
        f"{CONSUMER}._new_consumer_thread",
        "override",
        f'{DELIVERY}::{{"_new_consumer_thread": new_thread}}',
        params="(self)",
        contains=("AIOKafkaConsumerThread(self, loop=self.loop, beacon=self.beacon)",),
        fingerprint="877e2653465d6a07",
    ),
    c(
        "faust.transport.consumer.ConsumerThread.__init__",
        "call",
        f"{DELIVERY}::thread(consumer, loop=consumer.loop, beacon=consumer.beacon)",
        params="(self, consumer, **kwargs)",
    ),
    c(
        "mode.Service.__init__",
        "call",
        f"{DELIVERY}::thread(consumer, loop=consumer.loop, beacon=consumer.beacon)",
        params="(self, *, beacon, loop)",
    ),
    c(
        f"{THREAD}._create_worker_consumer",
        "override",
        f"{DELIVERY}::def _create_worker_consumer",
        params="(self, transport)",
    ),
    # -- streams/delivery.py: RecoveryOffsetsConsumerThread ----------------------------
    c(
        f"{THREAD}._highwaters",
        "override",
        f"{DELIVERY}::async def _highwaters(self, partitions",
        params="(self, partitions)",
        # the transactional branch we replace: LSO known only after a fetch
        contains=("return {tp: consumer.last_stable_offset(tp) for tp in partitions}",),
        fingerprint="6a6d54f09c7082aa",
    ),
    c(
        f"{THREAD}._seek_wait",
        "override",
        f"{DELIVERY}::async def _seek_wait(self, consumer: Any, partitions",
        f"{DELIVERY}::await super()._seek_wait(consumer, known)",
        params="(self, consumer, partitions)",
        fingerprint="ab2734df6c08ed87",
    ),
    c(
        "faust.tables.recovery.Recovery._build_highwaters",
        "read",
        f"{DELIVERY}::class RecoveryOffsetsConsumerThread",
        # recovery's highwaters come from consumer.highwaters (our _highwaters)
        contains=("highwaters = await consumer.highwaters(*tps)",),
        fingerprint="78fba816b8e9683d",
    ),
    c(
        "faust.tables.recovery.Recovery._seek_offsets",
        "read",
        f"{DELIVERY}::class RecoveryOffsetsConsumerThread",
        # a None start offset reaches seek_wait unchanged (our _seek_wait)
        contains=("await consumer.seek_wait(new_offsets)",),
        fingerprint="5854b9698ff9e802",
    ),
    c(
        "aiokafka.AIOKafkaConsumer.end_offsets",
        "call",
        f"{DELIVERY}::await consumer.end_offsets(list(partitions))",
        params="(self, partitions)",
    ),
    c(
        "aiokafka.AIOKafkaConsumer.seek_to_beginning",
        "call",
        f"{DELIVERY}::consumer.seek_to_beginning(*unknown)",
        params="(self, *partitions)",
    ),
    # -- streams/delivery.py: end_recovery_at_log_end ----------------------------------
    c(
        "faust.tables.recovery.Recovery._slurp_changelogs",
        "read",
        f"{DELIVERY}::async def end_recovery_at_log_end",
        # the wait we cut short: two empty 5 s polls before the aborted-tx check
        contains=(
            "changelog_queue.get(), timeout=5.0",
            "if timeout and self.app.in_transaction and (timeout_count > 1):",
            "self.flush_buffers()",
            "self._set_recovery_ended()",
            "self.signal_recovery_end.set()",
        ),
        fingerprint="37b7821eba6e4d7b",
    ),
    c(
        "faust.tables.recovery.Recovery.in_recovery",
        "read",
        f"{DELIVERY}::not recovery.in_recovery",
    ),
    c(
        "faust.tables.recovery.Recovery.need_recovery",
        "call",
        f"{DELIVERY}::recovery.need_recovery()",
        params="(self)",
        fingerprint="732d19f8b9a3d479",
    ),
    c("faust.tables.recovery.Recovery.active_offsets", "write", f"{DELIVERY}::offsets[tp] = last"),
    c(
        "faust.tables.recovery.Recovery.active_highwaters",
        "read",
        f"{DELIVERY}::recovery.active_highwaters.items()",
    ),
    c(
        "faust.tables.recovery.Recovery.flush_buffers",
        "call",
        f"{DELIVERY}::recovery.flush_buffers()",
        params="(self)",
        fingerprint="56b72a47b67767c2",
    ),
    c(
        "faust.tables.recovery.Recovery._set_recovery_ended",
        "call",
        f"{DELIVERY}::recovery._set_recovery_ended()",
        params="(self)",
        fingerprint="2c2f08980c1b4886",
    ),
    c(
        "faust.tables.recovery.Recovery.signal_recovery_end",
        "read",
        f"{DELIVERY}::recovery.signal_recovery_end.set()",
    ),
    c("faust.tables.manager.TableManager.recovery", "read", f"{DELIVERY}::app.tables.recovery"),
    c(
        "faust.tables.manager.TableManager.changelog_queue",
        "read",
        f"{DELIVERY}::app.tables.changelog_queue",
    ),
    c(
        f"{CONSUMER}.position",
        "call",
        f"{DELIVERY}::await consumer.position(tp)",
        params="(self, tp)",
    ),
    c(
        "mode.Service.add_future",
        "call",
        f"{APP}::self.add_future(end_recovery_at_log_end(self))",
        params="(self, coro)",
    ),
    c(f"{THREAD}.app", "read", f"{DELIVERY}::getattr(self.app"),
    c(
        "aiokafka.AIOKafkaConsumer._fetch_max_wait_ms",
        "write",
        f"{DELIVERY}::consumer._fetch_max_wait_ms =",
        contains=("fetch_max_wait_ms=self._fetch_max_wait_ms",),
        source_of="aiokafka.AIOKafkaConsumer.start",
    ),
    # -- streams/delivery.py: RefetchingFlowControl(mode FlowControlEvent) -------------
    c(
        "mode.utils.queues.FlowControlEvent.__init__",
        "call",
        f"{DELIVERY}::super().__init__(**kwargs)",
        params="(self, *, loop)",
    ),
    c(
        "mode.utils.queues.FlowControlEvent.clear",
        "override",
        f"{DELIVERY}::def clear(self)",
        params="(self)",
        fingerprint="a05004862c3967cc",
    ),
    c("mode.utils.queues.FlowControlEvent._queues", "read", f"{DELIVERY}::self._queues"),
    c(
        "mode.utils.queues.ThrowableQueue._queue",
        "read",
        f"{DELIVERY}::queue._queue",
        assigned_in=("_init",),
    ),
    c("faust.App.consumer", "read", f"{DELIVERY}::self._app.consumer", f"{PROC}::app_.consumer"),
    # -- streams/delivery.py: BatchDeliveryConsumer(aiokafka driver Consumer) ----------
    c(
        f"{CONSUMER}._is_changelog_tp",
        "call",
        f"{DELIVERY}::self._is_changelog_tp(tp)",
        params="(self, tp)",
    ),
    c(
        f"{CONSUMER}._commit_offsets",
        "override",
        f"{DELIVERY}::def _commit_offsets",
        params="(self, offsets, start_new_transaction)",
        # at-least-once: the producer is flushed after our flush_pending, before _commit
        contains=(
            "await self.app.producer.flush()\n            did_commit = await self._commit("
            "committable_offsets)",
        ),
    ),
    c(f"{CONSUMER}.assignment", "call", f"{DELIVERY}::self.assignment()", params="(self)"),
    c(
        f"{CONSUMER}.on_partitions_revoked",
        "override",
        f"{DELIVERY}::def on_partitions_revoked",
        params="(self, revoked)",
    ),
    c(
        f"{CONSUMER}.perform_seek",
        "override",
        f"{DELIVERY}::def perform_seek",
        params="(self)",
        # every seek to the committed offsets goes through `seek_to_committed` (below)
        contains=("_committed_offsets = await self.seek_to_committed()",),
    ),
    c(
        # checks the committed offsets it returns against the log start
        # (`skipped_offsets`): aiokafka's, None where the group has no commit
        f"{CONSUMER}.seek_to_committed",
        "override",
        f"{DELIVERY}::async def seek_to_committed",
        params="(self)",
        contains=("return await self._thread.seek_to_committed()",),
    ),
    c(
        f"{THREAD}.seek_to_committed",
        "read",
        f"{DELIVERY}::async def seek_to_committed",
        contains=("return await self.call_thread(self._ensure_consumer().seek_to_committed)",),
    ),
    c(
        f"{CONSUMER}.earliest_offsets",
        "call",
        f"{DELIVERY}::self.earliest_offsets(*streams), SKIPPED_OFFSETS_CHECK_TIMEOUT_S",
        params="(self, *partitions)",
    ),
    c(
        # the new generation is on the app before this runs (the listener sets it first):
        # `counts_ack` tells records of the old generation apart from there on
        f"{CONSUMER}.on_partitions_assigned",
        "override",
        f"{DELIVERY}::async def on_partitions_assigned",
        params="(self, assigned, generation_id=0)",
    ),
    c(
        f"{D_AIO}.ConsumerRebalanceListener.on_partitions_assigned",
        "read",
        f"{DELIVERY}::def counts_ack",
        contains=(
            "self._thread.app.consumer_generation_id = generation",
            "await self._thread.on_partitions_assigned(ensure_TPset(assigned), generation)",
        ),
    ),
    c(
        # a late ack (`counts_ack` false) is dropped before Faust's bookkeeping; the
        # revoke empties that bookkeeping (`_acked`, `_committed_offset`) for its partitions
        f"{CONSUMER}.ack",
        "override",
        f"{DELIVERY}::def ack(self: Any, message: Any)",
        params="(self, message)",
    ),
    c(
        "faust.transport.consumer.Consumer.on_partitions_revoked",
        "read",
        f"{DELIVERY}::def counts_ack",
        contains=("self._acked.pop(tp, None)", "self._committed_offset.pop(tp, None)"),
    ),
    c(
        f"{CONSUMER}._committed_offset",
        "write",
        f"{DELIVERY}::self._committed_offset[tp] = offset",
        *COMMITTED_READERS,
        contains=("self._committed_offset = defaultdict(lambda: None)",),
        source_of="faust.transport.consumer.Consumer.__init__",
    ),
    c(
        f"{CONSUMER}._getmany",
        "override",
        f"{DELIVERY}::def _getmany",
        params="(self, active_partitions, timeout)",
    ),
    c(
        f"{THREAD}._fetch_records",
        "read",
        f"{DELIVERY}::class _NeverEmpty",
        contains=("await fetcher.fetched_records(active_partitions",),
    ),
    c(
        "aiokafka.consumer.fetcher.Fetcher.fetched_records",
        "read",
        f"{DELIVERY}::class _NeverEmpty",
        params="(self, partitions, timeout, max_records)",
        contains=("if partitions and tp not in partitions:",),
    ),
    c(f"{CONSUMER}.position", "call", f"{DELIVERY}::await self.position(tp)", params="(self, tp)"),
    c(
        f"{CONSUMER}.seek",
        "call",
        f"{DELIVERY}::await self.seek(tp, offset)",
        params="(self, partition, offset)",
        # a refetch's seek back moves the read offset with it, so the records fetched
        # again are not passed over as below it (`_deliver`, `_deliver_native`)
        contains=("self._read_offset[ensure_TP(partition)] = offset if offset else None",),
        source_of="faust.transport.consumer.Consumer.seek",
    ),
    c(
        f"{CONSUMER}.commit",
        "override",
        f"{DELIVERY}::async def commit(self",
        params="(self, topics, start_new_transaction)",
    ),
    c("faust.App.in_transaction", "read", f"{DELIVERY}::self.app.in_transaction"),
    c("faust.App.producer", "read", f"{DELIVERY}::self.app.producer", f"{PROC}::app.producer"),
    c("faust.transport.producer.Producer.buffer", "read", f"{DELIVERY}::producer.buffer.flush()"),
    c(
        "faust.transport.producer.ProducerBuffer.flush",
        "call",
        f"{DELIVERY}::producer.buffer.flush()",
        f"{WRITER}::ProducerBuffer.flush",
        params="(self)",
        fingerprint="43009db9ef4e67ba",
    ),
    c(
        f"{CONSUMER}._commit",
        "override",
        f"{DELIVERY}::async def _commit(self",
        params="(self, offsets)",
    ),
    c(f"{CONSUMER}.callback", "read", f"{DELIVERY}::self.callback"),
    c(
        f"{CONSUMER}._read_offset",
        "write",
        f"{DELIVERY}::self._read_offset.__setitem__",
        contains=("self._read_offset = defaultdict(lambda: None)",),
        source_of="faust.transport.consumer.Consumer.__init__",
    ),
    c(f"{CONSUMER}._commit_every", "read", f"{DELIVERY}::self._commit_every"),
    c(f"{CONSUMER}._n_acked", "write", f"{DELIVERY}::self._n_acked = 0"),
    c(
        f"{CONSUMER}._add_gap",
        "call",
        f"{DELIVERY}::await self._add_gap(",
        params="(self, tp, offset_from, offset_to)",
    ),
    c(
        "faust.transport.conductor.Conductor.acks_enabled_for",
        "call",
        f"{DELIVERY}::self.app.topics.acks_enabled_for",
        params="(self, topic)",
    ),
    c(f"{CONSUMER}._stopped", "read", f"{DELIVERY}::self._stopped.is_set()"),
    c(
        "faust.transport.consumer.Fetcher._stopped",
        "read",
        f"{DELIVERY}::fetcher._stopped.is_set()",
    ),
    c(f"{CONSUMER}.diag", "read", f"{DELIVERY}::self.diag.set_flag(CONSUMER_FETCHING)"),
    c(
        "mode.services.Diag.set_flag",
        "call",
        f"{DELIVERY}::self.diag.set_flag(CONSUMER_FETCHING)",
        params="(self, flag)",
    ),
    c(
        "mode.services.Diag.unset_flag",
        "call",
        f"{DELIVERY}::self.diag.unset_flag(CONSUMER_FETCHING)",
        params="(self, flag)",
    ),
    c(
        # the getmany bypass (G1) relies on getmany taking its records from
        # `_wait_next_records` and checking flow, generation and partitions right after
        # it returns, with no await before the records are yielded
        f"{CONSUMER}.getmany",
        "call",
        f"{DELIVERY}::self.getmany(timeout=1.0)",
        params="(self, timeout)",
        contains=(
            "records, active_partitions = await self._wait_next_records(timeout)",
            "if records is None or self.should_stop:",
            "or tp in self._buffered_partitions",
            "self.app.monitor.track_tp_end_offset(tp, highwater_mark)",
        ),
        fingerprint="6c19542375aa0e31",
    ),
    # -- streams/delivery.py: the getmany bypass for native channels (G1-G4) -----------
    c(
        f"{CONSUMER}._wait_next_records",
        "override",
        f"{DELIVERY}::async def _wait_next_records",
        params="(self, timeout)",
        contains=("return (records, active_partitions)",),
    ),
    c(
        f"{CONSUMER}._to_message",
        "call",
        f"{DELIVERY}::to_message = self._to_message",
        params="(self, tp, record)",
        # the generation stamped when the message is made, as getmany makes it
        contains=("generation_id=self.app.consumer_generation_id",),
    ),
    c(
        f"{CONSUMER}._buffered_partitions",
        "read",
        f"{DELIVERY}::buffered = self._buffered_partitions",
        assigned_in=("__init__", "_reset_state"),
    ),
    c(
        f"{CONSUMER}.flow_active",
        "read",
        f"{DELIVERY}::if self.should_stop or not self.flow_active:",
    ),
    c(
        f"{CONSUMER}.highwater",
        "call",
        f"{DELIVERY}::track(tp, self.highwater(tp))",
        params="(self, tp)",
    ),
    c(
        "faust.sensors.monitor.Monitor.track_tp_end_offset",
        "call",
        f"{DELIVERY}::track = self.app.monitor.track_tp_end_offset",
        params="(self, tp, offset)",
    ),
    c(
        f"{CONSUMER}.wait_first",
        "call",
        f"{DELIVERY}::await self.wait_first(",
        params="(self, *coros)",
    ),
    c(f"{CONSUMER}.suspend_flow", "read", f"{DELIVERY}::self.suspend_flow.wait()"),
    c(
        f"{CONSUMER}.consumer_stopped_errors",
        "read",
        f"{DELIVERY}::except self.consumer_stopped_errors",
    ),
    c(f"{CONSUMER}.transport", "read", f"{DELIVERY}::self.transport.app.should_stop"),
    c(
        f"{CONSUMER}._drain_messages",
        "override",
        f"{DELIVERY}::async def _drain_messages",
        params="(self, fetcher)",
        fingerprint="3e3742ba998ee65d",
    ),
    # -- streams/delivery.py: BatchAgent(faust.Agent) ----------------------------------
    c(
        "faust.Agent._execute_actor",
        "override",
        f"{DELIVERY}::async def _execute_actor",
        params="(self, coro, aref)",
    ),
    c("faust.Agent.app", "read", f"{DELIVERY}::self.app.should_stop"),
    # -- streams/delivery.py: MetadataReadyConsumerThread ------------------------------
    c(
        f"{THREAD}.subscribe",
        "override",
        f"{DELIVERY}::async def subscribe(self, topics: Any)",
        f"{DELIVERY}::await super().subscribe(wanted)",
        params="(self, topics)",
        contains=("self._ensure_consumer().subscribe",),
    ),
    c(
        "faust.transport.consumer.ThreadDelegateConsumer.subscribe",
        "call",
        f"{DELIVERY}::async def subscribe(self, topics: Any)",
        params="(self, topics)",
        # Faust's consumer hands the subscription to its thread, by keyword
        contains=("await self._thread.subscribe(topics=topics)",),
    ),
    c(
        f"{THREAD}.call_thread",
        "call",
        f"{DELIVERY}::missing = await self.call_thread(",
        params="(self, fun, *args, **kwargs)",
    ),
    c(
        "aiokafka.client.AIOKafkaClient.fetch_all_metadata",
        "call",
        f"{DELIVERY}::cluster = await client.fetch_all_metadata()",
        params="(self)",
    ),
    # -- streams/delivery.py: consumer_state (the SIGUSR2 task dump) -------------------
    c(f"{CONSUMER}._thread", "read", f"{DELIVERY}::consumer._thread._ensure_consumer()"),
    c(
        f"{THREAD}._ensure_consumer",
        "call",
        f"{DELIVERY}::consumer._thread._ensure_consumer()",
        f"{DELIVERY}::client = self._ensure_consumer()._client",
        params="(self)",
    ),
    c("aiokafka.AIOKafkaConsumer._subscription", "read", f"{DELIVERY}::aio._subscription"),
    c(f"{SUB}.SubscriptionState.subscription", "read", f"{DELIVERY}::_subscription.subscription"),
    c(f"{SUB}.Subscription.assignment", "read", f"{DELIVERY}::subscription.assignment"),
    c(f"{SUB}.Assignment.tps", "read", f"{DELIVERY}::assignment.tps"),
    c(
        f"{SUB}.Assignment.state_value",
        "call",
        f"{DELIVERY}::assignment.state_value(tp)",
        params="(self, tp)",
    ),
    c(f"{SUB}.TopicPartitionState.position", "read", f"{DELIVERY}::state.position"),
    c(
        f"{SUB}.TopicPartitionState.has_valid_position",
        "read",
        f"{DELIVERY}::state.has_valid_position",
    ),
    c(f"{SUB}.TopicPartitionState.highwater", "read", f"{DELIVERY}::state.highwater"),
    c(
        "aiokafka.AIOKafkaConsumer._fetcher",
        "read",
        f"{DELIVERY}::aio._fetcher._records",
        contains=("self._fetcher = Fetcher(",),
        source_of="aiokafka.AIOKafkaConsumer.start",
    ),
    c("aiokafka.consumer.fetcher.Fetcher._records", "read", f"{DELIVERY}::aio._fetcher._records"),
    c(
        f"{CONSUMER}._paused_partitions",
        "read",
        f"{DELIVERY}::consumer._paused_partitions",
        assigned_in=("_reset_state",),
    ),
    c("aiokafka.AIOKafkaConsumer.paused", "call", f"{DELIVERY}::aio.paused()", params="(self)"),
    c(
        "faust.App.consumer_generation_id",
        "read",
        f"{DELIVERY}::app.consumer_generation_id",
        f"{PROC}::app_.consumer_generation_id",
    ),
    c(f"{CONSUMER}._acked", "read", f"{DELIVERY}::consumer._acked.get", f"{DELIVERY}::acked[:] ="),
    c(
        # invariant 1: never past a held record. Its head check reads the committed
        # offset as the last one processed (it is the next to read), and skips itself
        # while that is None or 0; the override relies on both, and on the slack of one
        # for a transaction marker at the head
        f"{CONSUMER}._new_offset",
        "override",
        f"{DELIVERY}::def _new_offset",
        params="(self, tp)",
        contains=(
            "if committed_offset:",
            "if min(acked) - committed_offset > 1:",
            "return batch[-1] + 1",
        ),
        fingerprint="d833d546002c6f44",
    ),
    c(
        "faust.types.Message.incref",
        "call",
        f"{DELIVERY}::message.incref()",
        params="(self, n=1)",
    ),
    c(
        "faust.types.Message.ack",
        "call",
        f"{DELIVERY}::message.ack(consumer)",
        params="(self, consumer, n=1)",
    ),
    c(f"{CONSUMER}._unacked_messages", "read", f"{DELIVERY}::consumer._unacked_messages"),
    # -- streams/processing.py: event_batches, emit, send_record -----------------------
    c("faust.Stream.channel", "read", f"{PROC}::stream.channel.queue"),
    c(
        "faust.channels.Channel.queue",
        "read",
        f"{PROC}::stream.channel.queue",
        f"{DELIVERY}::for queue in self._queues",
        # the agents' queues are the ones flow control clears (RefetchingFlowControl)
        contains=("clear_on_resume=True",),
    ),
    c("faust.App.sensors", "read", f"{PROC}::app_.sensors"),
    c(
        "faust.sensors.SensorDelegate.on_message_in",
        "call",
        f"{PROC}::sensors.on_message_in(",
        params="(self, tp, offset, message)",
    ),
    c(
        "faust.sensors.SensorDelegate.on_stream_event_in",
        "call",
        f"{PROC}::sensors.on_stream_event_in(",
        params="(self, tp, offset, stream, event)",
    ),
    c(
        "faust.sensors.SensorDelegate.on_stream_event_out",
        "call",
        f"{PROC}::sensors.on_stream_event_out(",
        params="(self, tp, offset, stream, event, state)",
    ),
    c(
        "faust.sensors.SensorDelegate.on_message_out",
        "call",
        f"{PROC}::sensors.on_message_out(",
        params="(self, tp, offset, message)",
    ),
    c("faust.App.topics", "read", f"{PROC}::app_.topics.acking_topics"),
    c("faust.transport.conductor.Conductor.acking_topics", "read", f"{PROC}::.acking_topics"),
    c(f"{CONSUMER}.unacked", "read", f"{PROC}::app_.consumer.unacked"),
    c(
        "mode.utils.queues.FlowControlEvent.is_active",
        "call",
        f"{PROC}::flow_control.is_active()",
        params="(self)",
    ),
    c("faust.types.Message.generation_id", "read", f"{PROC}::msg.generation_id"),
    c("faust.types.Message.tracked", "write", f"{PROC}::msg.tracked = True"),
    c("faust.types.Message.tp", "read", f"{PROC}::msg.tp"),
    c("faust.Event.ack", "call", f"{PROC}::ev.ack()", params="(self)"),
    c("faust.Stream.maybe_start", "call", f"{PROC}::stream.maybe_start()", params="(self)"),
    c("faust.Stream.service_reset", "call", f"{PROC}::stream.service_reset()", params="(self)"),
    c("faust.Stream.shortlabel", "read", f"{DELIVERY}::shortlabel"),
    c(
        "faust.App.maybe_start_producer",
        "call",
        f"{PROC}::app.maybe_start_producer()",
        params="(self)",
    ),
    c(
        f"{PRODUCER}.send",
        "call",
        f"{PROC}::producer.send(topic, key, value, partition, None, None)",
        params="(self, topic, key, value, partition, timestamp, headers, *, transactional_id)",
    ),
    c(
        f"{TXN}.send",
        "call",
        f"{PROC}::producer.send(topic, key, value, partition, None, None)",
        f"{PROC}::manager.send(name, key, value, None, None, None)",
        params="(self, topic, key, value, partition, timestamp, headers, *, transactional_id)",
    ),
    c(f"{TXN}.producer", "read", f'{PROC}::getattr(manager, "producer"'),
    c(
        f"{TXN}.transactional_id_format",
        "read",
        "streams/eos.py::def transactional_id_for",
        contains=("transactional_id = f'{group_id}-{group}-{tp.partition}'",),
        source_of=f"{TXN}.commit",
    ),
    c(
        f"{PRODUCER}._transaction_producers",
        "read",
        f'{PROC}::"_transaction_producers"',
        f"{PROC}::manager.producer._transaction_producers[tid]",
    ),
    c(
        # the lock Faust's send and commit of a transaction take; our batch sends too
        f"{PRODUCER}._trn_locks",
        "read",
        f"{PROC}::manager.producer._trn_locks[tid]",
        contains=("async with self._trn_locks[transactional_id]:",),
        source_of=f"{PRODUCER}.commit_transactions",
    ),
    c(
        "faust.assignor.PartitionAssignor.group_for_topic",
        "call",
        f"{PROC}::app.assignor.group_for_topic(topic)",
        params="(self, topic)",
    ),
    c("faust.transport.producer.Producer.maybe_start", "call", f"{PROC}::producer.maybe_start()"),
    # -- the batch-native path (docs/design/batch-delivery.md) --------------------------
    c(
        # our bulk ack (`_ack_all`) writes exactly what this writes, per record
        "faust.transport.consumer.Consumer.ack",
        "read",
        f"{PROC}::def _ack_all(",
        fingerprint="3cc87f1e31e7f0d9",
    ),
    c(f"{CONSUMER}._acked_index", "write", f"{PROC}::acked_index = consumer._acked_index"),
    c(f"{CONSUMER}._waiting_for_ack", "read", f"{PROC}::notify(consumer._waiting_for_ack)"),
    c(
        "mode.utils.futures.notify",
        "call",
        f"{PROC}::notify(consumer._waiting_for_ack)",
        params="(fut)",
    ),
    c("faust.types.tuples.ack_lock", "read", f"{PROC}::with ack_lock:"),
    c("faust.types.Message.acked", "write", f"{PROC}::msg.acked = True"),
    c(
        # a hold per stream, released by `Message.ack`; the final release acks: the bulk
        # ack takes and releases the batch's hold the same way
        "faust.types.Message.refcount",
        "write",
        f"{PROC}::msg.refcount += 1",
        f"{PROC}::held = msg.refcount = max(msg.refcount - 1, 0)",
        contains=("if not self.decref(n):", "return self.on_final_ack(consumer)"),
        source_of="faust.types.Message.ack",
    ),
    c(
        "faust.sensors.monitor.Monitor.stream_inbound_time",
        "write",
        f"{PROC}::monitor.stream_inbound_time[tp] = now",
    ),
    c(
        "faust.transport.producer.ProducerBuffer.wait_until_ebb",
        "call",
        f"{DELIVERY}::producer.buffer.wait_until_ebb()",
        params="(self)",
    ),
    c(
        "mode.utils.queues.FlowControlEvent.acquire",
        "call",
        f"{DELIVERY}::self.app.flow_control.acquire()",
        params="(self)",
    ),
    c(
        f"{PRODUCER}._ensure_producer",
        "call",
        f"{PROC}::._ensure_producer()",
        f"{SEC_AGENT}::._ensure_producer()",
        params="(self)",
    ),
    c(
        # what `_partitioner` computes once per batch instead of per record
        "aiokafka.AIOKafkaProducer._partition",
        "read",
        f"{PROC}::async def _partitioner(",
        contains=(
            "all_partitions = list(self._metadata.partitions_for_topic(topic))",
            "available = list(self._metadata.available_partitions_for_topic(topic))",
            "return self._partitioner(serialized_key, all_partitions, available)",
        ),
        fingerprint="824057a46a9a99db",
    ),
    c("aiokafka.AIOKafkaProducer._metadata", "read", f"{PROC}::producer._metadata"),
    c("aiokafka.AIOKafkaProducer._partitioner", "read", f"{PROC}::producer._partitioner"),
    c(
        # re-implemented with cached key hashes: `KeyHashPartitioner` (the worker's
        # producers, and `_partitioner` in place of aiokafka's)
        "aiokafka.partitioner.DefaultPartitioner.__call__",
        "read",
        "streams/tables/__init__.py::class KeyHashPartitioner",
        f"{PROC}::type(partitioner) is DefaultPartitioner",
        contains=("idx = murmur2(key)", "idx &= 2147483647", "idx %= len(all_partitions)"),
        fingerprint="585580d61345ea64",
    ),
    # -- streams/delivery.py: the produce fence of a worker that froze -----------------
    c(
        # wrapped: checks for a freeze, then calls it; it must be what writes the request
        "aiokafka.producer.sender.SendProduceReqHandler.do",
        "override",
        f"{DELIVERY}::async def do(self: Any, node_id: Any)",
        params="(self, node_id)",
        contains=("response = await self._client.send(node_id, request)",),
    ),
    c(
        # its caller: every drained batch goes through one handler's do()
        "aiokafka.producer.sender.Sender._send_produce_req",
        "read",
        f"{DELIVERY}::SendProduceReqHandler.do = do",
        contains=("handler = SendProduceReqHandler(self, batches)", "await handler.do(node_id)"),
    ),
    c(
        "aiokafka.producer.sender.SendProduceReqHandler._sender",
        "read",
        f"{DELIVERY}::txn = self._sender._txn_manager",
    ),
    c(
        "aiokafka.producer.sender.Sender._txn_manager",
        "read",
        f"{DELIVERY}::txn = self._sender._txn_manager",
    ),
    c(
        "aiokafka.producer.transaction_manager.TransactionManager.transactional_id",
        "read",
        f"{DELIVERY}::txn.transactional_id is not None",
    ),
    c(
        "aiokafka.producer.sender.SendProduceReqHandler._batches",
        "read",
        f"{DELIVERY}::self._batches.values()",
    ),
    c(
        "aiokafka.producer.message_accumulator.MessageBatch.failure",
        "call",
        f"{DELIVERY}::batch.failure(exception=exc)",
        params="(self, exception)",
    ),
    # -- streams/record_batches.py: stand-ins for what aiokafka cannot parse -----------
    c(
        # wrapped: restarted after a batch it failed on, from the next batch; its state
        # (the message set's position, aborted producers, the offset) lives on `self`,
        # and a failure inside a batch comes after the CRC check and aborted-batch skip
        "aiokafka.consumer.fetcher.PartitionRecords._unpack_records",
        "override",
        f"{BATCHES}::def _unpack_records(self: Any)",
        params="(self)",
        contains=(
            "records = self._records",
            "while records.has_next():",
            "next_batch = records.next_batch()",
            "if self._check_crcs and (not next_batch.validate_crc()):",
            "if record.offset < self.next_fetch_offset:",
            "self.next_fetch_offset = next_batch.next_offset",
        ),
        # `salvage` re-does its per-record part for the rest of a failed batch
        fingerprint="199c30888a423c7b",
    ),
    c(
        # the generator our wrapper replaces is made here, per fetched partition
        "aiokafka.consumer.fetcher.PartitionRecords.__init__",
        "read",
        f"{BATCHES}::fetcher.PartitionRecords._unpack_records = _tolerant_unpack(",
        contains=("self._records_iterator = self._unpack_records()",),
    ),
    c(
        "aiokafka.consumer.fetcher.PartitionRecords.next_fetch_offset",
        "write",
        f"{BATCHES}::partition_records.next_fetch_offset = record.offset + 1",
        f"{BATCHES}::self.next_fetch_offset = max(self.next_fetch_offset, batch.next_offset)",
    ),
    c(
        "aiokafka.consumer.fetcher.PartitionRecords._tp",
        "read",
        f"{BATCHES}::tp = partition_records._tp",
    ),
    c(
        "aiokafka.consumer.fetcher.PartitionRecords._records",
        "read",
        f"{BATCHES}::records = self._records",
    ),
    c(
        "aiokafka.consumer.fetcher.PartitionRecords._consumer_record",
        "call",
        f"{BATCHES}::out = partition_records._consumer_record(tp, parsed)",
        params="(self, tp, record)",
        contains=("tuple(record.headers)", "record.checksum"),
    ),
    c(
        # the module global we replace with a subclass that keeps the fetched bytes; and
        # (streams/client.py, a subscription resets no position) a fetch out of range
        # raises, naming the partition and the offset that failed, the position left
        # there: `_skip_deleted` names the deleted run from it
        "aiokafka.consumer.fetcher.Fetcher._proc_fetch_request",
        "read",
        f"{BATCHES}::fetcher.MemoryRecords = _memory_records_class()",
        "streams/client.py::failed = {tp: off for tp, off in exc.args[0].items()",
        contains=(
            "records = MemoryRecords(part_data[-1])",
            "if self._default_reset_strategy != OffsetResetStrategy.NONE:",
            "err = Errors.OffsetOutOfRangeError({tp: fetch_offset})",
        ),
    ),
    c(
        # the bounded decoders replace these module globals, which the parsers look up at
        # each call (the C extension's too: `test_c_parsers_look_their_decoders_up_per_call`)
        "aiokafka.record.default_records.zstd_decode",
        "write",
        f"{BATCHES}::setattr(module, attribute, _aiokafka_decoder(codec))",
        source_of="aiokafka.record.default_records._DefaultRecordBatchPy._maybe_uncompress",
        contains=(
            "uncompressed = gzip_decode(data)",
            "uncompressed = snappy_decode(data.tobytes())",
            "uncompressed = lz4_decode(data.tobytes())",
            "uncompressed = zstd_decode(data.tobytes())",
        ),
    ),
    c(
        "aiokafka.record.legacy_records.gzip_decode",
        "write",
        f"{BATCHES}::setattr(module, attribute, _aiokafka_decoder(codec))",
        source_of="aiokafka.record.legacy_records._LegacyRecordBatchPy._decompress",
        contains=(
            "uncompressed = gzip_decode(data)",
            "uncompressed = snappy_decode(data.tobytes())",
            "uncompressed = lz4_decode(data.tobytes())",
        ),
    ),
    # -- streams/client.py: a subscription resets no position (auto_offset_reset="none")
    c(
        # a group's partition without a committed offset raises, naming it: `_no_offset`
        # starts it where the subscription was asked to
        "aiokafka.consumer.fetcher.Fetcher._update_fetch_positions",
        "read",
        "streams/client.py::tps = [tp for tp in exc.args if isinstance(tp, TopicPartition)]",
        contains=("err = Errors.NoOffsetForPartitionError(tp)",),
    ),
    # -- streams/tables/restore.py: the bulk restore inside Faust's recovery ------------
    c(
        # runs `_build_offsets` for the actives after their highwaters, before the seek
        # and `need_recovery`, each step inside `_wait` (rebalance cancels, a timeout)
        "faust.tables.recovery.Recovery._restart_recovery",
        "read",
        f"{RESTORE}::async def _build_offsets(",
        fingerprint="3ba9ce22ae2dd2a9",
    ),
    c(
        "faust.tables.recovery.Recovery._build_offsets",
        "override",
        f"{RESTORE}::async def _build_offsets(",
        params="(self, consumer, tps, destination, title)",
    ),
    c("faust.tables.recovery.Recovery.tp_to_table", "read", f"{RESTORE}::recovery.tp_to_table"),
    c(
        "faust.tables.recovery.Recovery.active_highwaters",
        "read",
        f"{RESTORE}::self.active_highwaters",
    ),
    c(
        "faust.tables.TableManager.recovery",
        "override",
        f"{RESTORE}::def recovery(self)",
        fingerprint="6cd0e8bb0bfe3e3d",
    ),
    c("faust.tables.TableManager._recovery", "write", f"{RESTORE}::self._recovery ="),
    c(
        # fed our `_Record`s: reads .key, .value, .message.value, .message.partition
        "faust.stores.memory.Store._create_batch_iterator",
        "read",
        f"{RESTORE}::class _Record:",
        fingerprint="cecb5e0e52e108d0",
    ),
    c(
        "faust.stores.memory.Store.apply_changelog_batch",
        "call",
        f"{RESTORE}::table.apply_changelog_batch(batch)",
        fingerprint="de48aa2aa54b6a0f",
    ),
    c("faust.Table._on_changelog_event", "read", f'{RESTORE}::"_on_changelog_event"'),
    # forget_uncommitted_folds empties a memory store: its keys and their partitions
    c(
        "faust.stores.memory.Store.data",
        "write",
        f"{DELIVERY}::store.data.clear()",
        assigned_in=("__post_init__",),
    ),
    c(
        "faust.stores.memory.Store._key_partition",
        "write",
        f"{DELIVERY}::store._key_partition.clear()",
        assigned_in=("__post_init__",),
    ),
    c(
        # why emptying is safe: a memory store persists no offset, so the recovery of
        # every assigned changelog partition starts at its beginning
        "faust.stores.memory.Store.persisted_offset",
        "read",
        f"{DELIVERY}::so Faust's recovery starts each at the beginning",
        contains=("return None",),
    ),
    c(
        # ... and with its start offset forgotten, the next assignment's `_add` sets it to
        # None, which `_build_offsets` reads as the partition's beginning
        "faust.tables.recovery.Recovery._add",
        "read",
        f"{DELIVERY}::so Faust's recovery starts each at the beginning",
        contains=(
            "persisted_offset = table.persisted_offset(tp)",
            "offsets.setdefault(tp, None)",
        ),
    ),
    c(
        "faust.tables.recovery.Recovery.active_offsets",
        "write",
        f"{DELIVERY}::recovery.active_offsets.clear()",
    ),
    c(
        "faust.tables.recovery.Recovery.standby_offsets",
        "write",
        f"{DELIVERY}::recovery.standby_offsets.clear()",
    ),
    c(
        # `_direct` computes these for plain codecs and types (tests/unit/test_table_restore.py)
        "faust.serializers.registry.Registry._prepare_payload",
        "read",
        f"{RESTORE}::def _direct(",
        fingerprint="d671dd655022f1f2",
    ),
    c(
        "faust.serializers.codecs.json._loads",
        "read",
        f"{RESTORE}::codecs.json",
        fingerprint="9f1e1c2b9b88d715",
    ),
    c(
        "faust.serializers.codecs.raw._loads",
        "read",
        f"{RESTORE}::codecs.raw",
        fingerprint="f6890457b2363390",
    ),
    c(
        "faust.utils.json.loads",
        "read",
        f"{RESTORE}::faust_json.orjson",
        fingerprint="c827e95b2118b910",
    ),
    # -- streams/tables/writer.py, streams/tables/llm.py, agents/audit/activity.py -----
    c("faust.Table.data", "read", f"{WRITER}::table.data[key] = value"),
    c(
        # re-implemented: `_send` builds the future message it would, and keeps it
        "faust.Table.send_changelog",
        "read",
        f"{WRITER}::# what Table.send_changelog builds",
        fingerprint="7978a5436e0fe81e",
    ),
    c(
        "faust.Table.changelog_topic",
        "write",
        f"{WRITER}::table.changelog_topic.as_future_message(",
        "agents/audit/activity.py::accepted_by_sender.changelog_topic =",
    ),
    c(
        "faust.topics.Topic.as_future_message",
        "call",
        f"{WRITER}::table.changelog_topic.as_future_message(",
        params=(
            "(self, key, value, partition, timestamp, headers, schema, key_serializer,"
            " value_serializer, callback, eager_partitioning)"
        ),
    ),
    c(
        "faust.Table._on_changelog_sent",
        "read",
        f"{WRITER}::callback=table._on_changelog_sent",
        params="(self, fut)",
    ),
    c(
        "faust.channels.Channel.publish_message",
        "call",
        f"{WRITER}::channel.publish_message(fut, wait=False)",
        params="(self, fut, wait)",
    ),
    c(
        # the changelog topic's: with wait=False it returns the producer's future, which
        # `flush_pending` watches (a refused record stops every commit)
        "faust.topics.Topic.publish_message",
        "call",
        f"{WRITER}::channel.publish_message(fut, wait=False)",
        params="(self, fut, wait)",
        contains=("return fut2",),
    ),
    c(
        "faust.Table.key_serializer",
        "write",
        "agents/audit/activity.py::accepted_by_sender.key_serializer =",
        f"{WRITER}::table.key_serializer",
    ),
    c("faust.Table.value_serializer", "read", f"{WRITER}::table.value_serializer"),
    c("faust.Table.name", "read", f"{WRITER}::self.table.name"),
    c("faust.Table.partitions", "read", f"{LLM_TABLES}::self.partitions"),
    c(
        "faust.Table.partition_for_key",
        "override",
        f"{LLM_TABLES}::def partition_for_key",
        params="(self, key)",
    ),
    c(
        "faust.Table.__setitem__",
        "override",
        f"{LLM_TABLES}::def __setitem__",
        params="(self, key, value)",
    ),
    c(
        "faust.Table.__delitem__",
        "override",
        f"{LLM_TABLES}::def __delitem__",
        params="(self, key)",
    ),
    c(
        "faust.Table.__init__",
        "call",
        f"{LLM_TABLES}::cls(",
        params="(self, app, *, name, default, key_type, partitions, help)",
    ),
    c(
        "faust.tables.TableManager.add",
        "call",
        f"{LLM_TABLES}::app.tables.add(",
        params="(self, table)",
    ),
    c("faust.tables.TableManager.beacon", "read", f"{LLM_TABLES}::app.tables.beacon"),
    c(
        "faust.Table._new_changelog_topic",
        "call",
        "agents/audit/activity.py::._new_changelog_topic()",
        params="(self)",
    ),
    # -- agents/security/agent.py: the aiokafka producer behind Faust's -----------------
    c(f"{PRODUCER}._producer", "read", f'{SEC_AGENT}::getattr(app.producer, "_producer", None)'),
    c("aiokafka.AIOKafkaProducer.client", "read", f'{SEC_AGENT}::"_producer", None), "client"'),
    c("aiokafka.client.AIOKafkaClient.cluster", "read", f"{SEC_AGENT}::client.cluster"),
    c(
        "aiokafka.cluster.ClusterMetadata.partitions_for_topic",
        "call",
        f"{SEC_AGENT}::client.cluster.partitions_for_topic(topic)",
        params="(self, topic)",
    ),
    # -- streams/processing.py send_record_batches (enforce_policy, the native outbox) ---
    c(
        "aiokafka.AIOKafkaProducer.create_batch",
        "call",
        f"{PROC}::producer.create_batch()",
        params="(self)",
    ),
    c(
        "aiokafka.AIOKafkaProducer.send_batch",
        "call",
        f"{PROC}::producer.send_batch(batch, name, partition=partition)",
        params="(self, batch, topic, *, partition)",
    ),
    c(
        "aiokafka.producer.message_accumulator.BatchBuilder.append",
        "call",
        f"{PROC}::batch.append(key=key, value=value, timestamp=None)",
        params="(self, *, timestamp, key, value)",
    ),
    c(
        "aiokafka.producer.message_accumulator.BatchBuilder.record_count",
        "call",
        f"{PROC}::batch.record_count()",
        params="(self)",
    ),
    # -- every plain aiokafka consumer of ours: metadata refresh before assign ----------
    c(
        "aiokafka.AIOKafkaConsumer._client",
        "read",
        *FORCE_METADATA,
        f"{DELIVERY}::client = self._ensure_consumer()._client",
        f"{REPLAY}::await consumer._client.close()",
    ),
    # -- streams/replay.py: a history reader stopped after its broker went away ---------
    c(
        "aiokafka.AIOKafkaConsumer.stop",
        "call",
        f"{REPLAY}::await consumer.stop()",
        params="(self)",
        # `stop_reader` finishes what stop() leaves undone when the fetcher's close raises
        contains=("await self._fetcher.close()\n    await self._client.close()",),
    ),
    c(
        "aiokafka.consumer.fetcher.Fetcher.close",
        "read",
        f"{REPLAY}::async def stop_reader",
        # the stray CancelledError `stop_reader` drops: a fixed release needs no drop
        contains=("x.cancel()\n        await x",),
    ),
    c(
        "aiokafka.client.AIOKafkaClient.close",
        "call",
        f"{REPLAY}::await consumer._client.close()",
        params="(self)",
    ),
    c(
        "aiokafka.client.AIOKafkaClient.force_metadata_update",
        "call",
        *FORCE_METADATA,
        "streams/client.py::await client.force_metadata_update()",
        params="(self)",
    ),
    # -- streams/client.py: the first publish to a topic looks for it, briefly ----------
    c(
        "aiokafka.AIOKafkaProducer.client",
        "read",
        "streams/client.py::client = producer.client",
    ),
    c(
        "aiokafka.client.AIOKafkaClient.cluster",
        "read",
        "streams/client.py::client.cluster.partitions_for_topic",
    ),
    c(
        "aiokafka.client.AIOKafkaClient.add_topic",
        "call",
        "streams/client.py::client.add_topic(full)",
        params="(self, topic)",
    ),
    c(
        "aiokafka.cluster.ClusterMetadata.unauthorized_topics",
        "read",
        "streams/client.py::client.cluster.unauthorized_topics",
    ),
    # -- streams/client.py: a producer of an ended event loop is dropped, not stopped -----
    c(
        "aiokafka.AIOKafkaProducer._closed",
        "write",
        "streams/client.py::other.producer._closed = True",
        # its finalizer reports an unclosed producer by this flag alone
        contains=("if self._closed is False:",),
        source_of="aiokafka.AIOKafkaProducer.__del__",
    ),
    # -- agents/llm/providers: httpcore's network backend, set on httpx's pool ----------
    c(
        "httpcore.AsyncNetworkBackend.connect_tcp",
        "implement",
        f"{NET}::async def connect_tcp",
        params="(self, host, port, timeout, local_address, socket_options)",
    ),
    c(
        "httpcore.AsyncNetworkBackend.connect_unix_socket",
        "implement",
        f"{NET}::async def connect_unix_socket",
        params="(self, path, timeout, socket_options)",
    ),
    c(
        "httpcore.AsyncNetworkBackend.sleep",
        "implement",
        f"{NET}::async def sleep",
        params="(self, seconds)",
    ),
    c(
        "httpcore.AsyncNetworkStream.read",
        "implement",
        f"{NET}::async def read",
        params="(self, max_bytes, timeout)",
    ),
    c(
        "httpcore.AsyncNetworkStream.write",
        "implement",
        f"{NET}::async def write",
        params="(self, buffer, timeout)",
    ),
    c(
        "httpcore.AsyncNetworkStream.aclose",
        "implement",
        f"{NET}::async def aclose",
        params="(self)",
    ),
    c(
        "httpcore.AsyncNetworkStream.start_tls",
        "implement",
        f"{NET}::async def start_tls",
        params="(self, ssl_context, server_hostname, timeout)",
    ),
    c(
        "httpcore.AsyncNetworkStream.get_extra_info",
        "implement",
        f"{NET}::def get_extra_info",
        params="(self, info)",
        contains=("self._network_stream.get_extra_info('is_readable')",),
        source_of="httpcore._async.http11.AsyncHTTP11Connection.has_expired",
    ),
    c("httpx.AsyncClient._transport", "read", f'{HTTP}::getattr(client, "_transport", None)'),
    c("httpx.AsyncHTTPTransport._pool", "read", f'{HTTP}::"_pool", None)'),
    c("httpcore.AsyncConnectionPool._network_backend", "write", f"{HTTP}::pool._network_backend ="),
]


# -- resolving members -----------------------------------------------------------------


def _import_prefix(dotted: str) -> tuple[Any, list[str]]:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            return importlib.import_module(".".join(parts[:i])), parts[i:]
        except ImportError:
            continue
    raise ImportError(dotted)


def owner_and_name(dotted: str) -> tuple[Any, str]:
    """The object (module or class) holding the member, and the member's name."""
    obj, rest = _import_prefix(dotted)
    for part in rest[:-1]:
        obj = getattr(obj, part)
    return obj, rest[-1]


def lookup(dotted: str) -> Any:
    """The member as stored on its class (no descriptor invoked) or module."""
    holder, name = owner_and_name(dotted)
    if inspect.isclass(holder):
        return inspect.getattr_static(holder, name)
    return getattr(holder, name)


def function_of(member: Any) -> Callable[..., Any] | None:
    """The plain function behind a method, property, cached_property, stampede..."""
    for attr in ("fget", "func", "__wrapped__", "fun"):  # fun: mode's ServiceTask
        inner = getattr(member, attr, None)
        if inner is not None and callable(inner):
            return function_of(inner) or inner
    if isinstance(member, staticmethod | classmethod):
        return member.__func__
    if inspect.isfunction(member) or inspect.ismethod(member):
        return member  # a bound method (module-level API object): no self to compare
    return None


def assigned_in_source(cls: type, name: str, methods: tuple[str, ...]) -> list[str]:
    """Which of `methods` (on `cls` or any base) assign ``self.<name>``."""
    found = []
    for klass in cls.__mro__:
        for method in methods:
            fn = vars(klass).get(method)
            if fn is None or not inspect.isfunction(fn):
                continue
            for node in ast.walk(_parse(fn)):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                    targets = [node.target]
                for target in targets:
                    elts = target.elts if isinstance(target, ast.Tuple) else [target]
                    for t in elts:
                        if (
                            isinstance(t, ast.Attribute)
                            and t.attr == name
                            and isinstance(t.value, ast.Name)
                            and t.value.id == "self"
                        ):
                            found.append(f"{klass.__module__}.{klass.__qualname__}.{method}")
    return found


def _parse(fn: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def normalised_source(fn: Callable[..., Any]) -> str:
    """The function's source as `ast.unparse` writes it, docstrings dropped: comments,
    formatting and docs do not count as a change."""
    tree = _parse(fn)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def fingerprint(fn: Callable[..., Any]) -> str:
    return hashlib.sha256(normalised_source(fn).encode()).hexdigest()[:16]


_KINDS = inspect.Parameter


def expected_params(spec: str) -> list[tuple[str, Any]]:
    fn = ast.parse(f"def f{spec}: pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    out = [(p.arg, _KINDS.POSITIONAL_ONLY) for p in a.posonlyargs]
    out += [(p.arg, _KINDS.POSITIONAL_OR_KEYWORD) for p in a.args]
    if a.vararg:
        out.append((a.vararg.arg, _KINDS.VAR_POSITIONAL))
    out += [(p.arg, _KINDS.KEYWORD_ONLY) for p in a.kwonlyargs]
    if a.kwarg:
        out.append((a.kwarg.arg, _KINDS.VAR_KEYWORD))
    return out


def signature_problems(fn: Callable[..., Any], spec: str, exact: bool) -> list[str]:
    actual = list(inspect.signature(fn).parameters.values())
    got = [(p.name, p.kind) for p in actual]
    want = expected_params(spec)
    shown = f"library has {_show(got)}, we rely on {_show(want)}"
    if exact:
        return [] if got == want else [f"parameters differ: {shown}"]
    problems = []
    position = 0
    names = [name for name, _ in got]
    for wanted_index, (name, kind) in enumerate(want):
        if name not in names:
            problems.append(f"parameter {name!r} is gone")
            continue
        index = names.index(name)
        positional = (_KINDS.POSITIONAL_ONLY, _KINDS.POSITIONAL_OR_KEYWORD)
        if kind in positional and index != wanted_index:
            # we may pass it by position: a parameter inserted before it shifts our args
            problems.append(f"parameter {name!r} is at position {index}, not {wanted_index}")
        if got[index][1] != kind:
            problems.append(
                f"parameter {name!r} is {got[index][1].description}, not {kind.description}"
            )
        if index < position:
            problems.append(f"parameter {name!r} moved")
        position = max(position, index)
    wanted = {name for name, _ in want}
    for p in actual:
        variadic = p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if p.name not in wanted and p.default is p.empty and not variadic:
            problems.append(f"new required parameter {p.name!r}")
    return [f"{problem}: {shown}" for problem in problems]


def _show(params: list[tuple[str, Any]]) -> str:
    marks = {_KINDS.VAR_POSITIONAL: "*", _KINDS.VAR_KEYWORD: "**"}
    out, star = [], False
    for name, kind in params:
        if kind is _KINDS.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        star = star or kind is _KINDS.VAR_POSITIONAL
        out.append(marks.get(kind, "") + name)
    return f"({', '.join(out)})"


# -- where we use it -------------------------------------------------------------------


@cache
def _lines(path: str) -> tuple[str, ...]:
    return tuple((REPO / path).read_text(encoding="utf-8").splitlines())


def locate(where: str) -> str | None:
    """``path:line`` of a use (None when the anchor is no longer in the file)."""
    path, _, anchor = where.partition("::")
    try:
        lines = _lines(path)
    except FileNotFoundError:
        return None
    for number, line in enumerate(lines, 1):
        if anchor in line:
            return f"{path}:{number}"
    return None


def installed(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def failure(contract: Contract, detail: str) -> str:
    top = contract.target.split(".", 1)[0]
    dist = DISTRIBUTION_OF.get(top, top)
    first = contract.where[0]
    at = locate(first) or first.partition("::")[0]
    more = f" (and {len(contract.where) - 1} more place(s))" if len(contract.where) > 1 else ""
    verb = {
        "override": "we override it",
        "implement": "we implement it",
        "call": "we call it",
        "read": "we read it",
        "write": "we write it",
        "subclass": "we subclass it",
    }[contract.use]
    return (
        f"{dist} {installed(dist)} changed {contract.target}: {verb} in {at}{more} — "
        f"re-run `make chaos` and adapt. {detail}"
    )


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda k: k.id)
def test_member_contract(contract: Contract) -> None:
    try:
        holder, name = owner_and_name(contract.target)
    except (ImportError, AttributeError) as exc:
        pytest.fail(failure(contract, f"its module or class is gone: {exc!r}"))
    try:
        member = lookup(contract.target)
    except AttributeError:
        if not inspect.isclass(holder):
            pytest.fail(failure(contract, "it is gone from its module"))
        setters = assigned_in_source(holder, name, contract.assigned_in)
        if not setters:
            pytest.fail(
                failure(
                    contract,
                    f"no class attribute {name!r}, and no `self.{name} =` in "
                    f"{'/'.join(contract.assigned_in)} of {holder.__qualname__} or its bases",
                )
            )
        member = None
    fn = function_of(member) if member is not None else None
    if contract.params is not None:
        if fn is None:
            pytest.fail(failure(contract, f"it is no longer a function: {member!r}"))
        exact = contract.use in ("override", "implement")
        problems = signature_problems(fn, contract.params, exact)
        if problems:
            pytest.fail(failure(contract, "; ".join(problems)))
    if contract.contains:
        source_fn = function_of(lookup(contract.source_of)) if contract.source_of else fn
        assert source_fn is not None, contract
        source = normalised_source(source_fn)
        missing = [snippet for snippet in contract.contains if snippet not in source]
        if missing:
            where = contract.source_of or contract.target
            pytest.fail(failure(contract, f"{where} no longer contains {missing}"))
    if contract.fingerprint is not None:
        assert fn is not None, contract
        now = fingerprint(fn)
        if now != contract.fingerprint:
            pytest.fail(
                failure(
                    contract,
                    f"its source changed (fingerprint {contract.fingerprint} -> {now}): "
                    "read the new code against our use, then update the fingerprint",
                )
            )


def _pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for requirement in data["project"]["dependencies"]:
        # `name[extras]==version`: aiokafka is pinned with its codec extras
        match = re.fullmatch(
            r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", requirement
        )
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_installed_versions_are_the_pinned_ones() -> None:
    """An accidental upgrade (a stale venv, a resolver picking something else) is caught
    here; the contracts above were checked against exactly these versions."""
    pins = _pins()
    not_pinned = [d for d in PINNED_DISTRIBUTIONS if d not in pins]
    assert not not_pinned, f"pyproject.toml must pin these exactly (==): {not_pinned}"
    wrong = {d: (pins[d], installed(d)) for d in PINNED_DISTRIBUTIONS if installed(d) != pins[d]}
    assert not wrong, (
        "installed versions differ from the pins in pyproject.toml (pinned, installed): "
        f"{wrong} — reinstall (`make install`), or follow docs/reliability.md "
        "'Upgrading Faust and aiokafka' if this is an upgrade"
    )


def test_transactional_ids_are_fausts() -> None:
    """streams.eos names the transaction that commits a partition's offsets as Faust
    does; a different name sends outputs into another (or no) transaction."""
    from faust.transport.consumer import TopicPartitionGroup, TransactionManager

    from agentstream.streams.eos import transactional_id_for

    tpg = TopicPartitionGroup(topic="t", partition=5, group=3)
    faust_id = TransactionManager.transactional_id_format.format(group_id="app", tpg=tpg)
    assert transactional_id_for("app", 3, 5) == faust_id, failure(
        CONTRACTS[[k.target for k in CONTRACTS].index(f"{TXN}.transactional_id_format")],
        f"Faust names it {faust_id!r}",
    )


def test_flow_control_clears_the_queues_it_manages() -> None:
    """RefetchingFlowControl.clear reads the records out of each managed queue's
    ``_queue`` before mode's clear() drops them: built here without a broker."""
    import collections

    from mode.utils.queues import FlowControlEvent, ThrowableQueue

    event = FlowControlEvent()
    queue = ThrowableQueue(flow_control=event, clear_on_resume=True)  # as Channel.queue
    queue.put_nowait("record")
    assert queue in event._queues, "FlowControlEvent no longer keeps its queues in _queues"
    assert isinstance(queue._queue, collections.deque), "the queue's items are not in _queue"
    assert list(queue._queue) == ["record"]
    event.clear()
    assert not queue._queue, "FlowControlEvent.clear no longer empties the managed queues"


def test_c_parsers_look_their_decoders_up_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's C record parsers (the ones its fetcher uses) find `zstd_decode` and
    `gzip_decode` among their module's globals at each call, as the pure-Python ones do:
    `streams.record_batches` bounds decompression by replacing them."""
    from aiokafka.record import default_records, legacy_records
    from aiokafka.record._crecords import default_records as c_default
    from aiokafka.record._crecords import legacy_records as c_legacy

    called: list[str] = []

    def spy(name: str, real: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        def decode(data: Any) -> bytes:
            called.append(name)
            return real(data)

        return decode

    monkeypatch.setattr(c_default, "zstd_decode", spy("zstd", c_default.zstd_decode))
    monkeypatch.setattr(c_legacy, "gzip_decode", spy("gzip", c_legacy.gzip_decode))
    v2 = default_records.DefaultRecordBatchBuilder(
        magic=2,
        compression_type=4,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    v2.append(0, timestamp=1, key=b"k", value=b"v2", headers=[])
    legacy = legacy_records.LegacyRecordBatchBuilder(
        magic=1, compression_type=1, batch_size=1 << 20
    )
    legacy.append(0, timestamp=1, key=b"k", value=b"v1")
    batch_v2 = default_records.DefaultRecordBatch(bytearray(v2.build()))
    batch_legacy = legacy_records.LegacyRecordBatch(bytearray(legacy.build()), 1)
    assert type(batch_v2) is c_default.DefaultRecordBatch, "not the C parser"
    assert type(batch_legacy) is c_legacy.LegacyRecordBatch, "not the C parser"
    assert [r.value for r in batch_v2] == [b"v2"]
    assert [r.value for r in batch_legacy] == [b"v1"]
    assert called == ["zstd", "gzip"], "a C parser no longer calls its module's decoder"


def test_cramjam_says_when_the_output_does_not_fit_the_buffer() -> None:
    """`streams.record_batches` grows a zstd/lz4 output buffer while cramjam's
    `decompress_into` says it is too small, and tells that from corrupt data by the
    message; the output never exceeds the buffer, which may be exactly its size."""
    import cramjam

    from agentstream.streams.record_batches import _BUFFER_FULL

    for codec in (cramjam.zstd, cramjam.lz4):
        data = bytes(codec.compress(b"x" * 1000))
        with pytest.raises(cramjam.DecompressionError, match=_BUFFER_FULL):
            codec.decompress_into(data, bytearray(999))
        assert codec.decompress_into(data, bytearray(1000)) == 1000
        with pytest.raises(cramjam.DecompressionError) as corrupt:
            codec.decompress_into(b"not a frame at all", bytearray(1000))
        assert _BUFFER_FULL not in str(corrupt.value)


# -- the table vs the tree -------------------------------------------------------------

#: our classes built on a library class (module:qualname → the library class they patch)
OUR_SUBCLASSES = {
    "agentstream.streams.app:AgentStreamApp": "faust.App",
    "agentstream.streams.delivery:FetchWaitConsumerThread": THREAD,
    "agentstream.streams.delivery:RecoveryOffsetsConsumerThread": THREAD,
    "agentstream.streams.delivery:BatchAgent": "faust.Agent",
    "agentstream.streams.delivery:RefetchingFlowControl": "mode.utils.queues.FlowControlEvent",
    "agentstream.streams.delivery:BatchDeliveryConsumer": CONSUMER,
    "agentstream.streams.delivery:IdempotentProducer": PRODUCER,
    "agentstream.agents.llm.providers._net:AsyncioBackend": "httpcore.AsyncNetworkBackend",
    "agentstream.agents.llm.providers._net:AsyncioStream": "httpcore.AsyncNetworkStream",
}

#: names our subclasses define that the library base has too but that are no override
#: to check (class plumbing)
_NOT_OVERRIDES = {"__init__", "__module__", "__doc__", "__qualname__", "__annotations__"}
_NOT_OVERRIDES |= {
    "__slots__",
    "__dict__",
    "__weakref__",
    "__firstlineno__",
    "__static_attributes__",
}
_NOT_OVERRIDES |= {"logger", "_abc_impl", "__abstractmethods__", "__parameters__", "__orig_bases__"}


def _ours(spec: str) -> type:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("ours", sorted(OUR_SUBCLASSES))
def test_every_override_is_in_the_contract_table(ours: str) -> None:
    """A method one of our subclasses or mixins defines that the library class has too
    is an override: it needs its row above (this catches overrides added later), and
    our method must take the parameters the row says (so the row describes our code)."""
    cls = _ours(ours)
    base_path = OUR_SUBCLASSES[ours]
    base = lookup(base_path)
    rows = {
        k.target.rsplit(".", 1)[1]: k
        for k in CONTRACTS
        if k.target.startswith(base_path + ".") and k.use in ("override", "implement")
    }
    missing, differing = [], []
    for name, value in vars(cls).items():
        if name in _NOT_OVERRIDES or not hasattr(base, name):
            continue
        row = rows.get(name)
        if row is None:
            missing.append(name)
            continue
        fn = function_of(value)
        if row.params is not None and fn is not None:
            differing += [f"{name}: {p}" for p in signature_problems(fn, row.params, True)]
    assert not missing, (
        f"{ours} overrides {missing} of {base_path} with no row in CONTRACTS "
        "(tests/unit/test_upgrade_contracts.py): add one"
    )
    assert not differing, f"{ours} no longer matches its CONTRACTS rows: {differing}"


#: names our mixins add to the library classes they are mixed into
OUR_ADDITIONS = {
    CONSUMER: "agentstream.streams.delivery:BatchDeliveryConsumer",
    "mode.utils.queues.FlowControlEvent": "agentstream.streams.delivery:RefetchingFlowControl",
    "faust.Agent": "agentstream.streams.delivery:BatchAgent",
}


@pytest.mark.parametrize("base_path", sorted(OUR_ADDITIONS))
def test_our_additions_do_not_shadow_library_members(base_path: str) -> None:
    """Names our mixin adds for itself must stay unknown to the library class: one the
    library gains in an upgrade would silently be replaced by ours (or ours by its)."""
    ours = OUR_ADDITIONS[base_path]
    base = lookup(base_path)
    rows = {k.target.rsplit(".", 1)[1] for k in CONTRACTS if k.target.startswith(base_path + ".")}
    clashes = [
        name
        for name in vars(_ours(ours))
        if name not in _NOT_OVERRIDES
        and name not in rows
        and (hasattr(base, name) or assigned_in_source(base, name, ("__init__", "__post_init__")))
    ]
    dist = DISTRIBUTION_OF[base_path.split(".", 1)[0]]
    assert not clashes, (
        f"{dist} {installed(dist)}: {base_path} now has {clashes}, which {ours} defines "
        "for itself — rename ours, re-run `make chaos`"
    )


def test_contract_table_matches_the_tree() -> None:
    """Every use the table names is still in our code (else the row is stale: remove or
    re-anchor it)."""
    stale = [
        f"{k.target} @ {where}" for k in CONTRACTS for where in k.where if locate(where) is None
    ]
    assert not stale, "CONTRACTS rows whose use is no longer in the tree:\n" + "\n".join(stale)

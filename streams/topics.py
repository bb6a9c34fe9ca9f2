"""The topic catalogue: the pipeline's public API, declared once.

Keys: the agent id on agent-scoped topics, the request id on llm topics, the policy id on
`security.policies`. Values: one JSON event envelope (see `schemas`). Every consumer reads
raw bytes and decodes them itself, so that undecodable input becomes a dead letter instead
of Faust's silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

DAY_MS = 86_400_000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    description: str
    key: str
    events: tuple[str, ...]
    retention_ms: int | None = 7 * DAY_MS
    compacted: bool = False
    partitions: int | None = None  # None = settings.topic_partitions
    #: workers refuse a record not under its event's own key in the partition that key
    #: hashes to (murmur2): the topic's state is kept per key partition
    #: (`streams.tables.misplaced`)
    keyed: bool = False

    @property
    def retention(self) -> timedelta | None:
        return None if self.retention_ms is None else timedelta(milliseconds=self.retention_ms)

    def configs(self) -> dict[str, str]:
        # The broker's clock, not the producer's: a record's timestamp is the one field a
        # sender sets unchecked, and replays, `audit verify` and Kafka's time index select
        # by it. Dated ahead or back, a record would drop out of a time range or cut a
        # partition's range short, hiding the records after it (tests/security/
        # test_timestamp_attacks.py). Events carry their own times (`occurred_at`).
        cfg: dict[str, str] = {"message.timestamp.type": "LogAppendTime"}
        if self.compacted:
            cfg["cleanup.policy"] = "compact"
            cfg["min.compaction.lag.ms"] = "0"
        elif self.retention_ms is not None:
            cfg["retention.ms"] = str(self.retention_ms)
        else:
            cfg["retention.ms"] = "-1"
        return cfg


AGENT_MESSAGES = "agent.messages"
AGENT_MESSAGES_ACCEPTED = "agent.messages.accepted"
AGENT_MESSAGES_REJECTED = "agent.messages.rejected"
SECURITY_POLICIES = "security.policies"
SECURITY_DECISIONS = "security.decisions"
SECURITY_IDENTITIES = "security.identities"
SECURITY_WORKER_KEYS = "security.worker_keys"
SECURITY_CHANGES_REJECTED = "security.changes.rejected"
#: the rule topics: every record on them must carry an admin signature to be applied
SIGNED_TOPICS = ("security.policies", "security.identities", "security.worker_keys")
AGENT_HEARTBEATS = "agent.heartbeats"
AGENT_STATUS = "agent.status"
METRICS_SAMPLES = "metrics.samples"
SYSTEM_STATS = "system.stats"
COMMS_RECORDS = "comms.records"
LLM_REQUESTS = "llm.requests"
LLM_CHUNKS = "llm.chunks"
LLM_RESPONSES = "llm.responses"
LLM_CANCELLATIONS = "llm.cancellations"
LLM_BREAKER = "llm.breaker"
PIPELINE_DEADLETTER = "pipeline.deadletter"
PIPELINE_CHECKPOINTS = "pipeline.checkpoints"
PIPELINE_HEALTH = "pipeline.health"

CATALOGUE: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec(
            AGENT_MESSAGES,
            "Messages agents send each other (input of enforce_policy)",
            "sender agent id",
            ("agent.message",),
        ),
        TopicSpec(
            AGENT_MESSAGES_ACCEPTED,
            "Messages every applicable policy allowed",
            "sender agent id",
            ("agent.message",),
        ),
        TopicSpec(
            AGENT_MESSAGES_REJECTED,
            "Denied messages, the reasons in metadata",
            "sender agent id",
            ("agent.message",),
        ),
        TopicSpec(
            SECURITY_POLICIES,
            "Policies and the security config (latest per key)",
            "policy id / __config__",
            ("security.policy", "security.policy_removed", "security.config"),
            retention_ms=None,
            compacted=True,
            partitions=1,
        ),
        TopicSpec(
            SECURITY_IDENTITIES,
            "What each agent is granted: roles, levels, keys, token user (latest per agent)",
            "agent id",
            ("security.identity", "security.identity_revoked"),
            retention_ms=None,
            compacted=True,
            partitions=1,
        ),
        TopicSpec(
            SECURITY_WORKER_KEYS,
            "Public keys workers sign hash chains with (latest per key id)",
            "key id",
            ("security.worker_key",),
            retention_ms=None,
            compacted=True,
            partitions=1,
        ),
        TopicSpec(
            SECURITY_CHANGES_REJECTED,
            "Records on the rule topics that workers ignore, with the reason",
            "the ignored record's key",
            ("security.change_rejected",),
            retention_ms=90 * DAY_MS,
            partitions=1,
        ),
        TopicSpec(
            SECURITY_DECISIONS,
            "One hash-chained decision per decoded message",
            "sender agent id",
            ("security.decision",),
            retention_ms=90 * DAY_MS,
        ),
        TopicSpec(
            AGENT_HEARTBEATS,
            "Agent heartbeats",
            "agent id",
            ("agent.heartbeat",),
            retention_ms=1 * DAY_MS,
            keyed=True,
        ),
        TopicSpec(
            AGENT_STATUS,
            "Agent up/down transitions, one per transition",
            "agent id",
            ("agent.status_changed",),
            retention_ms=90 * DAY_MS,
        ),
        TopicSpec(
            METRICS_SAMPLES,
            "Metric data points",
            "series name",
            ("metrics.sample",),
            retention_ms=1 * DAY_MS,
            keyed=True,
        ),
        TopicSpec(
            SYSTEM_STATS,
            "Worker memory and disk usage (psutil)",
            "worker id",
            ("system.stats",),
            retention_ms=7 * DAY_MS,
        ),
        TopicSpec(
            COMMS_RECORDS,
            "Communication records of six kinds",
            "agent id",
            ("comms.record",),
            retention_ms=30 * DAY_MS,
            keyed=True,
        ),
        TopicSpec(LLM_REQUESTS, "LLM calls to make", "request id", ("llm.request",), keyed=True),
        TopicSpec(
            LLM_CHUNKS,
            "Streamed deltas, ordered by sequence per request",
            "request id",
            ("llm.chunk",),
            retention_ms=1 * DAY_MS,
        ),
        TopicSpec(
            LLM_RESPONSES,
            "One final, hash-chained response per request",
            "request id",
            ("llm.response",),
            retention_ms=90 * DAY_MS,
        ),
        TopicSpec(
            LLM_CANCELLATIONS,
            "Requests to abort an in-flight LLM call",
            "request id",
            ("llm.cancel_requested",),
            retention_ms=1 * DAY_MS,
            keyed=True,
        ),
        TopicSpec(
            LLM_BREAKER,
            "Circuit breaker transitions per provider",
            "provider",
            ("llm.breaker_state_changed",),
            retention_ms=30 * DAY_MS,
        ),
        TopicSpec(
            PIPELINE_DEADLETTER,
            "Inputs a consumer could not process, with origin",
            "consumer name",
            ("pipeline.dead_letter",),
            retention_ms=30 * DAY_MS,
        ),
        TopicSpec(
            PIPELINE_CHECKPOINTS,
            "Table digests and covered offsets per worker",
            "worker id",
            ("pipeline.checkpoint",),
            retention_ms=30 * DAY_MS,
            partitions=1,
        ),
        TopicSpec(
            PIPELINE_HEALTH,
            "Component health transitions",
            "component",
            ("pipeline.health_changed",),
            retention_ms=30 * DAY_MS,
            partitions=1,
        ),
    )
}

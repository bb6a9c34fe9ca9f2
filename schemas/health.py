"""Heartbeats, agent status, metrics samples and system statistics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload, Time
from agentstream.schemas.limits import HEARTBEAT_INFO, METRIC_LABELS, limits_apply
from agentstream.schemas.registry import registry

AgentState = Literal["up", "down"]


@registry.register
class Heartbeat(Payload):
    TYPE = "agent.heartbeat"
    VERSION = 1
    KEY_FIELD = "agent_id"

    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    sent_at: Time
    sequence: int = Field(default=0, ge=0)
    #: kept per agent in the heartbeats table: bounded (`schemas.limits`)
    info: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=HEARTBEAT_INFO.json_schema()
    )

    @field_validator("info")
    @classmethod
    def _bounded_info(cls, value: dict[str, str], validation: ValidationInfo) -> dict[str, str]:
        return HEARTBEAT_INFO.check(value) if limits_apply(validation) else value


@registry.register
class AgentStatusChanged(Payload):
    TYPE = "agent.status_changed"
    VERSION = 1
    KEY_FIELD = "agent_id"

    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    previous: AgentState | None
    current: AgentState
    reason: Literal["first_seen", "heartbeat", "timeout", "missed_beats"]
    last_heartbeat_at: Time | None = None
    missed_beats: int = 0
    changed_at: Time


@registry.register
class MetricSample(Payload):
    TYPE = "metrics.sample"
    VERSION = 1
    KEY_FIELD = "series"

    series: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_:][A-Za-z0-9_:.-]*$")
    #: seconds since the epoch (float), the design's MetricDataPoint.timestamp
    timestamp: float = Field(ge=0)
    value: float = Field(allow_inf_nan=False)
    #: part of the key of every window in the metrics table: bounded (`schemas.limits`)
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=32, json_schema_extra=METRIC_LABELS.json_schema()
    )

    @field_validator("labels")
    @classmethod
    def _bounded_labels(cls, value: dict[str, str], validation: ValidationInfo) -> dict[str, str]:
        return METRIC_LABELS.check(value) if limits_apply(validation) else value


class DiskUsage(Payload):
    logs: int = Field(ge=0)
    #: installed dependencies (site-packages; the design's "nodeModules")
    dependencies: int = Field(ge=0)
    total: int = Field(ge=0)


class MemoryUsage(Payload):
    rss: int = Field(ge=0)
    heap_used: int = Field(ge=0)
    heap_total: int = Field(ge=0)
    external: int = Field(ge=0)


@registry.register
class SystemStats(Payload):
    TYPE = "system.stats"
    VERSION = 1
    KEY_FIELD = "worker_id"

    worker_id: str = Field(max_length=MAX_ID_LENGTH)
    timestamp: float
    disk_usage: DiskUsage
    memory: MemoryUsage
    cpu_percent: float = 0.0


@registry.register
class ComponentHealthChanged(Payload):
    """A component's health moved (e.g. ready → degraded); audited like any event."""

    TYPE = "pipeline.health_changed"
    VERSION = 1
    KEY_FIELD = "component"

    component: str = Field(max_length=MAX_ID_LENGTH)
    worker_id: str = Field(max_length=MAX_ID_LENGTH)
    previous: Literal["ok", "degraded", "down"] | None
    current: Literal["ok", "degraded", "down"]
    detail: str = Field(default="", max_length=4096)

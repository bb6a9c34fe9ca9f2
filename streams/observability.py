"""The pipeline's own Prometheus metrics (exported by the /metrics view).

Counters live in prometheus-client's default registry so any module can add its own and
`/metrics` exports them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter(
    "agentstream_events_in_total", "Records consumed, per topic and consumer", ["topic", "consumer"]
)
EVENTS_OUT = Counter("agentstream_events_out_total", "Events produced, per topic", ["topic"])
SEND_FAILURES = Counter(
    "agentstream_send_failures_total", "Events the producer failed to deliver, per topic", ["topic"]
)
DEAD_LETTERS = Counter(
    "agentstream_dead_letters_total",
    "Inputs dead-lettered, per source topic, consumer and error class",
    ["topic", "consumer", "error_class"],
)
DECISIONS = Counter(
    "agentstream_security_decisions_total", "Policy decisions by verdict", ["verdict"]
)
# A decision is pure CPU work of ~50 µs (docs/security.md): the buckets resolve that range
# finely and reach 1 s for pathological inputs. The threshold of AgentstreamDecisionLatencyHigh
# (10 ms, infra/prometheus/alerts.yml) must stay a bound: its p99 comparison is then exact.
# Labelled by verdict only (2 values): per-agent labels would grow with the agents.
DECISION_SECONDS = Histogram(
    "agentstream_security_decision_seconds",
    "Time enforce_policy takes to evaluate one message against the policies, by verdict",
    ["verdict"],
    buckets=(
        0.000025,
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
    ),
)
LLM_CALLS = Counter(
    "agentstream_llm_calls_total",
    "Final LLM responses by provider and status",
    ["provider", "status"],
)
LLM_RETRIES = Counter(
    "agentstream_llm_retries_total", "LLM attempts retried", ["provider", "reason"]
)
LLM_BUDGET_DENIED = Counter(
    "agentstream_llm_budget_denied_total",
    "LLM requests refused before any provider call because a budget is spent "
    "(limit: tokens or cost; window: 1h, 1d, 30d or <n>s) — agent ids are left out, "
    "they are unbounded; the final response's error names the budget",
    ["limit", "window"],
)
LLM_LATENCY = Histogram(
    "agentstream_llm_latency_seconds",
    "End-to-end LLM request latency",
    ["provider"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LLM_TOKENS = Counter("agentstream_llm_tokens_total", "Tokens used", ["provider", "model", "kind"])
BREAKER_STATE = Gauge(
    "agentstream_breaker_state",
    "Circuit breaker state (0 closed, 1 half-open, 2 open)",
    ["provider"],
)
AGENTS = Gauge("agentstream_agents", "Agents known to the heartbeat monitor by state", ["state"])
CONSUMER_LAG = Gauge(
    "agentstream_consumer_lag",
    "Records behind the end of each assigned partition",
    ["topic", "partition"],
)
# Per topic only: the partition and the offsets are in the worker's warning, and a
# partition label would multiply the series by the partition count for a rare event.
OFFSETS_SKIPPED = Counter(
    "agentstream_offsets_skipped_total",
    "Offsets the worker's consumer group had committed up to but not read when retention "
    "(or delete-records) removed them: skipped, never processed, per topic",
    ["topic"],
)
READY_COMPONENT = Gauge(
    "agentstream_ready_component",
    "Status of each /ready component when last evaluated (0 ok, 1 degraded, 2 down)",
    ["component"],
)
# Per table only: the keys refused are a sender's inventions (unbounded as labels); the
# dead letters carry them, and the warning names the partition.
TABLE_FULL = Counter(
    "agentstream_table_full_total",
    "Records refused (dead-lettered) because they would add a key — an agent id, a series "
    "and label set — to a partition of a monitoring table that holds its maximum, per table",
    ["table"],
)


class Throttled:
    """A warning logged at most once every `every_s` seconds, saying how many more times
    it happened meanwhile: a sender can make a worker refuse thousands of records a
    second, and a line for each would bury the rest of the log (the dead letters have
    them all)."""

    def __init__(
        self,
        log: logging.Logger,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.every_s = every_s
        self.clock = clock
        self.last: float | None = None
        self.held = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log `msg % args` (with the count held back since the last one) if due; True
        when it was logged."""
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            self.held += 1
            return False
        more = f" ({self.held} more since the last such warning)" if self.held else ""
        self.log.warning(msg + more, *args)
        self.last, self.held = now, 0
        return True

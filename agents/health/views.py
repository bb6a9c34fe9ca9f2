"""``GET /health`` (the process is alive), ``GET /ready`` (component status; 503 if any
component is down) and ``GET /metrics`` (Prometheus text).

/ready components: ``broker`` (a bootstrap server accepts a TCP connection), ``tables``
(recovery finished, not rebalancing), ``consumer_lag`` (no assigned catalogue partition
more than `ready_max_lag` records behind), plus every check registered in
`streams.health.CHECKS` (LLM providers' `check_setup`, the heartbeat monitor's ``agents``
— degraded while agents are down ...). A timer re-evaluates them every
`heartbeat_interval_s` and publishes a `ComponentHealthChanged` on `pipeline.health` for
every change, so degradation is recorded even when nobody polls /ready; every evaluation
also sets the gauge ``agentstream_ready_component{component}`` (0 ok, 1 degraded, 2 down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agentstream.agents.health.status import RANK, Component, HealthTracker, lag_status, overall
from agentstream.schemas import Event
from agentstream.streams import web_auth
from agentstream.streams.app import app, settings
from agentstream.streams.health import CHECKS
from agentstream.streams.observability import CONSUMER_LAG, READY_COMPONENT
from agentstream.streams.processing import emit
from agentstream.streams.topics import CATALOGUE, PIPELINE_HEALTH

log = logging.getLogger(__name__)
SOURCE = "health_monitor"
STARTED = time.time()
CHECK_TIMEOUT_S = 5.0
tracker = HealthTracker(settings.worker_id)
#: the components of the last evaluation (the console shows them without re-checking)
latest: list[Component] = []
_catalogue_topics = {settings.topic(name) for name in CATALOGUE}


async def broker_component() -> Component:
    errors = []
    for server in settings.bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
            w.close()
            return Component("broker", "ok", f"{server} reachable")
        except (OSError, ValueError, TimeoutError) as exc:
            errors.append(f"{server}: {exc or type(exc).__name__}")
    return Component("broker", "down", "; ".join(errors))


def tables_component() -> Component:
    recovered = app.tables.recovery.completed.is_set() if app.tables is not None else False
    if app.rebalancing:
        return Component("tables", "down", "rebalancing")
    if not recovered:
        return Component("tables", "down", "recovering table changelogs")
    return Component("tables", "ok", f"{len(app.tables)} table(s) recovered")


#: (topic, partition) label values of the consumer-lag series this worker exports
_lag_series: set[tuple[str, str]] = set()


def consumer_lags() -> dict[str, int]:
    """Records behind per assigned catalogue partition ("topic:partition"); sets the gauge.

    The gauge keeps only these partitions: the series of one this worker no longer holds
    (moved to another worker, which reports it) or whose end offset it does not know is
    removed. Left behind, it would repeat its last value forever, and the lag alerts
    would fire for a partition nobody is behind on."""
    out: dict[str, int] = {}
    shown: set[tuple[str, str]] = set()
    consumer = app.consumer
    committed = getattr(consumer, "_committed_offset", {})
    try:
        assignment = consumer.assignment()
    except Exception:  # consumer not started yet (or stopped): nothing assigned
        assignment = set()
    for tp in assignment:
        if tp.topic not in _catalogue_topics:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:
            high = None
        if high is None:
            continue
        done = committed.get(tp) or 0
        lag = max(0, int(high) - int(done))
        out[f"{tp.topic}:{tp.partition}"] = lag
        labels = (tp.topic, str(tp.partition))
        CONSUMER_LAG.labels(*labels).set(lag)
        shown.add(labels)
    for gone in _lag_series - shown:
        CONSUMER_LAG.remove(*gone)
    _lag_series.clear()
    _lag_series.update(shown)
    return out


async def _registered(name: str, check: Any) -> Component:
    try:
        status, detail = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except Exception as exc:  # a failing check is a down component, not a failing /ready
        return Component(name, "down", f"check failed: {type(exc).__name__}: {exc}")
    if status not in ("ok", "degraded", "down"):
        return Component(name, "down", f"check returned {status!r}")
    return Component(name, status, str(detail))


async def components() -> list[Component]:
    found = [
        await broker_component(),
        tables_component(),
        lag_status(consumer_lags(), settings.ready_max_lag),
    ]
    names = sorted(CHECKS)
    found += await asyncio.gather(*(_registered(n, CHECKS[n]) for n in names))
    return found


#: component label values of the readiness series this worker exports
_ready_series: set[str] = set()


def export_readiness(found: list[Component]) -> None:
    """Set agentstream_ready_component to each component's status as just evaluated;
    a component no longer evaluated loses its series instead of keeping its last status."""
    for c in found:
        READY_COMPONENT.labels(c.name).set(RANK[c.status])
    names = {c.name for c in found}
    for gone in _ready_series - names:
        READY_COMPONENT.remove(gone)
    _ready_series.clear()
    _ready_series.update(names)


async def evaluate() -> tuple[str, list[Component]]:
    found = await components()
    export_readiness(found)
    latest[:] = found
    for c in found:
        change = tracker.observe(c)
        if change is not None:
            log.warning("component %s: %s -> %s (%s)", c.name, change.previous, c.status, c.detail)
            try:
                await emit(PIPELINE_HEALTH, Event.of(change, source=SOURCE))
            except Exception:
                log.exception("could not publish health change of %s", c.name)
    return overall(found), found


@app.timer(settings.heartbeat_interval_s, name="evaluate_health")
async def evaluate_health() -> None:
    # also what keeps agentstream_ready_component current when nobody asks /ready
    await evaluate()


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__.split('.')[0]}.{type(loop).__name__}"


@app.page("/health")
class HealthView(View):
    async def get(self, request: Request) -> Response:
        return self.json(
            {
                "status": "alive",
                "worker_id": settings.worker_id,
                "uptime_s": round(time.time() - STARTED, 3),
                # the loop actually running (AGENTSTREAM_EVENT_LOOP), e.g. "uvloop.Loop"
                "event_loop": _loop_name(),
            }
        )


#: /ready evaluates at most this often; requests meanwhile, or while one evaluation runs,
#: share its answer. Each evaluation connects to every bootstrap broker and may call an
#: LLM provider: /ready needs no token, and a flood of it cost the worker that much each.
READY_REUSE_S = 1.0
_ready: dict[str, Any] = {"at": float("-inf"), "answer": None, "running": None}


async def evaluate_shared() -> tuple[str, list[Component]]:
    """`evaluate`, shared by concurrent callers and reused for `READY_REUSE_S`."""
    now = time.monotonic()
    if _ready["answer"] is not None and now - _ready["at"] < READY_REUSE_S:
        return _ready["answer"]
    running = _ready["running"]
    if running is None or running.done():
        running = _ready["running"] = asyncio.ensure_future(evaluate())
    answer = await asyncio.shield(running)
    if _ready["running"] is running:
        _ready.update(at=time.monotonic(), answer=answer, running=None)
    return answer


@app.page("/ready")
class ReadyView(View):
    async def get(self, request: Request) -> Response:
        status, found = await evaluate_shared()
        # an anonymous caller (a readiness probe: /ready is public by default) gets the
        # statuses only; the details name brokers, keychain errors, providers, counts
        shown = web_auth.scope_of(request) is not None
        body = {
            "ready": status != "down",
            "status": status,
            "worker_id": settings.worker_id,
            "components": {
                c.name: {"status": c.status, **({"detail": c.detail} if shown else {})}
                for c in found
            },
        }
        return self.json(body, status=200 if status != "down" else 503)


@app.page("/metrics")
class MetricsView(View):
    async def get(self, request: Request) -> Response:
        consumer_lags()
        return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

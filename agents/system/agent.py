"""A timer every `system_monitoring_interval_s` publishes this worker's `SystemStats` to
`system.stats`; ``GET /system/stats`` returns the latest one, plus every worker's in
``by_worker`` (``?local=1``: this worker's only; see `streams.web_cluster`). Also attaches
the rotating log file handler (`streams.logging_setup`) once the worker has set up logging."""

from __future__ import annotations

import asyncio
from typing import Any

from faust.web import Request, Response, View

from agentstream.agents.system.monitor import SystemMonitor
from agentstream.infra.paths import source_checkout, state_home
from agentstream.schemas import Event
from agentstream.streams.app import app, settings
from agentstream.streams.logging_setup import attach_file_handler, logs_dir
from agentstream.streams.processing import emit
from agentstream.streams.topics import SYSTEM_STATS
from agentstream.streams.web_cluster import gather, is_local

SOURCE = "system_monitor"
monitor = SystemMonitor(
    worker_id=settings.worker_id,
    logs_dir=logs_dir(settings),
    project_root=source_checkout() or state_home(),
)


@app.task
async def _attach_log_file() -> None:
    # Faust's worker replaces the root logger's handlers while starting; tasks run after
    attach_file_handler(settings)


@app.timer(settings.system_monitoring_interval_s, name="publish_system_stats")
async def publish_system_stats() -> None:
    stats = await asyncio.to_thread(monitor.sample)
    await emit(SYSTEM_STATS, Event.of(stats, source=SOURCE))


@app.page("/system/stats")
class SystemStatsView(View):
    async def get(self, request: Request) -> Response:
        latest = monitor.latest
        if latest is None:
            latest = await asyncio.to_thread(monitor.sample)
        body: dict[str, Any] = latest.model_dump(mode="json")
        body["paths"] = monitor.describe()
        if is_local(request):
            return self.json(body)
        got = await gather(request, body)
        return self.json({**body, "by_worker": dict(got.answers), **got.meta()})

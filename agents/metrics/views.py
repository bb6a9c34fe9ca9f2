"""``GET /metrics/series/{series}?since=...&until=...&label=k=v`` → the series' windows.

`since`/`until` accept what `agentstream replay` does (`-15m`, ISO-8601, epoch ms, `now`);
default: the whole retention. A series lives in the partition of its name (the key of
`metrics.samples`): the worker owning it answers, whichever worker was asked (see
`streams.web_cluster`); ``?local=1`` answers from this worker's partitions only.
"""

from __future__ import annotations

import time

from faust.web import Request, Response, View

from agentstream.agents.metrics.agent import writer
from agentstream.agents.metrics.windows import series_between
from agentstream.streams.app import app, settings
from agentstream.streams.replay import TimeParseError, parse_time
from agentstream.streams.web_cluster import key_route


def parse_labels(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise ValueError(f"label filter {v!r} is not key=value")
        out[k] = val
    return out


@app.page("/metrics/series/{series}")
class SeriesView(View):
    @key_route(writer.table, match_info="series")
    async def get(self, request: Request, series: str) -> Response:
        now = time.time()
        try:
            since = request.query.get("since")
            until = request.query.get("until")
            start = parse_time(since).timestamp() if since else now - settings.metrics_retention_s
            end = parse_time(until).timestamp() if until else now + 1
            labels = parse_labels(request.query.getall("label", []))
        except (TimeParseError, ValueError) as exc:
            return self.json({"error": str(exc)}, status=400)
        windows = series_between(
            list(writer.items()),
            series,
            start,
            end,
            labels=labels,
            now=now,
            retention_s=settings.metrics_retention_s,
        )
        return self.json(
            {
                "series": series,
                "since": start,
                "until": end,
                "interval_s": settings.metrics_collection_interval_s,
                "retention_s": settings.metrics_retention_s,
                "windows": windows,
            }
        )

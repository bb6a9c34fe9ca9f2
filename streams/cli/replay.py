"""`agentstream replay`: a time range of one or more topics as JSON lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

import click

from agentstream.streams.cli import check_time_range, cli, output_file, run, time_option
from agentstream.streams.replay import OUTPUT_FORMATS, Progress, replay_batches
from agentstream.streams.settings import get_settings


class ProgressBar:
    """`[#####.....]  42% 12,345/29,000  8,120 ev/s  ETA 2s` on a terminal, redrawn at
    most every `every_s`; the total is an offset span, so the bar can end below 100%
    when filters drop records (it counts records *read*, not written)."""

    def __init__(self, progress: Progress, stream: IO[str], every_s: float = 0.2) -> None:
        self.p = progress
        self.stream = stream
        self.every_s = every_s
        self.started = time.monotonic()
        self._last = 0.0

    def draw(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        self.stream.write(
            "\r"
            + render_bar(self.p.done, self.p.total, self.p.emitted, now - self.started)
            + ("\n" if final else "")
        )
        self.stream.flush()


def render_bar(done: int, total: int, emitted: int, elapsed: float, width: int = 24) -> str:
    frac = min(1.0, done / total) if total else 1.0
    filled = int(frac * width)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 and total > done else 0.0
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
        f"{done:,}/{total:,} read, {emitted:,} written  {rate:,.0f} ev/s  ETA {_dur(eta)}"
    )


def _dur(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@cli.command("replay")
@click.option("--topics", required=True, help="Comma-separated topics (catalogue names).")
@click.option(
    "--since",
    callback=time_option,
    help="Start: ISO-8601, `now`, or -15m/-2h/-1d (default: the oldest record).",
)
@click.option(
    "--until",
    callback=time_option,
    default="now",
    show_default=True,
    help="End (exclusive: ranges are [since, until)).",
)
@click.option("--agent", help="Only events naming this agent (source, sender, recipient, key).")
@click.option("--type", "event_type", help="Only events of this type.")
@click.option("--correlation-id", help="Only events with this correlation id.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=output_file,
    help="Write to FILE (default: stdout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(OUTPUT_FORMATS),
    default="json",
    show_default=True,
    help="json: one line per record, the event as on the wire; pretty: indented JSON; "
    "raw: the value's bytes.",
)
@click.option(
    "--meta",
    is_flag=True,
    help="Also print each record's topic, partition, offset, timestamp_ms and key.",
)
@click.option(
    "--show-secrets",
    is_flag=True,
    help="Write access tokens, passwords, API keys... as they are (default: [REDACTED]).",
)
def replay_cmd(
    topics: str,
    since: str | None,
    until: str | None,
    agent: str | None,
    event_type: str | None,
    correlation_id: str | None,
    out_path: Path | None,
    fmt: str,
    meta: bool,
    show_secrets: bool,
) -> None:
    """Replay a time range [--since, --until) of TOPICS, merged in timestamp order.

    Reads with its own consumer: no consumer group is joined and no offset is committed,
    so a replay never disturbs the workers. Records are written as `tail` prints them:
    --format json (one line per record: the event as it is on the wire, or `error` +
    `value_b64` for an undecodable record), pretty or raw; --meta adds each record's
    topic, partition, offset, timestamp_ms and key (what an audit trail keeps). Secrets
    (`auth.token` and the other secret keys of `streams.redaction`) are written as
    "[REDACTED]" unless --show-secrets.
    """
    names = [t.strip() for t in topics.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("name at least one topic", param_hint="'--topics'")
    check_time_range(since, until)
    bar_stream = sys.stderr if sys.stderr.isatty() else None
    n = run(
        _replay(
            names,
            since,
            until,
            agent,
            event_type,
            correlation_id,
            out_path,
            bar_stream,
            show_secrets=show_secrets,
            fmt=fmt,
            meta=meta,
        )
    )
    if out_path is not None:
        click.echo(f"wrote {n} record(s) to {out_path}", err=True)


async def _replay(
    names: list[str],
    since: str | None,
    until: str | None,
    agent: str | None,
    event_type: str | None,
    correlation_id: str | None,
    out_path: Path | None,
    bar_stream: IO[str] | None,
    *,
    show_secrets: bool = False,
    fmt: str = "json",
    meta: bool = False,
) -> int:
    settings = get_settings()
    progress = Progress()
    bar = ProgressBar(progress, bar_stream) if bar_stream is not None else None
    out = out_path.open("wb") if out_path is not None else sys.stdout.buffer
    pending: list[bytes] = []
    n = 0
    try:
        async for batch in replay_batches(
            settings,
            names,
            since,
            until,
            agent=agent,
            type=event_type,
            correlation_id=correlation_id,
            progress=progress,
        ):
            pending.extend(rec.render(fmt, meta=meta, show_secrets=show_secrets) for rec in batch)
            n += len(batch)
            if len(pending) >= 2000:
                out.write(b"".join(pending))
                pending.clear()
                if bar is not None:
                    bar.draw()
        out.write(b"".join(pending))
        out.flush()
        if bar is not None:
            bar.draw(final=True)
    finally:
        if out_path is not None:
            out.close()
    return n

"""`agentstream replay`: a time range of one or more topics as JSON lines."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import IO

import click

from agentstream.streams.cli import (
    atomic_output,
    check_time_range,
    cli,
    output_file,
    record_output_options,
    time_option,
)
from agentstream.streams.cli.progress import (
    EXIT_LOST,
    progress_option,
    run_with_progress,
    unreadable_reporter,
    warn_lost,
    warn_unreadable,
)
from agentstream.streams.replay import Progress, replay_batches
from agentstream.streams.settings import get_settings


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
@record_output_options
@progress_option
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
    progress: bool | None,
) -> None:
    """Replay a time range [--since, --until) of TOPICS, merged in timestamp order.

    Reads with its own consumer: no consumer group is joined and no offset is committed,
    so a replay never disturbs the workers. Records are written as `tail` prints them:
    --format json (one line per record: the event as it is on the wire, or `error` +
    `value_b64` for an undecodable record), pretty or raw; --meta adds each record's
    topic, partition, offset, timestamp_ms and key (what an audit trail keeps). Secrets
    (`auth.token` and the other secret keys of `streams.redaction`) are written as
    "[REDACTED]" unless --show-secrets.

    Exits 3 when records of the range were deleted (retention, delete-records) before
    they could be read: the rest is written, and a WARNING line on stderr names each
    topic-partition and the offsets lost. Exits 3 too when records of the range could
    not be parsed by the Kafka client (a header key that is not UTF-8, a codec it lacks):
    each is named on stderr as it is met, and skipped.
    """
    names = [t.strip() for t in topics.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("name at least one topic", param_hint="'--topics'")
    check_time_range(since, until)
    counter = Progress()
    n = run_with_progress(
        _replay(
            names,
            since,
            until,
            agent,
            event_type,
            correlation_id,
            out_path,
            counter,
            show_secrets=show_secrets,
            fmt=fmt,
            meta=meta,
        ),
        counter,
        progress,
        desc="replay",
        written=True,
    )
    lost = warn_lost(counter)
    if out_path is not None:
        missing = (
            f"; {counter.lost_offsets} offset(s) of the range were deleted before they "
            "could be read"
            if lost
            else ""
        )
        click.echo(f"wrote {n} record(s) to {out_path}{missing}", err=True)
    # records the client cannot parse are missing from the output as deleted ones are
    if warn_unreadable(counter) or lost:
        sys.exit(EXIT_LOST)


async def _replay(
    names: list[str],
    since: str | None,
    until: str | None,
    agent: str | None,
    event_type: str | None,
    correlation_id: str | None,
    out_path: Path | None,
    progress: Progress,
    *,
    show_secrets: bool = False,
    fmt: str = "json",
    meta: bool = False,
) -> int:
    settings = get_settings()
    # a file: written beside --out and renamed over it once complete (`atomic_output`)
    target: contextlib.AbstractContextManager[IO[bytes]] = (
        atomic_output(out_path)
        if out_path is not None
        else contextlib.nullcontext(sys.stdout.buffer)
    )
    pending: list[bytes] = []
    n = 0
    with target as out:
        async for batch in replay_batches(
            settings,
            names,
            since,
            until,
            agent=agent,
            type=event_type,
            correlation_id=correlation_id,
            progress=progress,
            on_unreadable=unreadable_reporter("replay"),
        ):
            pending.extend(rec.render(fmt, meta=meta, show_secrets=show_secrets) for rec in batch)
            n += len(batch)
            if len(pending) >= 2000:
                out.write(b"".join(pending))
                pending.clear()
        out.write(b"".join(pending))
        out.flush()
    return n

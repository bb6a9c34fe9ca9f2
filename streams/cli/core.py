"""Foundation commands: worker, kafka, topics, publish, tail, schemas, config."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import click
import orjson

from agentstream.schemas import Event, registry
from agentstream.schemas.errors import PipelineError, SchemaError
from agentstream.streams.admin import ensure_topics, list_topics, monitoring_clock_topics
from agentstream.streams.cli import (
    ConfigError,
    checked_settings,
    cli,
    finite_seconds,
    install_web_auth,
    json_option,
    record_output_options,
    run,
    without_agents,
)
from agentstream.streams.cli.progress import EXIT_LOST, unreadable_reporter, warn_unreadable
from agentstream.streams.client import (
    AsyncClient,
    Received,
    StartOffset,
    build_event,
    check_start_offset,
    sendable,
)
from agentstream.streams.errors import BrokerError, UnreadableRecord
from agentstream.streams.replay import Gap, Progress, ReplayRecord
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.topics import CATALOGUE

#: the batch-native path's switch while it was experimental; AGENTSTREAM_DELIVERY now
RETIRED_DELIVERY_SWITCH = "AGENTSTREAM_EXPERIMENTAL_BATCH_DELIVERY"


def check_worker(faust_args: list[str]) -> Settings:
    """The settings a worker with these options runs with, once both are known good
    (else a click error: exit 2). `--help` prints Faust's worker help and exits 0,
    touching nothing: no settings read, no app built, no broker contacted."""
    try:
        check_worker_args(faust_args)
    except click.exceptions.Exit as exc:  # --help, printed
        sys.exit(exc.exit_code)
    settings = checked_settings()
    faust_loglevel(settings.log_level)
    return settings


def run_worker(faust_args: list[str]) -> None:
    """Check the options and the settings, create missing topics, then hand over to
    Faust's `worker` command for this app."""
    settings = check_worker(faust_args)
    if RETIRED_DELIVERY_SWITCH in os.environ:
        # a deployment that still sets it asked for a path by a name no longer read:
        # say once, where the worker starts, which path runs
        click.echo(
            f"warning: {RETIRED_DELIVERY_SWITCH} is no longer read: this worker runs the "
            f"{settings.delivery} delivery path (AGENTSTREAM_DELIVERY, default native)",
            err=True,
        )
    if not any(a.startswith(("-l", "--loglevel")) for a in faust_args):
        faust_args = ["--loglevel", faust_loglevel(settings.log_level), *faust_args]
    install_web_auth()
    run(
        ensure_topics(
            settings, check_partitions=True, broker_clock_needed=monitoring_clock_topics()
        )
    )
    from agentstream.streams.app import app

    use_event_loop(settings.event_loop)
    sys.argv = ["agentstream", "worker", *faust_args]
    app.main()


def worker_args(faust_args: list[str]) -> list[str]:
    """Faust's worker options as given, but `-h` is help, as in every other command
    (Faust's own `-h` is `--web-host`, which stays available under its long name)."""
    return ["--help" if a == "-h" else a for a in faust_args]


def check_worker_args(faust_args: list[str]) -> None:
    """Parse the worker's options as Faust will, before anything is read or contacted:
    a bad one is a `click.UsageError` (exit 2); `--help` prints Faust's worker help and
    raises `click.exceptions.Exit`. Faust's command needs no app to be parsed."""
    from faust.cli.faust import cli as faust_cli

    with faust_cli.make_context("agentstream", ["worker"], resilient_parsing=True) as root:
        faust_cli.commands["worker"].make_context("worker", list(faust_args), parent=root)


#: AGENTSTREAM_LOG_LEVEL (Python's level names) -> Faust's --loglevel choices: Faust
#: refuses `warning`, the default's own name
FAUST_LOGLEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARN": "warn",
    "WARNING": "warn",
    "ERROR": "error",
    "CRIT": "crit",
    "CRITICAL": "crit",
    "FATAL": "crit",
}


def faust_loglevel(level: str) -> str:
    """Faust's name of a log level, or a `ConfigError` naming the variable."""
    try:
        return FAUST_LOGLEVELS[level.strip().upper()]
    except KeyError:
        raise ConfigError(
            f"AGENTSTREAM_LOG_LEVEL={level!r}: one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        ) from None


def use_event_loop(name: str) -> None:
    """Make `name` the event loop the worker creates (before anything made one: Faust's
    worker and its consumer thread each create theirs through the policy)."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Faust worker for the pipeline (creates missing topics first)."""
    run_worker(list(ctx.args))


# -- kafka -------------------------------------------------------------------------------
@without_agents
@cli.group()
def kafka() -> None:
    """The local single-node Kafka broker (KRaft) for development and tests."""


def _kafka(*argv: str) -> None:
    # One implementation of the broker commands: the launcher's own CLI.
    from agentstream.infra.kafka.__main__ import main as launcher_main

    code = launcher_main(list(argv))
    if code:
        sys.exit(code)


NODES = click.option(
    "--nodes",
    type=click.IntRange(1, 9),
    default=None,
    help="A local KRaft cluster of N nodes (RF 3, min ISR 2 at 3 nodes); default one broker.",
)


SECURED = click.option(
    "--secured",
    is_flag=True,
    help="The local broker that authenticates every client: mutual TLS and SCRAM over "
    "SASL_SSL, ACLs enforced (state in <state>/kafka-secured; see docs/cluster.md).",
)


def _nodes(nodes: int | None, secured: bool = False) -> list[str]:
    return (["--nodes", str(nodes)] if nodes else []) + (["--secured"] if secured else [])


@kafka.command("start")
@NODES
@SECURED
def kafka_start(nodes: int | None, secured: bool) -> None:
    """Start the local broker (first use fetches jars and formats storage)."""
    _kafka("start", *_nodes(nodes, secured))


@kafka.command("stop")
@NODES
@SECURED
def kafka_stop(nodes: int | None, secured: bool) -> None:
    """Stop the local broker started by `kafka start`."""
    _kafka("stop", *_nodes(nodes, secured))


@kafka.command("status")
@NODES
@SECURED
@json_option()
def kafka_status(nodes: int | None, secured: bool, as_json: bool) -> None:
    """Say whether the local broker runs, and where (exit 3 when stopped)."""
    _kafka("status", *_nodes(nodes, secured), *(["--json"] if as_json else []))


@kafka.command("fetch")
def kafka_fetch() -> None:
    """Only download the Kafka jars into the cache."""
    _kafka("fetch")


# -- topics ------------------------------------------------------------------------------
@cli.group()
def topics() -> None:
    """The topic catalogue."""


@topics.command("create")
def topics_create() -> None:
    """Create every missing catalogue topic (idempotent)."""
    created = run(
        ensure_topics(
            get_settings(),
            check_partitions=True,
            warn=lambda line: click.echo(f"warning: {line}", err=True),
        )
    )
    click.echo(f"created {len(created)} topic(s)" + (": " + ", ".join(created) if created else ""))


@topics.command("list")
def topics_list() -> None:
    """List catalogue topics with their partition counts."""
    from agentstream.streams.topics import CATALOGUE

    settings = get_settings()
    for st in run(list_topics(settings)):
        base = st.name[len(settings.topic_prefix) :]
        spec = CATALOGUE[base]
        flags = "compacted" if spec.compacted else f"retention {spec.retention_ms or -1} ms"
        where = f"{st.partitions} partitions" if st.exists else "MISSING"
        if st.timestamp_type not in (None, "LogAppendTime"):
            # the producer's clock: see `streams.admin.producer_clock_warning`
            flags += f", {st.timestamp_type}"
        click.echo(f"{st.name:32} {where:16} {flags:28} {spec.description}")


# -- publish / tail ----------------------------------------------------------------------
def check_topic(topic: str, prefix: str = "") -> str:
    """The catalogue name of `topic` (its name, or with the settings' prefix), else a
    `UsageError` naming the closest one: a typo must not reach the broker, which may
    create it."""
    base = topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic
    if base in CATALOGUE:
        return base
    close = difflib.get_close_matches(base, list(CATALOGUE), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise click.UsageError(
        f"unknown topic {topic!r}{hint}; `agentstream topics list` shows the catalogue"
    )


def parse_line(topic: str, line: bytes, *, source: str, event_type: str | None) -> Event[Any]:
    """One JSON line -> a validated event for `topic`; `orjson.JSONDecodeError` (also for
    bytes that are not UTF-8) or `SchemaError` when it is not one."""
    return build_event(topic, orjson.loads(line), source=source, event_type=event_type)


@without_agents
@cli.command()
@click.argument("topic")
@click.option(
    "--file",
    "-f",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON lines file (default: stdin).",
)
@click.option("--type", "event_type", help="Event type for bare payloads.")
@click.option("--source", default="agentstream-cli", show_default=True, help="Envelope source.")
@click.option(
    "--dry-run", is_flag=True, help="Validate every line and send nothing (no broker contact)."
)
def publish(
    topic: str, path: Path | None, event_type: str | None, source: str, dry_run: bool
) -> None:
    """Publish JSON lines to TOPIC, each validated against its schema first.

    Invalid lines are reported on stderr with line number and reason and not sent; valid
    lines are sent anyway; the exit status is 1 if any line was invalid. The broker is
    contacted only once a line is valid, never with --dry-run.
    """
    events = CATALOGUE[check_topic(topic, get_settings().topic_prefix)].events
    if event_type is not None and event_type not in events:
        raise click.BadParameter(
            f"{event_type!r} does not go on {topic} (its types: {', '.join(events)})",
            param_hint="'--type'",
        )
    stream: IO[bytes] = path.open("rb") if path else sys.stdin.buffer
    try:
        sent, bad = run(_publish(topic, stream, event_type, source, dry_run=dry_run))
    finally:
        if path:
            stream.close()
    verb = "would send" if dry_run else "sent"
    click.echo(f"{verb} {sent} event(s) to {topic}, {bad} invalid line(s)", err=True)
    if bad:
        sys.exit(1)


async def _publish(
    topic: str, lines: IO[bytes], event_type: str | None, source: str, *, dry_run: bool = False
) -> tuple[int, int]:
    bad = valid = 0
    pending: list[Any] = []
    client: AsyncClient | None = None
    settings = get_settings()
    try:
        lineno = 0
        async for line in lines_off_loop(lines):
            lineno += 1
            if not line.strip():
                continue
            try:
                event = parse_line(topic, line, source=source, event_type=event_type)
                # too big for the topic: an invalid line like the others (it ended the
                # whole file, with no line number, and passed --dry-run)
                sendable(settings, topic, event)
            except (orjson.JSONDecodeError, SchemaError) as exc:
                bad += 1
                click.echo(f"line {lineno}: {type(exc).__name__}: {exc}", err=True)
                continue
            valid += 1
            if dry_run:
                continue
            if client is None:  # connect once there is something to send
                client = AsyncClient(source=source)
                await client.start()
            pending.append(await client.publish(topic, event, wait=False))
        for fut in pending:
            await fut
    finally:
        if client is not None:
            await client.stop()
    return valid, bad


#: bytes a read of `lines_off_loop` asks for, and reads it may be ahead of the caller
READ_CHUNK = 64 * 1024
READ_AHEAD = 16


async def lines_off_loop(stream: IO[bytes]) -> AsyncIterator[bytes]:
    """The lines of `stream` (each with its newline but a last one without), read in a
    daemon thread: a read that waits — a terminal, a pipe — blocks that thread, never the
    event loop. Read on the loop, `publish` from a terminal ignored the first Ctrl-C:
    asyncio's handler only cancels the task, which waited in the read until the next line
    came. A stream with no file descriptor (in memory) is iterated as it is.

    The thread reads a duplicate of the descriptor and closes it itself: the caller may
    close `stream` while the thread still waits in a read (after an interrupt), and the
    descriptor's number, reused by a socket, must not be read from after that."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.BytesIO: nothing to wait for
        for line in stream:
            yield line
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | OSError | None] = asyncio.Queue()
    room = threading.Semaphore(READ_AHEAD)
    done = threading.Event()
    own = os.dup(fd)

    def put(item: bytes | OSError | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the command has ended
            return False
        return True

    def read() -> None:
        try:
            while room.acquire() and not done.is_set():
                try:
                    data = os.read(own, READ_CHUNK)
                except OSError as exc:
                    put(exc)
                    return
                if not put(data or None) or not data:
                    return
        finally:
            os.close(own)

    threading.Thread(target=read, name="agentstream-read-lines", daemon=True).start()
    # the reads since the last newline: only each new read is searched, and a line is
    # joined once. Growing one bytes object per read and searching all of it was
    # quadratic in a line's length (one 32 MiB line took seconds)
    pending: list[bytes] = []
    try:
        while True:
            item = await queue.get()
            room.release()
            if isinstance(item, OSError):
                raise item
            if item is None:
                break
            cut = item.rfind(b"\n")
            if cut < 0:
                pending.append(item)
                continue
            pending.append(item[:cut])
            for line in b"".join(pending).split(b"\n"):
                yield line + b"\n"
            pending = [item[cut + 1 :]]
        rest = b"".join(pending)
        if rest:
            yield rest
    finally:
        done.set()
        room.release()  # a thread waiting for room wakes, sees `done`, and ends


def start_offset(ctx: click.Context, param: click.Parameter, value: str | None) -> StartOffset:
    """Callback of `tail --offset`: `beginning`, `end`, n or -n (checked before any
    connection)."""
    try:
        return check_start_offset(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@without_agents
@cli.command()
@click.argument("topic")
@click.option(
    "--offset",
    "-o",
    default="end",
    callback=start_offset,
    metavar="beginning|end|N|-N|TIME",
    help="Where to start: the oldest record, new records only (default), offset N, the "
    "last N records of each partition, or the first record at or after TIME (ISO-8601, "
    "-15m / -2h, or s@<epoch ms> as in kcat).",
)
@click.option("--from-beginning", is_flag=True, help="Same as --offset beginning.")
@click.option(
    "--partition",
    "-p",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    help="Only this partition (repeat for more; default: all).",
)
@click.option("--key", "-k", help="Only records with this key (an agent id, a request id...).")
@click.option(
    "--group",
    "-G",
    "group_id",
    help="Read as a member of this consumer group and commit its offsets (default: no "
    "group, nothing committed). Partitions are the group's; --offset then only applies "
    "to partitions without a committed offset (beginning or end).",
)
@click.option("--max", "max_events", type=click.IntRange(min=1), help="Stop after N records.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_seconds,
    help="Stop after S seconds without a record.",
)
@click.option(
    "--exit",
    "-e",
    "until_end",
    is_flag=True,
    help="Stop once every partition is read up to where it ended when tail started "
    "(kcat's -e; not with --group).",
)
@record_output_options
def tail(
    topic: str,
    offset: StartOffset,
    from_beginning: bool,
    partitions: tuple[int, ...],
    key: str | None,
    group_id: str | None,
    max_events: int | None,
    timeout_s: float | None,
    until_end: bool,
    fmt: str,
    meta: bool,
    show_secrets: bool,
) -> None:
    """Print the records of TOPIC as they arrive, in the format `replay` writes.

    --format json (one line per record: the event as it is on the wire, or `error` and
    `value_b64` for a record that is no event), pretty or raw; --meta adds topic,
    partition, offset, timestamp_ms and key. Secrets (`auth.token` and the other secret
    keys of `streams.redaction`) are printed as "[REDACTED]" unless --show-secrets.
    --max counts the records printed."""
    check_topic(topic, get_settings().topic_prefix)
    if from_beginning:
        if offset != "end":
            raise click.UsageError("--from-beginning and --offset: give one of them")
        offset = "beginning"
    if group_id is not None and (partitions or offset not in ("beginning", "end")):
        raise click.UsageError(
            "--group: the group assigns the partitions and starts at its committed "
            "offsets; --partition and --offset N/-N/TIME apply only without a group"
        )
    if group_id is not None and until_end:
        raise click.UsageError("--exit reads the partitions tail assigns itself: not with --group")
    incomplete = run(
        _tail(
            topic,
            offset=offset,
            partitions=partitions,
            key=key,
            group_id=group_id,
            max_events=max_events,
            timeout_s=timeout_s,
            until_end=until_end,
            fmt=fmt,
            meta=meta,
            show_secrets=show_secrets,
        )
    )
    if incomplete:
        sys.exit(EXIT_LOST)


async def _tail(
    topic: str,
    *,
    offset: StartOffset = "end",
    partitions: tuple[int, ...] = (),
    key: str | None = None,
    group_id: str | None = None,
    max_events: int | None = None,
    timeout_s: float | None = None,
    until_end: bool = False,
    fmt: str = "json",
    meta: bool = False,
    show_secrets: bool = False,
) -> bool:
    """Print the records; whether any was skipped, deleted before it was read or not
    parsed by the Kafka client (each said on stderr as it is met)."""
    out = sys.stdout.buffer
    wanted = key.encode() if key is not None else None
    printed = 0
    lost: list[Gap] = []

    def said_lost(gap: Gap) -> None:
        lost.append(gap)
        click.echo(f"WARNING: {gap.describe()}", err=True)

    progress = Progress()
    say_unreadable = unreadable_reporter("tail")
    records = AsyncClient().subscribe(
        topic,
        offset=offset,
        partitions=partitions or None,
        group_id=group_id,
        # --max counts what is printed (not what a key filter drops, nor a record the
        # Kafka client cannot parse), so the client does not stop
        timeout_s=timeout_s,
        on_lost=said_lost,
        until_end=until_end,
    )
    try:
        async for rec in records:
            if isinstance(rec.error, UnreadableRecord):
                # said whatever its key: a batch's stand-in has none of its records'
                progress.unreadable += 1
                say_unreadable(f"{rec.topic}[{rec.partition}] {rec.error}")
                continue
            if wanted is not None and rec.key != wanted:
                continue
            out.write(received_record(rec).render(fmt, meta=meta, show_secrets=show_secrets))
            out.flush()
            printed += 1
            if max_events is not None and printed >= max_events:
                break
    except ValueError as exc:  # a partition the topic does not have
        raise click.BadParameter(str(exc), param_hint="'--partition'") from None
    finally:
        await records.aclose()
    return warn_unreadable(progress) or bool(lost)


def received_record(rec: Received) -> ReplayRecord:
    """A subscription's record as `replay` has it, so both print the same lines. The
    event is the validated one (a record that does not validate is shown with its
    error, as bytes)."""
    data = None if rec.event is None or rec.raw is None else orjson.loads(rec.raw)
    error = None if rec.error is None else f"{type(rec.error).__name__}: {rec.error}"
    return ReplayRecord(
        rec.topic, rec.partition, rec.offset, rec.timestamp_ms, rec.key, rec.raw, data, error
    )


# -- schemas / config --------------------------------------------------------------------
@without_agents
@cli.group()
def schemas() -> None:
    """Event schemas."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write a JSON Schema file per event type into DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    for type_ in registry.types():
        envelope = registry.envelope(type_)
        schema = envelope.model_json_schema()
        schema["title"] = type_
        schema["$id"] = f"agentstream:{type_}:v{registry.model(type_).VERSION}"
        (directory / f"{type_}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    click.echo(f"wrote {len(registry.types())} schemas to {directory}")


@without_agents
@cli.command()
@click.option(
    "--markdown", is_flag=True, help="Print the defaults as the table of docs/configuration.md."
)
def config(markdown: bool) -> None:
    """Show the effective configuration (secrets masked)."""
    if markdown:
        click.echo("| Variable | Default | Meaning |\n|---|---|---|")
        for name, info in Settings.model_fields.items():
            default = "" if info.default_factory else info.default
            shown = (
                "(generated)" if info.default_factory else ("" if default is None else str(default))
            )
            if name == "data_dir":  # depends on where the code runs (see its description)
                shown = "<state>/worker"
            click.echo(f"| `{Settings.env_name(name)}` | `{shown}` | {info.description} |")
        return
    settings = get_settings()  # valid: checked before any command runs
    for var, value, desc in Settings.describe(settings):
        click.echo(f"{var:40} {value:30} {desc}")
    _show_secrets(settings)


def _show_secrets(settings: Settings) -> None:
    """Where each secret these settings need comes from — never its value."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.kafka_security import PASSWORD_ENTRY

    needed = []
    if settings.kafka_security_protocol.startswith("SASL_"):
        needed.append(PASSWORD_ENTRY)
    if settings.web_enabled and settings.web_auth == "token":
        needed += ["web.tokens", "web.cluster_token"]
    needed.append("web.token")  # what CLI commands send to the views
    if not needed:
        return
    click.echo(f"\nsecrets (sources: {settings.secret_sources}):")
    try:
        provider = KeychainCredentialsProvider(settings)
    except PipelineError as exc:
        click.echo(f"  cannot open the secret sources: {exc}")
        return
    for entry in needed:
        try:
            found = provider.locate(entry)
        except PipelineError as exc:
            state = f"unreadable ({exc})"
        else:
            state = f"set (from {found[0]})" if found else "MISSING"
        click.echo(f"  {entry:38} {state}")


__all__ = ["BrokerError", "cli"]

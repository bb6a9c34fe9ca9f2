"""`agentstream policy apply FILE | list | remove ID`.

`apply` validates the whole file first — every policy against its schema and every
pattern compiled with RE2 — and publishes nothing if anything is wrong, so the policies
in force stay as they were. What it publishes goes out in one Kafka transaction: a
worker sees all of a file's changes or none.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import click
import orjson
import yaml
from aiokafka import AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from agents.security.patterns import validate_patterns
from agents.security.store import PolicyStore
from schemas import Event, encode
from schemas.security import SecurityConfig, SecurityPolicy, SecurityPolicyRemoved
from streams.cli import cli, run
from streams.client import group_less_consumer
from streams.settings import Settings, get_settings
from streams.tables.security import CONFIG_KEY
from streams.topics import SECURITY_POLICIES

SOURCE = "agentstream-policy-cli"


class PolicyFileError(click.ClickException):
    exit_code = 1


@cli.group()
def policy() -> None:
    """Security policies (published to the compacted security.policies topic)."""


def parse_policy_file(text: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(policy mappings, config mapping or None) from YAML or JSON text.

    Accepted shapes: one policy mapping; a list of policies; or a mapping with
    ``policies: [...]`` and optionally ``enabled`` and ``default_action``.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"not YAML or JSON: {exc}") from None
    config: dict[str, Any] | None = None
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and "policy_id" in data:
        items = [data]
    elif isinstance(data, dict):
        unknown = set(data) - {"policies", "enabled", "default_action"}
        if unknown:
            raise PolicyFileError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
        items = data.get("policies") or []
        config = {k: data[k] for k in ("enabled", "default_action") if k in data} or None
    else:
        raise PolicyFileError("expected a policy, a list of policies or {policies: [...]}")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise PolicyFileError("policies must be a list of mappings")
    return items, config


def validate_policies(
    items: list[dict[str, Any]], current: dict[str, Any]
) -> tuple[list[SecurityPolicy], list[str], list[str]]:
    """(policies to publish, unchanged ids, problems). Versions: a policy without one gets
    the version in force + 1; an explicit version must be newer than the one in force."""
    problems: list[str] = []
    out: list[SecurityPolicy] = []
    unchanged: list[str] = []
    seen: set[str] = set()
    for n, item in enumerate(items, 1):
        label = f"policy #{n} ({item.get('policy_id', '?')})"
        explicit = "version" in item
        try:
            parsed = SecurityPolicy.model_validate({**item, "version": item.get("version", 1)})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"{label}: {loc}: {err['msg']}")
            continue
        if parsed.policy_id in seen:
            problems.append(f"{label}: policy id appears twice in the file")
            continue
        seen.add(parsed.policy_id)
        for field in ("allowed_patterns", "blocked_patterns"):
            problems += [
                f"{label}: {field}: {p}" for p in validate_patterns(getattr(parsed, field))
            ]
        in_force = current.get(parsed.policy_id)
        in_force_version = int(in_force.get("version", 0)) if isinstance(in_force, dict) else 0
        if explicit:
            if parsed.version <= in_force_version:
                problems.append(
                    f"{label}: version {parsed.version} is not newer than "
                    f"v{in_force_version} in force"
                )
                continue
        else:
            if in_force is not None and _same(in_force, parsed):
                unchanged.append(parsed.policy_id)
                continue
            parsed = parsed.model_copy(update={"version": in_force_version + 1})
        out.append(parsed)
    return out, unchanged, problems


def _same(in_force: dict[str, Any], policy: SecurityPolicy) -> bool:
    mine = policy.model_dump(mode="json")
    mine.pop("version")
    theirs = dict(in_force)
    theirs.pop("version", None)
    return orjson.dumps(mine, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        theirs, option=orjson.OPT_SORT_KEYS
    )


async def read_policies(settings: Settings, timeout_s: float = 30.0) -> dict[str, Any]:
    """The folded state of security.policies as it is on the broker now."""
    store = PolicyStore(settings)
    topic = settings.topic(SECURITY_POLICIES)
    consumer = group_less_consumer(settings.bootstrap, "policy-cli")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        if not consumer.partitions_for_topic(topic):
            await consumer._client.force_metadata_update()
            if not consumer.partitions_for_topic(topic):
                return {}
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=int(timeout_s * 1000))
            if not batch:
                raise click.ClickException(f"timed out reading {topic}")
            for rec in batch.get(tp, []):
                store.apply_record(rec.key, rec.value)
        return store.state
    finally:
        await consumer.stop()


async def publish(settings: Settings, events: list[Event[Any]]) -> None:
    """All events in one transaction (a reader sees the whole file applied, or nothing)."""
    from streams.admin import ensure_topics

    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        transactional_id=f"{SOURCE}-{uuid.uuid4().hex}",
        enable_idempotence=True,
        acks="all",
    )
    await producer.start()
    try:
        async with producer.transaction():
            for event in events:
                await producer.send(
                    settings.topic(SECURITY_POLICIES),
                    key=event.key.encode(),
                    value=encode(event),
                    partition=0,
                )
    finally:
        await producer.stop()


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Validate and show what would change; publish nothing."
)
def policy_apply(file: Path, dry_run: bool) -> None:
    """Validate FILE (YAML or JSON: one policy, a list, or {policies, enabled,
    default_action}) and publish its policies; nothing is published if any is invalid."""
    settings = get_settings()
    items, config = parse_policy_file(file.read_text(encoding="utf-8"))
    current = run(read_policies(settings))
    policies, unchanged, problems = validate_policies(items, current)
    new_config: SecurityConfig | None = None
    if config is not None:
        base = current.get(CONFIG_KEY) or {}
        try:
            new_config = SecurityConfig.model_validate({**base, **config})
        except ValidationError as exc:
            problems += [
                f"config: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors(include_url=False)
            ]
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        raise PolicyFileError(
            f"{file}: {len(problems)} problem(s); nothing published, "
            "the policies in force are unchanged"
        )
    events: list[Event[Any]] = [Event.of(p, source=SOURCE) for p in policies]
    if new_config is not None:
        events.append(Event.of(new_config, source=SOURCE))
    for p in policies:
        click.echo(f"{'would apply' if dry_run else 'applying'} {p.policy_id} v{p.version}")
    for pid in unchanged:
        click.echo(f"unchanged {pid}")
    if new_config is not None:
        click.echo(
            f"config: security {'enabled' if new_config.enabled else 'disabled'}, "
            f"default {new_config.default_action}"
        )
    if events and not dry_run:
        run(publish(settings, events))
        click.echo(f"published {len(events)} event(s) to {settings.topic(SECURITY_POLICIES)}")


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def policy_list(as_json: bool) -> None:
    """Show the policies in force and the security config."""
    settings = get_settings()
    state = run(read_policies(settings))
    if as_json:
        sys.stdout.write(
            orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        )
        return
    cfg = state.get(CONFIG_KEY)
    if cfg is None:
        click.echo(
            f"config: none published (settings: security "
            f"{'enabled' if settings.security_enabled else 'disabled'}, "
            f"default {settings.security_default_action})"
        )
    else:
        click.echo(
            f"config: security {'enabled' if cfg.get('enabled') else 'disabled'}, "
            f"default {cfg.get('default_action')}"
        )
    rows = [(k, v) for k, v in sorted(state.items()) if k != CONFIG_KEY]
    if not rows:
        click.echo("no policies")
    for pid, p in rows:
        flags = ",".join(
            f
            for f, on in (
                ("enc", p.get("require_encryption")),
                ("auth", p.get("require_authentication")),
            )
            if on
        )
        roles = ",".join(p.get("allowed_roles") or []) or "*"
        click.echo(
            f"{pid:24} v{p.get('version')!s:<4} level={p.get('level')!s:12} roles={roles:16} "
            f"max={p.get('max_message_size')!s:8} allowed={len(p.get('allowed_patterns') or [])} "
            f"blocked={len(p.get('blocked_patterns') or [])} {flags}"
        )


@policy.command("remove")
@click.argument("policy_id")
def policy_remove(policy_id: str) -> None:
    """Remove a policy (publishes security.policy_removed for POLICY_ID)."""
    settings = get_settings()
    state = run(read_policies(settings))
    if policy_id == CONFIG_KEY or policy_id not in state:
        raise PolicyFileError(f"no policy {policy_id!r} in force")
    run(publish(settings, [Event.of(SecurityPolicyRemoved(policy_id=policy_id), source=SOURCE)]))
    click.echo(f"removed {policy_id}")

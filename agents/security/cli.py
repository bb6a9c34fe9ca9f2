"""`agentstream policy apply FILE | list | remove ID`, `agentstream identity grant | revoke
| list` and `agentstream admin keygen`.

`apply` validates the whole file first — every policy against its schema and every
pattern compiled with RE2 — and publishes nothing if anything is wrong, so the policies
in force stay as they were. What it publishes goes out in one Kafka transaction: a
worker sees all of a file's changes or none.

Every rule change is signed with the admin key in the keychain entry
``admin_key.<AGENTSTREAM_SECURITY_ADMIN_KEY_ID>`` (`admin keygen` makes one): workers apply
only changes signed by a key of `AGENTSTREAM_SECURITY_ADMIN_KEYS` and newer than the
version in force (see streams.tables.security). Without the admin key a command that
publishes stops with one line and exit code 2, publishing nothing.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import orjson
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from agentstream.agents.security.patterns import cost_problems, validate_patterns
from agentstream.agents.security.store import fold_topic
from agentstream.schemas import Event, encode
from agentstream.schemas.base import Payload
from agentstream.schemas.security import (
    AgentIdentity,
    AgentIdentityRevoked,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
    SignedChange,
)
from agentstream.streams.cli import NoAdminKey, cli, json_option, non_empty, run
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.documents import MAX_NESTING as DOCUMENT_NESTING
from agentstream.streams.documents import too_deep
from agentstream.streams.errors import CredentialsError
from agentstream.streams.kafka_security import new_producer
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.signing import (
    ADMIN_ENTRY,
    SigningError,
    new_private_key,
    private_from_b64,
    private_to_b64,
    public_b64,
    sign_change,
)
from agentstream.streams.tables.security import (
    CONFIG_KEY,
    REMOVED_KEY,
    REVOKED_KEY,
    Checked,
    identity_view,
    policy_view,
    trusted_admin_keys,
)
from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES

SOURCE = "agentstream-policy-cli"


class PolicyFileError(click.ClickException):
    exit_code = 1


@cli.group()
def policy() -> None:
    """Security policies (signed, on the compacted security.policies topic)."""


# -- signing --------------------------------------------------------------------------------
class AdminKey:
    """The admin key the CLI signs with (`admin_key.<id>` in the keychain)."""

    def __init__(self, key_id: str, key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self.key = key

    def sign(self, payload: SignedChange) -> SignedChange:
        body = sign_change(payload.TYPE, payload.model_dump(mode="json"), self.key, self.key_id)
        return type(payload).model_validate(body)

    def event(self, payload: SignedChange) -> Event[Any]:
        return Event.of(self.sign(payload), source=SOURCE)


def _provider(settings: Settings) -> KeychainCredentialsProvider:
    try:
        return KeychainCredentialsProvider(settings)
    except CredentialsError as exc:
        raise NoAdminKey(f"no usable keychain for the admin key: {exc}") from None


def load_admin_key(settings: Settings) -> AdminKey:
    """The admin key from the keychain, or a one-line `NoAdminKey` (exit 2)."""
    key_id = settings.security_admin_key_id
    entry = ADMIN_ENTRY.format(key_id)
    try:
        text = run(_provider(settings).get_secret(entry))
    except click.ClickException as exc:
        raise NoAdminKey(f"reading {entry} from the keychain failed: {exc.message}") from None
    if not text:
        raise NoAdminKey(
            f"no admin key {entry!r} in the keychain (AGENTSTREAM_SECURITY_ADMIN_KEY_ID="
            f"{key_id}); create one with `agentstream admin keygen --id {key_id}`: "
            "nothing published"
        )
    try:
        return AdminKey(key_id, private_from_b64(text))
    except SigningError as exc:
        raise NoAdminKey(f"keychain entry {entry!r}: {exc}: nothing published") from None


def trusted_keys(settings: Settings, admin: AdminKey | None = None) -> dict[str, Ed25519PublicKey]:
    """The admin keys a worker with these settings trusts, plus the CLI's own key: what
    is in force is read as the workers read it, and versions count from there."""
    keys, _problem = trusted_admin_keys(settings.security_admin_keys)
    if admin is not None:
        keys.setdefault(admin.key_id, admin.key.public_key())
    return keys


# -- policy files ---------------------------------------------------------------------------
#: nesting a policy file may have: a policy is three levels deep; deeper is a mistake, and
#: building it would exhaust the stack (checked on the parser's events, without recursion)
MAX_NESTING = DOCUMENT_NESTING


#: the security config's fields a policy file may set (the rest the CLI sets itself: the
#: key, the version, the signature; `policies` in a file are published one by one)
CONFIG_FIELDS = tuple(
    f
    for f in SecurityConfig.model_fields
    if f not in ("config_id", "version", "signed_by", "signature", "policies")
)


def parse_policy_file(
    text: str, source: str = "policy file"
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(policy mappings, config mapping or None) from YAML or JSON text.

    Accepted shapes: one policy mapping; a list of policies; or a mapping with
    ``policies: [...]`` and optionally any of the security config's fields
    (`CONFIG_FIELDS`: ``enabled``, ``default_action``, ``levels`` ...). A syntax error
    or a document nested deeper than `MAX_NESTING` is one `PolicyFileError` naming
    `source` (the file) and the line.
    """
    try:
        _check_nesting(text, source)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        what = "; ".join(str(x) for x in (exc.context, exc.problem) if x) or str(exc)
        raise PolicyFileError(f"{at}: not YAML or JSON: {what}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{source}: not YAML or JSON: {exc}") from None
    except RecursionError:  # a last resort: `_check_nesting` stops these first
        raise PolicyFileError(f"{source}: not a policy file: nested too deeply") from None
    config: dict[str, Any] | None = None
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and "policy_id" in data:
        items = [data]
    elif isinstance(data, dict):
        unknown = set(data) - {"policies", *CONFIG_FIELDS}
        if unknown:
            raise PolicyFileError(
                f"{source}: unknown top-level keys: {', '.join(sorted(map(str, unknown)))}"
            )
        items = data.get("policies") or []
        config = {k: data[k] for k in CONFIG_FIELDS if k in data} or None
    else:
        raise PolicyFileError(
            f"{source}: expected a policy, a list of policies or {{policies: [...]}}"
        )
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise PolicyFileError(f"{source}: policies must be a list of mappings")
    return items, config


def _check_nesting(text: str, source: str) -> None:
    line = too_deep(text, MAX_NESTING)
    if line is not None:
        raise PolicyFileError(
            f"{source}, line {line or '?'}: not a policy file: nested "
            f"too deeply (more than {MAX_NESTING} levels)"
        )


def read_policy_file(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """`parse_policy_file` of the file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"{path}: not YAML or JSON: not UTF-8 (byte {exc.start})") from None
    return parse_policy_file(text, str(path))


def pattern_problems(policy: SecurityPolicy) -> list[str]:
    """Every problem with a policy's patterns — the one place `validate_policies` checks
    them: syntax and program size (RE2), then their worst-case matching cost on a message
    of the policy's `max_message_size` (`cost_problems`, default budget)."""
    problems: list[str] = []
    for field in ("allowed_patterns", "blocked_patterns"):
        found = validate_patterns(getattr(policy, field))
        problems += [f"{field}: {p}" for p in found]
        if not found and getattr(policy, field):
            problems += [
                f"{field}: {p}"
                for p in cost_problems(getattr(policy, field), policy.max_message_size)
            ]
    return problems


def version_floor(state: dict[str, Any], ident: str, marks_key: str) -> int:
    """The version a change of `ident` must exceed: the one in force, or its removal."""
    in_force = state.get(ident)
    version = int(in_force.get("version") or 0) if isinstance(in_force, dict) else 0
    marks = state.get(marks_key)
    removed = int(marks.get(ident) or 0) if isinstance(marks, dict) else 0
    return max(version, removed)


def validate_policies(
    items: list[dict[str, Any]], current: dict[str, Any]
) -> tuple[list[SecurityPolicy], list[str], list[str]]:
    """(policies to publish, unchanged ids, problems). Versions: a policy without one gets
    the version in force (or of its removal) + 1; an explicit version must be newer."""
    problems: list[str] = []
    out: list[SecurityPolicy] = []
    unchanged: list[str] = []
    seen: set[str] = set()
    for n, item in enumerate(items, 1):
        label = f"policy #{n} ({str(item.get('policy_id', '?'))[:80]})"
        explicit = "version" in item
        if "signed_by" in item or "signature" in item:
            problems.append(f"{label}: signed_by/signature are set by the CLI, not the file")
            continue
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
        problems += [f"{label}: {p}" for p in pattern_problems(parsed)]
        in_force = current.get(parsed.policy_id)
        floor = version_floor(current, parsed.policy_id, REMOVED_KEY)
        if explicit:
            if parsed.version <= floor:
                problems.append(
                    f"{label}: version {parsed.version} is not newer than v{floor} in force"
                )
                continue
        else:
            if isinstance(in_force, dict) and _same(in_force, parsed):
                unchanged.append(parsed.policy_id)
                continue
            parsed = parsed.model_copy(update={"version": floor + 1})
        out.append(parsed)
    return out, unchanged, problems


_UNSIGNED = ("version", "signed_by", "signature")


def _same(in_force: dict[str, Any], policy: SecurityPolicy) -> bool:
    mine = {k: v for k, v in policy.model_dump(mode="json").items() if k not in _UNSIGNED}
    theirs = {k: v for k, v in in_force.items() if k not in _UNSIGNED}
    return orjson.dumps(mine, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        theirs, option=orjson.OPT_SORT_KEYS
    )


async def read_policies(
    settings: Settings, timeout_s: float = 30.0, *, admin: AdminKey | None = None
) -> dict[str, Any]:
    """The folded state of security.policies as it is on the broker now: what a worker
    trusting these settings' admin keys (and `admin`'s) holds, with the removal marks
    (`REMOVED_KEY`); `policy_view` strips them."""
    try:
        return await fold_topic(
            settings, SECURITY_POLICIES, trusted_keys(settings, admin), timeout_s=timeout_s
        )
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None


async def publish(
    settings: Settings, events: list[Event[Any]], topic: str = SECURITY_POLICIES
) -> None:
    """All events in one transaction (a reader sees the whole file applied, or nothing)."""
    from agentstream.streams.admin import ensure_topics

    await ensure_topics(settings)
    producer = new_producer(
        settings,
        "publishing rule changes",
        transactional_id=f"{SOURCE}-{uuid.uuid4().hex}",
        enable_idempotence=True,
        acks="all",
    )
    await producer.start()
    try:
        async with producer.transaction():
            for event in events:
                await producer.send(
                    settings.topic(topic),
                    key=event.key.encode(),
                    value=encode(event),
                    partition=0,
                )
    finally:
        await producer.stop()


def _config_update(current: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    base = {k: v for k, v in (current.get(CONFIG_KEY) or {}).items() if k not in _UNSIGNED}
    version = version_floor(current, CONFIG_KEY, "") + 1
    return {**base, **config, "version": version}


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Validate and show what would change; publish nothing."
)
def policy_apply(file: Path, dry_run: bool) -> None:
    """Validate FILE (YAML or JSON: one policy, a list, or {policies, and the security
    config's fields: enabled, default_action, levels, anonymous_levels, replay_window_s,
    rejected_redaction, trust_claimed_roles}) and publish its policies and config,
    signed; nothing is published if any is invalid. A config given in part keeps the
    rest of the one in force."""
    settings = get_settings()
    items, config = read_policy_file(file)
    admin = None if dry_run else load_admin_key(settings)
    # a dry run contacts no broker: the file is validated on its own, and the versions
    # (and which policies are unchanged) are decided against those in force at apply
    current = {} if admin is None else run(read_policies(settings, admin=admin))
    policies, unchanged, problems = validate_policies(items, current)
    new_config: SecurityConfig | None = None
    if config is not None:
        try:
            new_config = SecurityConfig.model_validate(_config_update(current, config))
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
    changes: list[SignedChange] = [*policies]
    if new_config is not None:
        changes.append(new_config)
    for p in policies:
        click.echo(f"{'valid' if dry_run else 'applying'} {p.policy_id}" + _version(p, dry_run))
    for pid in unchanged:
        click.echo(f"unchanged {pid}")
    if new_config is not None:
        click.echo(f"config{_version(new_config, dry_run)}: {config_summary(new_config)}")
        if new_config.trust_claimed_roles:
            click.echo(
                "warning: trust_claimed_roles is on: a message's claimed role is taken "
                "instead of its sender's granted roles (unsafe; for migrating producers)",
                err=True,
            )
    if dry_run:
        click.echo(
            f"{file}: {len(changes)} change(s) valid, nothing published (checked offline: "
            "versions and unchanged policies are decided against the broker at apply)"
        )
    if changes and admin is not None:
        run(publish(settings, [admin.event(c) for c in changes]))
        click.echo(
            f"published {len(changes)} event(s) to {settings.topic(SECURITY_POLICIES)}, "
            f"signed by {admin.key_id}"
        )


def config_summary(config: SecurityConfig) -> str:
    """One line of what a security config decides: the switch and the default, then
    every other field that differs from its default."""
    parts = [
        f"security {'enabled' if config.enabled else 'disabled'}",
        f"default {config.default_action}",
    ]
    defaults = SecurityConfig()
    for name in ("levels", "anonymous_levels", "replay_window_s", "rejected_redaction"):
        value = getattr(config, name)
        if value != getattr(defaults, name):
            shown = ",".join(value) if isinstance(value, list) else value
            parts.append(f"{name} {shown}")
    if config.trust_claimed_roles:
        parts.append("trust_claimed_roles UNSAFE")
    return ", ".join(parts)


def _version(change: SecurityPolicy | SecurityConfig, dry_run: bool) -> str:
    # offline the versions in force are unknown: the one computed here means nothing
    return "" if dry_run else f" v{change.version}"


@policy.command("list")
@json_option()
def policy_list(as_json: bool) -> None:
    """Show the signed policies and security config in force."""
    settings = get_settings()
    state = policy_view(run(read_policies(settings)))
    if as_json:
        sys.stdout.write(
            orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        )
        return
    if not trusted_keys(settings):
        click.echo("warning: no admin key is trusted (AGENTSTREAM_SECURITY_ADMIN_KEYS)", err=True)
    cfg = state.get(CONFIG_KEY)
    if cfg is None:
        click.echo(
            f"config: none published (settings: security "
            f"{'enabled' if settings.security_enabled else 'disabled'}, "
            f"default {settings.security_default_action})"
        )
    else:
        try:
            summary = config_summary(SecurityConfig.model_validate(cfg))
        except ValidationError:  # shown as the worker reads it: unreadable counts as deny
            summary = "unreadable (workers decide as enabled, default deny)"
        click.echo(f"config v{cfg.get('version')}: {summary}, signed by {cfg.get('signed_by')}")
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
            f"blocked={len(p.get('blocked_patterns') or [])} {flags} by={p.get('signed_by')}"
        )


@policy.command("remove")
@click.argument("policy_id", callback=non_empty)
def policy_remove(policy_id: str) -> None:
    """Remove a policy (publishes a signed security.policy_removed for POLICY_ID)."""
    settings = get_settings()
    admin = load_admin_key(settings)
    state = run(read_policies(settings, admin=admin))
    if policy_id.startswith("__") or policy_id not in state:
        raise PolicyFileError(f"no policy {policy_id!r} in force")
    version = version_floor(state, policy_id, REMOVED_KEY) + 1
    removal = SecurityPolicyRemoved(policy_id=policy_id, version=version)
    run(publish(settings, [admin.event(removal)]))
    click.echo(f"removed {policy_id} (v{version}, signed by {admin.key_id})")


# -- admin keys -----------------------------------------------------------------------------
@cli.group()
def admin() -> None:
    """Admin keys: the Ed25519 keys rule changes are signed with."""


@admin.command("keygen")
@click.option(
    "--id",
    "key_id",
    default=None,
    callback=non_empty,
    help="Key id (default AGENTSTREAM_SECURITY_ADMIN_KEY_ID).",
)
@click.option("--force", is_flag=True, help="Replace an existing key of that id.")
def admin_keygen(key_id: str | None, force: bool) -> None:
    """Generate an admin key into the keychain (`admin_key.<id>`) and print the line that
    makes workers trust it."""
    settings = get_settings()
    key_id = key_id or settings.security_admin_key_id
    if not key_id or "," in key_id or "=" in key_id or key_id != key_id.strip():
        raise click.UsageError("a key id must be non-empty, without ',', '=' or edge spaces")
    entry = ADMIN_ENTRY.format(key_id)
    provider = _provider(settings)
    existing = run(provider.get_secret(entry))
    if existing and not force:
        raise PolicyFileError(
            f"the keychain already holds {entry!r}; --force replaces it (changes it signed "
            "stay valid only while workers still trust its public key)"
        )
    key = new_private_key()
    run(provider.set_secret(entry, private_to_b64(key)))
    click.echo(f"stored {entry} in the keychain ({provider.backend_name})", err=True)
    click.echo("workers trust it with (append to the list if there are others):", err=True)
    click.echo(f"AGENTSTREAM_SECURITY_ADMIN_KEYS={key_id}={public_b64(key)}")


# -- identities -----------------------------------------------------------------------------
@cli.group()
def identity() -> None:
    """Agent identities (signed, on the compacted security.identities topic)."""


async def read_identities(
    settings: Settings,
    *,
    admin: AdminKey | None = None,
    records: list[tuple[Any, Checked]] | None = None,
) -> dict[str, Any]:
    """The folded state of security.identities (with revocation marks), as a worker with
    these settings holds it; `records` collects every record and its verdict."""
    try:
        return await fold_topic(
            settings,
            SECURITY_IDENTITIES,
            trusted_keys(settings, admin),
            on_record=None if records is None else lambda rec, c: records.append((rec, c)),
        )
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None


def _names(values: Sequence[str]) -> list[str]:
    return [v for v in (v.strip() for v in values) if v]


@identity.command("grant")
@click.argument("agent_id", callback=non_empty)
@click.option("--role", "roles", multiple=True, help="A role the agent may act in (repeatable).")
@click.option("--level", "levels", multiple=True, help="A level it may send at (none = all).")
@click.option(
    "--signing-key-id",
    "signing_key_ids",
    multiple=True,
    help="Keychain id of an HMAC key that may sign for it (none = its own id).",
)
@click.option(
    "--encryption-key-id",
    "encryption_key_ids",
    multiple=True,
    help="Keychain id of an AES key it may encrypt with.",
)
@click.option("--token-user", type=int, default=None, help="The user whose token authenticates it.")
@click.option("--description", default="", help="Free text.")
def identity_grant(
    agent_id: str,
    roles: tuple[str, ...],
    levels: tuple[str, ...],
    signing_key_ids: tuple[str, ...],
    encryption_key_ids: tuple[str, ...],
    token_user: int | None,
    description: str,
) -> None:
    """Grant AGENT_ID its roles, levels and keys (replaces its current grant)."""
    settings = get_settings()
    admin = load_admin_key(settings)
    state = run(read_identities(settings, admin=admin))
    version = version_floor(state, agent_id, REVOKED_KEY) + 1
    try:
        grant = AgentIdentity(
            agent_id=agent_id,
            version=version,
            description=description,
            roles=_names(roles),
            levels=_names(levels),
            signing_key_ids=_names(signing_key_ids),
            encryption_key_ids=_names(encryption_key_ids),
            token_user_id=token_user,
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise PolicyFileError(f"{loc}: {err['msg']}") from None
    run(publish(settings, [admin.event(grant)], SECURITY_IDENTITIES))
    click.echo(
        f"granted {agent_id} v{version}: roles={','.join(grant.roles) or '-'} "
        f"levels={','.join(grant.levels) or '*'} (signed by {admin.key_id})"
    )


@identity.command("revoke")
@click.argument("agent_id", callback=non_empty)
def identity_revoke(agent_id: str) -> None:
    """Revoke AGENT_ID's identity (its messages then come from an anonymous sender)."""
    settings = get_settings()
    admin = load_admin_key(settings)
    state = run(read_identities(settings, admin=admin))
    if agent_id.startswith("__") or agent_id not in state:
        raise PolicyFileError(f"no identity {agent_id!r} in force")
    version = version_floor(state, agent_id, REVOKED_KEY) + 1
    run(
        publish(
            settings,
            [admin.event(AgentIdentityRevoked(agent_id=agent_id, version=version))],
            SECURITY_IDENTITIES,
        )
    )
    click.echo(f"revoked {agent_id} (v{version}, signed by {admin.key_id})")


def _record_row(rec: Any, checked: Checked) -> dict[str, Any]:
    event = checked.event
    payload: dict[str, Any] = {}
    if event is not None and isinstance(event.payload, Payload):
        payload = event.payload.model_dump(mode="json")
        payload.pop("signature", None)
    return {
        "offset": rec.offset,
        "key": (rec.key or b"").decode("utf-8", "replace"),
        "type": event.type if event is not None else None,
        "signed_by": checked.signed_by,
        "applied": checked.apply,
        "reason": checked.refusal.text if checked.refusal is not None else None,
        "payload": payload,
    }


@identity.command("list")
@json_option()
def identity_list(as_json: bool) -> None:
    """The identities in force, and every record on security.identities with whether its
    signature verifies (and it applies)."""
    settings = get_settings()
    records: list[tuple[Any, Checked]] = []
    state = identity_view(run(read_identities(settings, records=records)))
    rows = [_record_row(rec, checked) for rec, checked in records]
    if as_json:
        doc = {"identities": state, "records": rows}
        sys.stdout.write(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        )
        return
    if not trusted_keys(settings):
        click.echo("warning: no admin key is trusted (AGENTSTREAM_SECURITY_ADMIN_KEYS)", err=True)
    if not state:
        click.echo("no identities in force")
    for agent_id, grant in sorted(state.items()):
        click.echo(
            f"{agent_id:24} v{grant.get('version')!s:<4} "
            f"roles={','.join(grant.get('roles') or []) or '-':16} "
            f"levels={','.join(grant.get('levels') or []) or '*':12} "
            f"keys={','.join(grant.get('signing_key_ids') or []) or agent_id} "
            f"token_user={grant.get('token_user_id')} signed_by={grant.get('signed_by')}"
        )
    if rows:
        click.echo("records:")
    for row in rows:
        verdict = "verified, applied" if row["applied"] else f"IGNORED ({row['reason']})"
        click.echo(f"  @{row['offset']:<6} {row['key'][:40]:24} {row['type'] or '?':28} {verdict}")

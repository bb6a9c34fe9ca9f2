"""`agentstream rebuild`, `agentstream checkpoints`, `agentstream audit verify|report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from agentstream.streams.cli import (
    NoAdminKey,
    check_time_range,
    cli,
    json_option,
    non_empty,
    output_file,
    run,
    term_safe,
    time_option,
    worker_call,
    worker_json,
    worker_url,
)
from agentstream.streams.cli.progress import (
    EXIT_LOST,
    incomplete,
    progress_option,
    run_with_progress,
    unreadable_reporter,
)
from agentstream.streams.replay import Progress
from agentstream.streams.settings import get_settings


@cli.command("rebuild")
@click.argument("table", required=False)
@click.option("--all", "all_tables", is_flag=True, help="Every registered table.")
@json_option()
@progress_option
def rebuild_cmd(table: str | None, all_tables: bool, as_json: bool, progress: bool | None) -> None:
    """Rebuild TABLE from its source topics and compare with the live table.

    Folds every retained source event through the table's own fold, prints the digest of
    the result and of the live table (read from its changelog topic), and exits 1 when
    they differ. A live table of a running worker may lag the sources by a few events.
    With --all, finding no changelog of the app id at all exits 2 (a wrong app id, or
    no worker has run).
    Exits 3 (when they are equal) if source records were deleted before they could be
    read, with a WARNING line each on stderr, or if records of a source or a changelog
    could not be parsed by the Kafka client (each named on stderr, and skipped).
    """
    from agentstream.agents.audit.rebuild import (
        Comparison,
        UnknownTable,
        compare_all,
        require_a_changelog,
        spec_for,
    )
    from agentstream.streams.tables import TABLES

    if not table and not all_tables:
        names = ", ".join(sorted(TABLES)) or "none"
        raise click.UsageError(f"name a TABLE or pass --all (tables: {names})")
    wanted = None if all_tables else [table or ""]
    try:
        for name in wanted or ():
            spec_for(name)  # an unknown name is said before anything is read or drawn
    except UnknownTable as exc:  # a usage mistake, as a misspelt command is (exit 2)
        raise click.BadParameter(str(exc), param_hint="'TABLE'") from None
    settings = get_settings()
    counter = Progress()

    async def compare() -> list[Comparison]:
        if all_tables:  # a wrong app id is said before every source topic is read
            await require_a_changelog(settings, TABLES)
        return await compare_all(
            settings, wanted, progress=counter, on_unreadable=unreadable_reporter("rebuild")
        )

    results = run_with_progress(
        compare(),
        counter,
        progress,
        desc="rebuild",
    )
    for c in results:
        if as_json:
            click.echo(json.dumps(c.to_dict()))
            continue
        click.echo(f"{c.table}: rebuilt {c.rebuilt_size} key(s), digest {c.rebuilt_digest}")
        pad = " " * len(c.table)
        if not c.live_available:
            click.echo(
                f"{pad}  no changelog topic {c.table!r}: no live table to compare with "
                "(not created yet, or state each worker folds for itself)"
            )
            continue
        click.echo(f"{pad}  live    {c.live_size} key(s), digest {c.live_digest}")
        verdict = "yes" if c.equal else "NO"
        click.echo(f"{' ' * len(c.table)}  equal to the live table: {verdict}")
        if c.differing_keys:
            keys = ", ".join(term_safe(k) for k in c.differing_keys)  # keys are input data
            click.echo(f"{' ' * len(c.table)}  differing keys: {keys}")
    missing = incomplete(counter)
    if not all(c.equal for c in results if c.live_available):
        sys.exit(1)
    if missing:
        sys.exit(EXIT_LOST)


@cli.command("checkpoints")
@click.option(
    "--since", callback=time_option, help="Only checkpoints after this time (ISO-8601 or -2h ...)."
)
@click.option("--worker", help="Only this worker's checkpoints.")
@click.option("--take", is_flag=True, help="Ask the worker at --url to write one now.")
@click.option(
    "--url",
    callback=worker_url,
    help="Worker web root for --take (default: this host's web port).",
)
@json_option(lines=True)
def checkpoints_cmd(
    since: str | None, worker: str | None, take: bool, url: str | None, as_json: bool
) -> None:
    """List checkpoints on pipeline.checkpoints, or (--take) have a worker write one."""
    settings = get_settings()
    if take:
        resp = worker_call("/checkpoints", method="POST", base=url, timeout=30)
        # something else than a worker on that port answered 200 too: not a checkpoint
        body = worker_json(resp, "checkpoint_id", "worker_id", "tables")
        # re-encoded rather than echoed: JSON may carry C1 and bidi controls unescaped
        click.echo(json.dumps(body))
        return
    from agentstream.agents.audit.checkpoints import list_checkpoints

    for _rec, cp in run(list_checkpoints(settings, since=since, worker=worker)):
        if as_json:
            click.echo(orjson.dumps(cp.model_dump(mode="json")).decode())
            continue
        tables = ", ".join(f"{n}={d[:12]}…({cp.sizes.get(n, 0)})" for n, d in cp.tables.items())
        # worker id, reason and table names are whatever the record says (any producer
        # to pipeline.checkpoints): printed as text only
        click.echo(
            term_safe(
                f"{cp.taken_at.isoformat(timespec='seconds')} {cp.worker_id} {cp.reason:9} "
                f"{cp.checkpoint_id[:12]} tables[{tables}] offsets{json.dumps(cp.offsets)}"
            )
        )


@cli.group("audit")
def audit() -> None:
    """Tamper evidence and activity reports."""


@audit.command("verify")
@click.option(
    "--since", callback=time_option, help="Start (ISO-8601, now, -2h ...); default: oldest record."
)
@click.option("--until", callback=time_option, default="now", show_default=True, help="End.")
@click.option("--topics", help="Comma-separated chained topics (default: all chained topics).")
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    metavar="ID=BASE64",
    help="Trust this chain key (repeatable). With pinned keys, only those are trusted.",
)
@click.option(
    "--trusted-keys",
    "trusted_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File of pinned chain keys, `id=base64` per line (or comma-separated).",
)
@click.option(
    "--require-signatures/--no-require-signatures",
    default=None,
    help="Report unsigned records in partitions with no signed record too. "
    "Default: on whenever a chain key is trusted.",
)
@json_option()
@progress_option
def verify_cmd(
    since: str | None,
    until: str,
    topics: str | None,
    trust_keys: tuple[str, ...],
    trusted_file: Path | None,
    require_signatures: bool | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Check the hash chains and their signatures; report altered, deleted, inserted,
    reordered, forged and unsigned records, and the signed policy versions that decided
    the messages.

    Chain keys are trusted when published on security.worker_keys with a valid admin
    signature (AGENTSTREAM_SECURITY_ADMIN_KEYS), unless keys are pinned with --trust-key
    or --trusted-keys. Exits 1 if anything was found, or if records of the range were
    deleted (retention, delete-records) before they could be checked.
    """
    from agentstream.agents.audit.verify import (
        CHAINED_TOPICS,
        policy_versions,
        resolve_trust,
        summary,
        verify,
    )
    from agentstream.streams.signing import SigningError, parse_public_keys

    check_time_range(since, until)
    settings = get_settings()
    spec = ",".join(trust_keys)
    if trusted_file is not None:
        try:  # utf-8-sig: a BOM (a Windows editor's) stayed in the first key's id
            spec += "," + trusted_file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(
                f"{trusted_file}: not UTF-8 text (byte {exc.start})", param_hint="--trusted-keys"
            ) from None
    try:
        pinned = parse_public_keys(spec)
    except SigningError as exc:
        raise click.BadParameter(str(exc), param_hint="--trust-key/--trusted-keys") from None
    names = [t for t in (topics or "").split(",") if t.strip()] or list(CHAINED_TOPICS)

    counter = Progress()

    async def _run() -> tuple[Any, Any, Any]:
        trust = await resolve_trust(settings, pinned)
        reports = await verify(
            settings,
            names,
            since,
            until,
            trust=trust,
            require_signatures=require_signatures,
            progress=counter,
        )
        return trust, reports, await policy_versions(settings, reports)

    trust, reports, policies = run_with_progress(_run(), counter, progress, desc="verify")
    result = summary(reports, trust=trust, require_signatures=require_signatures, policies=policies)
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_verify(reports, result, trust)
    if not result["ok"]:
        sys.exit(1)


#: findings printed per partition in the text report (--json has them all)
MAX_PRINTED = 200


def _print_verify(reports: Any, result: dict[str, Any], trust: Any) -> None:
    for rep in reports:
        states = [f"{len(rep.findings)} finding(s)"] if rep.findings else []
        if rep.lost:
            states.append(f"{sum(g.offsets for g in rep.lost)} offset(s) NOT CHECKED")
        state = ", ".join(states) or "ok"
        anchor = "" if rep.anchored or not rep.records else " (start not anchored: expired)"
        signed = f", {rep.signed} signed" if rep.signed else ""
        click.echo(f"{rep.topic}:{rep.partition}  {rep.records} record(s){signed}  {state}{anchor}")
        for g in rep.lost:
            where = f"offsets {g.first}-{g.stop - 1}" if g.offsets > 1 else f"offset {g.first}"
            click.echo(
                f"  {'LOST':9} {where}  deleted (retention or delete-records) after the "
                "walk planned its range and before it read them: not checked"
            )
        for f in rep.findings[:MAX_PRINTED]:
            click.echo(f"  {f.kind.upper():9} offset {f.offset}  {term_safe(f.detail)}")
        if len(rep.findings) > MAX_PRINTED:
            click.echo(f"  … and {len(rep.findings) - MAX_PRINTED} more (--json lists all)")
    c = result["counts"]
    lost = sum(g["stop"] - g["first"] for g in result["lost"])
    click.echo(
        f"{result['records']} record(s) in {result['partitions']} partition(s): "
        + ", ".join(f"{c[k]} {k}" for k in c)
        + (f"; {lost} offset(s) deleted before they could be checked" if lost else "")
    )
    keys = ", ".join(result["trusted_keys"]) or "none"
    required = "required" if result["require_signatures"] else "not required where none is"
    click.echo(f"trusted chain keys ({trust.source}): {keys}; signatures {required}")
    if trust.problem:
        click.echo(f"  {trust.problem}")
    rows = result["policy_versions"]
    if rows:
        click.echo("signed policy versions that decided the messages:")
        # ids and signers come from the records, which anyone who can write them chose
        rows = [
            {
                **r,
                "policy_id": term_safe(r["policy_id"]),
                "signed_by": term_safe(r["signed_by"] or "-"),
            }
            for r in rows
        ]
        width = max(len("policy"), *(len(r["policy_id"]) for r in rows))
        swidth = max(len("signed by"), *(len(r["signed_by"]) for r in rows))
        head = f"  {'policy':{width}}  version  {'signed by':{swidth}}  decisions"
        click.echo(f"{head}  on security.policies")
        for r in rows:
            if not r["on_topic"]:
                where = "no (compacted away by a newer version, or never published)"
            elif r["signature_valid"] is None:
                where = "yes (signature not checked: no admin key configured)"
            else:
                where = "yes" if r["signature_valid"] else "yes, but its signature does NOT verify"
            click.echo(
                f"  {r['policy_id']:{width}}  {r['version']:>7}  {r['signed_by']:{swidth}}"
                f"  {r['decisions']:>9}  {where}"
            )


@audit.group("worker-key")
def worker_key() -> None:
    """Chain keys: the public halves workers sign hash chains with, admin-signed on
    security.worker_keys."""


@worker_key.command("publish")
@click.option(
    "--key-id", callback=non_empty, help="Chain key id (default: AGENTSTREAM_CHAIN_KEY_ID)."
)
def worker_key_publish(key_id: str | None) -> None:
    """Publish this host's chain key (keychain entry chain_key.ID, created when missing),
    signed with the admin key admin_key.<AGENTSTREAM_SECURITY_ADMIN_KEY_ID> from the
    keychain."""
    settings = get_settings()
    kid, public, version = run(_publish_worker_key(settings, key_id or settings.chain_key_id))
    click.echo(f"published chain key {kid!r} v{version}: {kid}={public}")


@worker_key.command("revoke")
@click.argument("key_id", callback=non_empty)
def worker_key_revoke(key_id: str) -> None:
    """Revoke a published chain key: records it signed are reported as forged."""
    settings = get_settings()
    kid, _public, version = run(_publish_worker_key(settings, key_id, revoke=True))
    click.echo(f"revoked chain key {kid!r} (v{version})")


@worker_key.command("list")
@json_option(lines=True)
def worker_key_list(as_json: bool) -> None:
    """The chain keys in force on security.worker_keys, and the records ignored there."""
    from agentstream.streams.audit_chain import read_worker_keys

    published = run(read_worker_keys(get_settings()))
    if published.problem:
        click.echo(published.problem, err=True)
    for kid, raw in sorted(published.keys.items()):
        if as_json:
            click.echo(orjson.dumps({**raw, "signature": None}).decode())
            continue
        state = "REVOKED" if raw.get("revoked") else "active"
        click.echo(
            f"{kid}  v{raw.get('version')}  {state}  signed by {raw.get('signed_by')!r}  "
            f"{raw.get('public_key')}"
        )
    for offset, reason in published.ignored:
        click.echo(f"ignored record at offset {offset}: {reason}", err=True)


async def _publish_worker_key(
    settings: Any, key_id: str, *, revoke: bool = False
) -> tuple[str, str, int]:
    from agentstream.schemas import Event
    from agentstream.schemas.security import WorkerKeyPublished
    from agentstream.streams.audit_chain import load_chain_key, read_worker_keys
    from agentstream.streams.client import AsyncClient
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.errors import CredentialsError
    from agentstream.streams.signing import (
        ADMIN_ENTRY,
        SigningError,
        private_from_b64,
        sign_change,
    )
    from agentstream.streams.topics import SECURITY_WORKER_KEYS

    # Pipeline errors (the broker, a chain key that cannot be stored) reach `run`, which
    # ends the command with their class and message, exit 1, as every other command.
    try:
        provider = KeychainCredentialsProvider(settings)
    except CredentialsError as exc:
        raise NoAdminKey(f"no usable keychain for the admin key: {exc}") from None
    admin_id = settings.security_admin_key_id
    entry = ADMIN_ENTRY.format(admin_id)
    try:
        admin_b64 = await provider.get_secret(entry)
    except CredentialsError as exc:
        raise NoAdminKey(f"reading {entry} from the keychain failed: {exc}") from None
    if not admin_b64:
        raise NoAdminKey(
            f"no admin key {entry!r} in the keychain (AGENTSTREAM_SECURITY_ADMIN_KEY_ID="
            f"{admin_id}): chain keys are published signed with it; run this where the "
            "admin key is: nothing published"
        )
    try:
        admin = private_from_b64(admin_b64)
    except SigningError as exc:
        raise NoAdminKey(f"keychain entry {entry!r}: {exc}: nothing published") from None
    current = (await read_worker_keys(settings)).keys.get(key_id)
    if revoke:
        if current is None:
            raise click.ClickException(f"chain key {key_id!r} is not published")
        public = str(current.get("public_key") or "")
    else:
        signer, created = await load_chain_key(settings, key_id, provider=provider)
        public = signer.public_b64
        if created:
            click.echo(f"created chain key {key_id!r} in {provider.write_target}", err=True)
    version = int(current.get("version") or 0) + 1 if current is not None else 1
    body = WorkerKeyPublished(
        key_id=key_id, public_key=public, version=version, revoked=revoke
    ).model_dump(mode="json")
    signed = sign_change(WorkerKeyPublished.TYPE, body, admin, admin_id)
    event = Event.of(WorkerKeyPublished.model_validate(signed), source="agentstream-cli")
    async with AsyncClient(settings, source="agentstream-cli") as client:
        await client.publish(SECURITY_WORKER_KEYS, event)
    return key_id, public, version


@audit.command("report")
@click.option(
    "--since", callback=time_option, help="Start (ISO-8601, now, -2h ...); default: oldest record."
)
@click.option("--until", callback=time_option, default="now", show_default=True, help="End.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=output_file,
    help="Output file (default: stdout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "json"]),
    default=None,
    help="Default: from --out's suffix, else html.",
)
@progress_option
def report_cmd(
    since: str | None,
    until: str,
    out_path: Path | None,
    fmt: str | None,
    progress: bool | None,
) -> None:
    """Per-agent activity: messages sent/accepted/rejected (with reasons), LLM calls and
    tokens by provider and model, status changes, communication records by kind.

    Exits 3 if records of the range were deleted before they could be read (a WARNING
    line each on stderr), or could not be parsed by the Kafka client (a line each on
    stderr as they are met): the report is written without them, and says so."""
    from agentstream.agents.audit.report import build_report, render_html

    check_time_range(since, until)
    if fmt is None:
        fmt = "json" if out_path is not None and out_path.suffix == ".json" else "html"
    counter = Progress()
    data: dict[str, Any] = run_with_progress(
        build_report(
            get_settings(),
            since,
            until,
            progress=counter,
            on_unreadable=unreadable_reporter("audit report"),
        ),
        counter,
        progress,
        desc="report",
    )
    body = json.dumps(data, indent=2, sort_keys=True) + "\n" if fmt == "json" else render_html(data)
    if out_path is None:
        sys.stdout.write(body)
    else:
        out_path.write_text(body, encoding="utf-8")
        click.echo(f"wrote {fmt} report to {out_path}", err=True)
    if incomplete(counter):
        sys.exit(EXIT_LOST)

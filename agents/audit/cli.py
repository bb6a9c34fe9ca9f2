"""`agentstream rebuild`, `agentstream checkpoints`, `agentstream audit verify|report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from streams.cli import cli, run, worker_call
from streams.settings import get_settings


@cli.command("rebuild")
@click.argument("table", required=False)
@click.option("--all", "all_tables", is_flag=True, help="Every registered table.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rebuild_cmd(table: str | None, all_tables: bool, as_json: bool) -> None:
    """Rebuild TABLE from its source topics and compare with the live table.

    Folds every retained source event through the table's own fold, prints the digest of
    the result and of the live table (read from its changelog topic), and exits 1 when
    they differ. A live table of a running worker may lag the sources by a few events.
    """
    from agents.audit.rebuild import UnknownTable, compare_all
    from streams.tables import TABLES

    if not table and not all_tables:
        names = ", ".join(sorted(TABLES)) or "none"
        raise click.UsageError(f"name a TABLE or pass --all (tables: {names})")
    try:
        results = run(compare_all(get_settings(), None if all_tables else [table or ""]))
    except UnknownTable as exc:
        raise click.ClickException(str(exc)) from exc
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
            click.echo(f"{' ' * len(c.table)}  differing keys: {', '.join(c.differing_keys)}")
    if not all(c.equal for c in results if c.live_available):
        sys.exit(1)


@cli.command("checkpoints")
@click.option("--since", help="Only checkpoints after this time (ISO-8601 or -2h ...).")
@click.option("--worker", help="Only this worker's checkpoints.")
@click.option("--take", is_flag=True, help="Ask the worker at --url to write one now.")
@click.option("--url", help="Worker web root for --take (default: this host's web port).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
def checkpoints_cmd(
    since: str | None, worker: str | None, take: bool, url: str | None, as_json: bool
) -> None:
    """List checkpoints on pipeline.checkpoints, or (--take) have a worker write one."""
    settings = get_settings()
    if take:
        resp = worker_call("/checkpoints", method="POST", base=url, timeout=30)
        click.echo(resp.text)
        return
    from agents.audit.checkpoints import list_checkpoints

    for _rec, cp in run(list_checkpoints(settings, since=since, worker=worker)):
        if as_json:
            click.echo(orjson.dumps(cp.model_dump(mode="json")).decode())
            continue
        tables = ", ".join(f"{n}={d[:12]}…({cp.sizes.get(n, 0)})" for n, d in cp.tables.items())
        click.echo(
            f"{cp.taken_at.isoformat(timespec='seconds')} {cp.worker_id} {cp.reason:9} "
            f"{cp.checkpoint_id[:12]} tables[{tables}] offsets{json.dumps(cp.offsets)}"
        )


@cli.group("audit")
def audit() -> None:
    """Tamper evidence and activity reports."""


@audit.command("verify")
@click.option("--since", help="Start (ISO-8601, now, -2h ...); default: oldest record.")
@click.option("--until", default="now", show_default=True, help="End.")
@click.option("--topics", help="Comma-separated chained topics (default: all chained topics).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def verify_cmd(since: str | None, until: str, topics: str | None, as_json: bool) -> None:
    """Check the hash chains; report altered, deleted, inserted and reordered records.

    Exits 1 if anything was found.
    """
    from agents.audit.verify import CHAINED_TOPICS, summary, verify

    names = [t for t in (topics or "").split(",") if t.strip()] or list(CHAINED_TOPICS)
    reports = run(verify(get_settings(), names, since, until))
    result = summary(reports)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for rep in reports:
            state = "ok" if not rep.findings else f"{len(rep.findings)} finding(s)"
            anchor = "" if rep.anchored or not rep.records else " (start not anchored: expired)"
            click.echo(f"{rep.topic}:{rep.partition}  {rep.records} record(s)  {state}{anchor}")
            for f in rep.findings:
                click.echo(f"  {f.kind.upper():9} offset {f.offset}  {f.detail}")
        c = result["counts"]
        click.echo(
            f"{result['records']} record(s) in {result['partitions']} partition(s): "
            f"{c['altered']} altered, {c['deleted']} deleted, {c['inserted']} inserted, "
            f"{c['reordered']} reordered"
        )
    if not result["ok"]:
        sys.exit(1)


@audit.command("report")
@click.option("--since", help="Start (ISO-8601, now, -2h ...); default: oldest record.")
@click.option("--until", default="now", show_default=True, help="End.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file (default: stdout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "json"]),
    default=None,
    help="Default: from --out's suffix, else html.",
)
def report_cmd(since: str | None, until: str, out_path: Path | None, fmt: str | None) -> None:
    """Per-agent activity: messages sent/accepted/rejected (with reasons), LLM calls and
    tokens by provider and model, status changes, communication records by kind."""
    from agents.audit.report import build_report, render_html

    if fmt is None:
        fmt = "json" if out_path is not None and out_path.suffix == ".json" else "html"
    data: dict[str, Any] = run(build_report(get_settings(), since, until))
    body = json.dumps(data, indent=2, sort_keys=True) + "\n" if fmt == "json" else render_html(data)
    if out_path is None:
        sys.stdout.write(body)
    else:
        out_path.write_text(body, encoding="utf-8")
        click.echo(f"wrote {fmt} report to {out_path}", err=True)

"""`agentstream comms --agent A --kind K --since -1h --until now`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from agentstream.schemas.comms import COMM_KINDS
from agentstream.streams.cli import (
    check_time_range,
    cli,
    json_option,
    reading_answer,
    term_safe,
    time_option,
    worker_call,
    worker_json,
)


@cli.command("comms")
@click.option("--agent", help="Only this agent's records.")
@click.option("--kind", type=click.Choice(list(COMM_KINDS)), help="Only this kind.")
@click.option(
    "--since",
    callback=time_option,
    help="Start: -15m, -2h, ISO-8601, epoch ms (default: retention).",
)
@click.option("--until", callback=time_option, help="End (exclusive), same formats (default: now).")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=1000),
    default=1000,
    show_default=True,
    help="Newest N records.",
)
@json_option()
def comms(
    agent: str | None,
    kind: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Communication records by agent, kind and time range (from a running worker)."""
    check_time_range(since, until)  # before a worker is asked, as `replay` does
    params = {
        k: v
        for k, v in {
            "agent": agent,
            "kind": kind,
            "since": since,
            "until": until,
            "limit": str(limit),
        }.items()
        if v
    }
    resp = worker_call("/comms", params=params)  # a bad filter: HTTP 400 with its reason
    data = worker_json(resp, "records", "counts")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    lines = []
    with reading_answer(resp):  # every line made before any is printed
        for r in data["records"]:
            when = datetime.fromtimestamp(r["recorded_at"], UTC).isoformat(timespec="milliseconds")
            amount = (
                ""
                if r["amount"] is None
                else f" {r['amount']:g}{(' ' + r['unit']) if r['unit'] else ''}"
            )
            # ids, counterparties and units are the senders': shown, never acted on
            lines.append(
                term_safe(
                    f"{when} {r['agent_id']:24} {r['kind']:13} {r['record_id']}"
                    f"{(' -> ' + r['counterparty']) if r['counterparty'] else ''}{amount}"
                )
            )
        for a, by_kind in sorted(data["counts"].items()):
            lines.append(
                term_safe(f"{a}: " + ", ".join(f"{k}={n}" for k, n in sorted(by_kind.items())))
            )
    for line in lines:
        click.echo(line)

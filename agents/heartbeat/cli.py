"""`agentstream agents status [ID]`: agent status from a running worker's web view."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import click

from agentstream.streams.cli import (
    cli,
    json_option,
    reading_answer,
    term_safe,
    worker_call,
    worker_json,
)


def _ago(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.1f}s ago"


@cli.group("agents", invoke_without_command=False)
def agents_group() -> None:
    """Agents known to the pipeline (heartbeat monitor)."""


@agents_group.command("status")
@click.argument("agent_id", required=False)
@click.option("--state", type=click.Choice(["up", "down"]), help="Only agents in this state.")
@json_option()
def agents_status(agent_id: str | None, state: str | None, as_json: bool) -> None:
    """Show the status of AGENT_ID, or of every agent."""
    if agent_id:
        resp = worker_call(f"/agents/status/{quote(agent_id, safe='')}", allow=(404,))
        if resp.status_code == 404:
            raise click.ClickException(f"unknown agent {agent_id!r}")
        data: Any = worker_json(resp, "agent_id", "status")
        rows = [data]
    else:
        resp = worker_call("/agents/status", params={"state": state} if state else None)
        data = worker_json(resp, "agents", "counts")
        rows = data["agents"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    lines = []
    with reading_answer(resp):  # every line made before any is printed
        for r in rows:
            lines.append(  # an agent id is its sender's: shown, never acted on
                term_safe(
                    f"{r['agent_id']:32} {r['status'] or 'unknown':8} last heartbeat "
                    f"{_ago(r['last_heartbeat_at']):>14}  missed {r['missed_beats']}  "
                    f"beats {r['beats']}"
                )
            )
        if not agent_id:
            c = data["counts"]
            lines.append(
                f"{c['up']} up, {c['down']} down"
                + ("" if data.get("deciding") else " (catching up)")
            )
    for line in lines:
        click.echo(line)

"""`agentstream top`: the operator console's numbers in a terminal, refreshing live.

It reads the same stream as the page (``GET /ui/api/stream``, the worker's snapshots as
server-sent events: `streams.console`), with the CLI's token (secret ``web.token``), and
redraws on every frame. The screen is drawn with rich, whose Live display redraws in
place over SSH without a curses terminal database.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import click

from agentstream.streams.cli import (
    CLI_AUTH_HINT,
    cli,
    cli_token,
    json_option,
    term_safe,
    web_root,
    worker_url,
)
from agentstream.streams.settings import get_settings

#: seconds without a frame after which the stream is taken for dead (frames come every
#: few seconds, a keep-alive comment every 15)
READ_TIMEOUT_S = 30.0


def frames(url: str, headers: dict[str, str], timeout: float) -> Iterator[dict[str, Any]]:
    """The snapshots of the stream at `url`, as they come; every failure is one
    `click.ClickException` line (no worker, a refused token, a stream that stops)."""
    import httpx
    import orjson

    from agentstream.streams.web_auth import client_verify

    try:
        # a worker is reached directly: HTTP_PROXY from the environment would route
        # loopback and cluster-internal addresses through a proxy
        with (
            httpx.Client(
                trust_env=False,
                timeout=httpx.Timeout(timeout, read=READ_TIMEOUT_S),
                verify=client_verify(get_settings()),
            ) as http,
            http.stream("GET", url, headers=headers) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise click.ClickException(_refusal(url, resp, bool(headers)))
            kind = resp.headers.get("content-type", "no content type").split(";")[0]
            if kind != "text/event-stream":
                # a web server of something else on that port: its page is no stream
                # (it was read to its end, then "the worker closed the stream")
                raise click.ClickException(
                    f"{url}: not an agentstream worker's answer (not a stream but {kind})"
                )
            event, data = "message", []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line:
                    if event == "snapshot" and data:
                        try:
                            doc = orjson.loads("\n".join(data))
                        except orjson.JSONDecodeError:
                            doc = None
                        if not isinstance(doc, dict):
                            raise click.ClickException(
                                f"{url}: not an agentstream worker's answer (a snapshot "
                                "that is no JSON object)"
                            )
                        yield doc
                    elif event == "end":
                        raise click.ClickException(f"{url}: the worker ended the stream: {data}")
                    event, data = "message", []
    except httpx.TimeoutException as exc:
        raise click.ClickException(f"the worker at {url} did not answer in time: {exc}") from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no worker answering at {url}: {exc}") from exc
    raise click.ClickException(f"{url}: the worker closed the stream")


def _refusal(url: str, resp: Any, sent: bool) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    reason = ""
    if isinstance(body, dict):
        reason = ": ".join(str(x) for x in (body.get("error"), body.get("reason")) if x)
    if resp.status_code == 401:
        why = "the CLI's token (secret web.token) was refused" if sent else "no CLI token"
        return f"{url}: HTTP 401: {term_safe(reason)}; {why}: {CLI_AUTH_HINT}"
    if resp.status_code == 404:
        return f"{url}: HTTP 404: this worker serves no console (AGENTSTREAM_AGENTS lacks health)"
    return f"{url}: HTTP {resp.status_code}: {term_safe(reason or resp.text[:200])}"


# -- drawing ---------------------------------------------------------------------------------
def _n(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def render(doc: dict[str, Any]) -> Any:
    """One screen of `doc` (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    class SafeTable(Table):
        """Cells come from events senders wrote (agent ids, model names): each is plain
        text, control characters visible (`term_safe`), never rich markup."""

        def add_row(self, *cells: Any, **kw: Any) -> None:
            super().add_row(*(Text(term_safe(c)) if isinstance(c, str) else c for c in cells), **kw)

    def text(line: str, style: str = "") -> Text:
        return Text(term_safe(line), style=style)

    def table(title: str, *cols: str) -> Table:
        t = SafeTable(title=title, title_justify="left", expand=False, pad_edge=False)
        for c in cols:
            t.add_column(c)
        return t

    a, m, dl, llm, p = (
        doc["agents"],
        doc["messages"],
        doc["dead_letters"],
        doc["llm"],
        doc["pipeline"],
    )
    head = Text.assemble(
        ("agentstream top", "bold"),
        term_safe(f"  {doc['at']}  served by {doc['served_by']}  workers {len(doc['workers'])}"),
        ("  PARTIAL" if doc["partial"] else "", "bold yellow"),
    )
    lines = [
        head,
        text(
            f"agents  up {_n(a['counts'].get('up'))}  down {_n(a['counts'].get('down'))}"
            f"  detection delay {_n(a['detection_delay_s'])} s"
        ),
        text(
            f"messages  accepted/s {_n(m['accepted_per_s'])}  rejected/s "
            f"{_n(m['rejected_per_s'])}  dead-lettered/s {_n(m['dead_lettered_per_s'])}"
            f"  accepted {m['accepted_total']}  rejected {m['rejected_total']}"
        ),
        text(
            "top rejection rules  "
            + (", ".join(f"{r} {n}" for r, n in m["top_rules"][:5]) or "-")
            + "   policies  "
            + (", ".join(f"{r} {n}" for r, n in m["top_policies"][:5]) or "-")
        ),
        text(
            f"dead letters  seen {dl['seen']}  by reason "
            + (", ".join(f"{k} {v}" for k, v in list(dl["by_reason"].items())[:4]) or "-")
        ),
        text(f"llm  in flight {_n(llm['in_flight'])}"),
    ]
    down = [x for x in a["list"] if x["status"] == "down"]
    changes = table("agent status changes", "at", "agent", "change", "reason")
    for t in a["timeline"][:5]:
        changes.add_row(
            str(t["changed_at"]),
            str(t["agent_id"]),
            f"{t['previous'] or 'new'}→{t['current']}",
            str(t["reason"]),
        )
    lat = table("llm latency (s)", "provider", "p50", "p90", "p99", "n", "breaker", "failures")
    for name in sorted(set(llm["latency"]) | set(llm["breakers"])):
        q = llm["latency"].get(name, {})
        b = llm["breakers"].get(name, {})
        lat.add_row(
            name,
            _n(q.get("p50")),
            _n(q.get("p90")),
            _n(q.get("p99")),
            _n(q.get("count")),
            _n(b.get("state")),
            _n(b.get("failures")),
        )
    tokens = table("tokens by provider/model", "model", "requests", "total tokens")
    for name, u in sorted(llm["usage"].get("model", {}).items()):
        tokens.add_row(name, _n(u.get("requests")), _n(u.get("total_tokens")))
    stages = table("throughput /s", "stage", "in/s")
    for name, v in p["throughput"].items():
        stages.add_row(name, _n(v))
    lag_by_topic: dict[str, int] = {}
    for r in p["lag"]:
        lag_by_topic[r["topic"]] = lag_by_topic.get(r["topic"], 0) + int(r["lag"])
    lags = table("consumer lag", "topic", "records behind")
    for topic, n in sorted(lag_by_topic.items(), key=lambda x: -x[1])[:8]:
        lags.add_row(topic, str(n))
    health = table("workers", "worker", "status", "not ok", "checkpoint age (s)")
    ages = {c["worker_id"]: c["age_s"] for c in p["checkpoints"]}
    for url, h in p["health"].items():
        bad = [f"{k}: {c['status']}" for k, c in h["components"].items() if c["status"] != "ok"]
        health.add_row(
            url, _n(h["status"]), ", ".join(bad) or "-", _n(ages.get(h.get("worker_id")))
        )
    pols = doc["policies"]
    lines.append(
        text(
            f"policies  {len(pols['policies'])} in force, default {_n(pols['default_action'])}: "
            + (", ".join(f"{x['policy_id']} v{x['version']}" for x in pols["policies"]) or "-")
        )
    )
    if down:
        lines.append(text("down: " + ", ".join(str(x["agent_id"]) for x in down), style="red"))
    for k, v in doc["problems"].items():
        lines.append(text(f"! {k}: {v}", style="yellow"))
    return Group(*lines, changes, lat, tokens, stages, lags, health)


@cli.command("top")
@click.option(
    "--url",
    callback=worker_url,
    help="The worker's web root (default: this host's, from AGENTSTREAM_WEB_HOST/PORT).",
)
@click.option("--once", is_flag=True, help="Print one screen (once rates are measured) and exit.")
@json_option(lines=True)
def top_cmd(url: str | None, once: bool, as_json: bool) -> None:
    """Live console in the terminal: agents, messages, dead letters, LLM, pipeline,
    policies — the same numbers as the worker's page at /ui/, for the whole cluster.
    Ctrl-C quits."""
    import orjson
    from rich.console import Console
    from rich.live import Live

    stream = (url or web_root()).rstrip("/") + "/ui/api/stream"
    token, _ = cli_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out = Console()
    try:
        if as_json or once:
            for doc in frames(stream, headers, 10):
                if once and not doc.get("rates_measured"):
                    continue  # a hub's first frame: no rate measured yet
                if as_json:
                    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
                    sys.stdout.flush()
                else:
                    out.print(render(doc))
                if once:
                    return
            return
        shown = frames(stream, headers, 10)
        first = next(shown)
        with Live(render(first), console=out, screen=True, auto_refresh=False) as live:
            for doc in shown:
                live.update(render(doc), refresh=True)
    except KeyboardInterrupt:
        pass

"""`agentstream audit report`: per-agent activity over a time range, as JSON or as one
self-contained HTML page with inline SVG charts (no scripts, no CDN, no network).

Per agent: messages sent / accepted / rejected (with the rejection reasons), LLM calls by
status, tokens by provider and model, status changes, and communication records by kind.

Counts are deduplicated (`dedup_key`): under at-least-once a crash can repeat outputs, so
an output counts once — by what the pipeline sets, never by ids a sender chose alone (a
sender reusing one event id for every message would make them one message, its
rejections hidden among "duplicates").

What the read could not count is in the report too (`ReportBuilder.lost`,
`ReportBuilder.unreadable`): offsets deleted before they could be read, and records the
Kafka client cannot parse (`streams.record_batches`), which are skipped. The command
exits 3 on either: the report is written, and incomplete.
"""

from __future__ import annotations

import hashlib
import html
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from agentstream.schemas import Event
from agentstream.streams.replay import Gap, Progress, parse_time, replay
from agentstream.streams.settings import Settings
from agentstream.streams.topics import (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    AGENT_STATUS,
    CATALOGUE,
    COMMS_RECORDS,
    LLM_RESPONSES,
    PIPELINE_DEADLETTER,
)

REPORT_TOPICS: tuple[str, ...] = (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    LLM_RESPONSES,
    AGENT_STATUS,
    COMMS_RECORDS,
    PIPELINE_DEADLETTER,
)


#: records a producer writes: each is one input, whatever ids it carries
INPUT_TOPICS = frozenset({AGENT_MESSAGES})
#: records with an event id the pipeline derives from their input's coordinates (a
#: forwarded message: `agents.security.agent.forwarded_id`; a dead letter)
DERIVED_ID_TOPICS = frozenset(
    {AGENT_MESSAGES_ACCEPTED, AGENT_MESSAGES_REJECTED, PIPELINE_DEADLETTER}
)
#: an output's seal (`streams.audit_chain`): where the chain stood when it was written, not
#: what it says — a copy of one output written again is sealed anew
SEAL_FIELDS = frozenset({"prev_hash", "hash", "signed_by", "signature"})


def dedup_key(topic: str, event: Event[Any], partition: int, offset: int) -> tuple[Any, ...]:
    """What makes two records of `topic` one for the report.

    * an input (`agent.messages`): its coordinates — a record is one message however
      its sender filled its ids; the same record read again is the same coordinates;
    * a forwarded message, a dead letter: its event id, derived from the coordinates of
      the input it was made from, so the input decided again after a crash gives the
      same id (forwarded messages written before their ids were derived carry the
      input's event id: counted as before);
    * a communication record: what the comms table stores it under (agent, kind, time,
      record id), so the report counts what the table and `/comms` count;
    * another output (an LLM response, a status change): what the worker wrote in it,
      its seal aside (`output_digest`), with the input it was caused by. A copy of one
      output — read twice, or written again with a new event id — says the same; two
      outputs never do, whatever ids their inputs' senders reused: a status change
      carries the worker's time of the change (`changed_at`), a response the worker's
      measure of its call (latency, attempts, usage, the answer). The causation id and
      the request or agent id are not enough: the requester or heartbeat sender chooses
      them, and one reusing a heartbeat's event id would have its later "up" changes
      merged into its first (its flapping hidden), one reusing a request's event id and
      request id its later calls. Nor is the event id: it is new on each copy.
    """
    if topic in INPUT_TOPICS:
        return (topic, partition, offset)
    if topic in DERIVED_ID_TOPICS:
        return (topic, str(event.event_id))
    p = event.payload
    if topic == COMMS_RECORDS:
        return (topic, p.agent_id, p.kind, p.recorded_at.timestamp(), p.record_id)
    return (topic, event.causation_id or "", output_digest(event))


def output_digest(event: Event[Any]) -> bytes:
    """A digest of `event`'s payload as its worker wrote it, without its seal
    (`SEAL_FIELDS`): the same for every copy of one output. Kept instead of the payload,
    whose answer text can be long, for every output the report reads."""
    try:
        content = event.payload.model_dump(mode="json", exclude=SEAL_FIELDS)
        return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).digest()
    except (TypeError, ValueError):
        # a free-form field nested deeper than pydantic and orjson write (they read
        # more): the fields' repr, the same for every copy of the output
        payload = event.payload
        fields = {k: getattr(payload, k) for k in type(payload).model_fields}
        kept = {k: v for k, v in fields.items() if k not in SEAL_FIELDS}
        return hashlib.sha256(repr(kept).encode("utf-8", "backslashreplace")).digest()


@dataclass
class AgentActivity:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    rejection_reasons: Counter[str] = field(default_factory=Counter)
    llm_calls: Counter[str] = field(default_factory=Counter)  # by status
    tokens: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    status_changes: list[dict[str, Any]] = field(default_factory=list)
    comms: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": {
                "sent": self.sent,
                "accepted": self.accepted,
                "rejected": self.rejected,
                "rejection_reasons": dict(self.rejection_reasons.most_common()),
            },
            "llm": {
                "calls": sum(self.llm_calls.values()),
                "by_status": dict(sorted(self.llm_calls.items())),
                "tokens": [
                    {"provider": p, "model": m, **dict(c)}
                    for (p, m), c in sorted(self.tokens.items())
                ],
            },
            "status_changes": self.status_changes,
            "comms": dict(sorted(self.comms.items())),
        }


class ReportBuilder:
    """Folds events (topic catalogue name, event) into the report; pure, no Kafka."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentActivity] = defaultdict(AgentActivity)
        self.dead_letters: Counter[str] = Counter()
        self.duplicates = 0
        self.events = 0
        #: events of a type their topic does not carry (a producer may write any type to
        #: any topic): not counted, as `rebuild` does not fold them
        self.off_topic = 0
        self._seen: set[tuple[Any, ...]] = set()
        #: offsets of the range deleted before the read reached them: not counted
        self.lost: list[Gap] = []
        #: the records the Kafka client could not parse (`Unreadable.describe`, with
        #: topic and partition): skipped, not counted
        self.unreadable: list[str] = []

    def add(self, topic: str, event: Event[Any], partition: int, offset: int) -> None:
        """Fold the event read at `partition`/`offset` of `topic` (a catalogue name)."""
        spec = CATALOGUE.get(topic)
        if spec is not None and event.type not in spec.events:
            self.off_topic += 1
            return
        key = dedup_key(topic, event, partition, offset)
        if key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(key)
        self.events += 1
        p = event.payload
        if topic == AGENT_MESSAGES:
            self.agents[p.sender_id].sent += 1
        elif topic == AGENT_MESSAGES_ACCEPTED:
            self.agents[p.sender_id].accepted += 1
        elif topic == AGENT_MESSAGES_REJECTED:
            a = self.agents[p.sender_id]
            a.rejected += 1
            reasons = p.metadata.get("rejection_reasons") if isinstance(p.metadata, dict) else None
            for reason in reasons or ["(no reason recorded)"]:
                a.rejection_reasons[str(reason)] += 1
        elif topic == LLM_RESPONSES:
            a = self.agents[p.agent_id or "(unknown agent)"]
            a.llm_calls[p.status] += 1
            tokens = a.tokens.setdefault((p.provider or "?", p.model or "?"), Counter())
            tokens["calls"] += 1
            if p.usage is not None:
                tokens["prompt_tokens"] += p.usage.prompt_tokens
                tokens["completion_tokens"] += p.usage.completion_tokens
                tokens["total_tokens"] += p.usage.total_tokens
        elif topic == AGENT_STATUS:
            self.agents[p.agent_id].status_changes.append(
                {
                    "at": p.changed_at.isoformat(),
                    "from": p.previous,
                    "to": p.current,
                    "reason": p.reason,
                }
            )
        elif topic == COMMS_RECORDS:
            self.agents[p.agent_id].comms[p.kind] += 1
        elif topic == PIPELINE_DEADLETTER:
            self.dead_letters[p.consumer] += 1

    def result(self, since: datetime | None, until: datetime | None) -> dict[str, Any]:
        agents = {name: a.to_dict() for name, a in sorted(self.agents.items())}
        tokens: dict[tuple[str, str], Counter[str]] = {}
        for a in self.agents.values():
            for pm, c in a.tokens.items():
                tokens.setdefault(pm, Counter()).update(c)
        comms: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for a in self.agents.values():
            comms.update(a.comms)
            reasons.update(a.rejection_reasons)
        return {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "generated_at": datetime.now(UTC).isoformat(),
            "events": self.events,
            "duplicates_ignored": self.duplicates,
            # what the counts below lack: the report is incomplete when either is not empty
            "lost": [g.to_dict() for g in self.lost],
            "lost_offsets": sum(g.offsets for g in self.lost),
            "unreadable_records": len(self.unreadable),
            "unreadable": list(self.unreadable),
            "off_topic_records": self.off_topic,
            "totals": {
                "agents": len(agents),
                "sent": sum(a.sent for a in self.agents.values()),
                "accepted": sum(a.accepted for a in self.agents.values()),
                "rejected": sum(a.rejected for a in self.agents.values()),
                "llm_calls": sum(sum(a.llm_calls.values()) for a in self.agents.values()),
                "status_changes": sum(len(a.status_changes) for a in self.agents.values()),
                "comms": dict(sorted(comms.items())),
                "rejection_reasons": dict(reasons.most_common()),
                "dead_letters": dict(sorted(self.dead_letters.items())),
            },
            "tokens": [
                {"provider": p, "model": m, **dict(c)} for (p, m), c in sorted(tokens.items())
            ],
            "agents": agents,
        }


async def build_report(
    settings: Settings,
    since: Any = None,
    until: Any = "now",
    *,
    progress: Progress | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The report of [since, until); `progress` counts the offsets of the replay. The
    offsets deleted before they could be read and the records the Kafka client cannot
    parse are listed in the report (module docstring); each of the latter is described
    to `on_unreadable` too, as the read meets it."""
    start = parse_time(since) if since is not None else None
    end = parse_time(until) if until is not None else None
    builder = ReportBuilder()
    counter = progress if progress is not None else Progress()
    lost_before = len(counter.lost)

    def skipped(text: str) -> None:
        builder.unreadable.append(text)
        if on_unreadable is not None:
            on_unreadable(text)

    base = {settings.topic(t): t for t in REPORT_TOPICS}
    async for rec in replay(
        settings,
        list(REPORT_TOPICS),
        start,
        end,
        include_invalid=False,
        progress=counter,
        on_unreadable=skipped,
    ):
        ev = rec.event_or_none()
        if ev is not None:
            builder.add(base[rec.topic], ev, rec.partition, rec.offset)
    builder.lost = counter.lost[lost_before:]
    return builder.result(start, end)


# -- HTML ------------------------------------------------------------------------------
PALETTE = ("#2f6fdf", "#2e9e5b", "#d9534f", "#f0ad4e", "#7b5ea7", "#17a2b8", "#8c6d31")


def bar_chart(
    chart_id: str,
    title: str,
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    *,
    width: int = 720,
) -> str:
    """Horizontal bars, one group per row label, one bar per series; every bar carries
    data-label/data-series/data-value so that tests (and people with a DOM inspector) can
    read the numbers back."""
    if not rows:
        return (
            f'<figure class="chart" id="{chart_id}"><figcaption>{html.escape(title)}'
            '</figcaption><p class="empty">No data in this range.</p></figure>'
        )
    series = list(dict.fromkeys(name for _, bars in rows for name, _ in bars))
    bar_h, gap, label_w, pad = 16, 10, 180, 8
    group_h = bar_h * len(series) + gap
    plot_w = width - label_w - 70
    top = 26
    height = top + group_h * len(rows) + pad
    vmax = max((v for _, bars in rows for _, v in bars), default=0) or 1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" data-chart="{chart_id}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{html.escape(title)}</title>",
    ]
    for i, name in enumerate(series):  # legend
        x = label_w + i * 130
        out.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{PALETTE[i % 7]}"/>'
            f'<text x="{x + 16}" y="16" class="legend">{html.escape(name)}</text>'
        )
    for r, (label, bars) in enumerate(rows):
        y0 = top + r * group_h
        out.append(
            f'<text x="{label_w - 6}" y="{y0 + group_h / 2}" text-anchor="end" '
            f'class="label">{html.escape(label[:28])}</text>'
        )
        values = dict(bars)
        for s, name in enumerate(series):
            v = values.get(name, 0)
            w = plot_w * v / vmax
            y = y0 + s * bar_h
            out.append(
                f'<rect class="bar" x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                f'fill="{PALETTE[s % 7]}" data-label="{html.escape(label)}" '
                f'data-series="{html.escape(name)}" data-value="{v:g}">'
                f"<title>{html.escape(label)} — {html.escape(name)}: {v:g}</title></rect>"
                f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 4}" class="value">{v:g}</text>'
            )
    out.append("</svg>")
    return (
        f'<figure class="chart" id="{chart_id}"><figcaption>{html.escape(title)}'
        f"</figcaption>{''.join(out)}</figure>"
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1000px;color:#1d2733;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#dde3ea;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6b7c}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #dde3ea;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}table{border-collapse:collapse;margin:6px 0 12px}
td,th{border:1px solid #dde3ea;padding:3px 8px;text-align:left}th{background:#f4f7fa}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:10px 0}
figcaption{font-weight:600;margin-bottom:4px}svg text{font-size:12px;fill:#1d2733}
svg .value{fill:#5b6b7c}.empty{color:#8795a4;font-style:italic}
.incomplete{border:1px solid #d9534f;border-radius:8px;background:#fdf1f0;padding:4px 14px;
margin:14px 0}.incomplete h2{border:0;margin:8px 0 4px;color:#a12b27}
"""

#: records of what the report lacks listed in the HTML (the JSON lists all)
MAX_LISTED = 200


def _token_rows(rows: Any) -> list[tuple[Any, ...]]:
    """Token usage rows (provider, model, calls, prompt, completion, total) for a table."""
    return [
        (
            r["provider"],
            r["model"],
            r.get("calls", 0),
            r.get("prompt_tokens", 0),
            r.get("completion_tokens", 0),
            r.get("total_tokens", 0),
        )
        for r in rows
    ]


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{v:,}</td>'
            if isinstance(v, int | float) and not isinstance(v, bool)
            else f"<td>{html.escape(str(v))}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    if not body:
        return '<p class="empty">None.</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(data: dict[str, Any]) -> str:
    """What the counts lack, above them: deleted offsets and records the Kafka client
    cannot parse ("" when nothing is missing)."""
    lost, unreadable = data.get("lost", []), data.get("unreadable", [])
    if not lost and not unreadable:
        return ""
    said = []
    if lost:
        said.append(
            f"{data['lost_offsets']:,} offset(s) deleted (retention or delete-records) "
            "before they could be read"
        )
    if unreadable:
        said.append(
            f"{data['unreadable_records']:,} record(s) the Kafka client cannot parse, skipped"
        )
    rows = [Gap(**g).describe() for g in lost]
    rows += [f"{text} (the Kafka client cannot parse it)" for text in unreadable]
    items = "".join(f"<li>{html.escape(r)}</li>" for r in rows[:MAX_LISTED])
    more = (
        f"<li>… and {len(rows) - MAX_LISTED:,} more (the JSON report lists all)</li>"
        if len(rows) > MAX_LISTED
        else ""
    )
    return (
        '<section class="incomplete" id="missing"><h2>Missing from this report</h2>'
        f"<p>Records of this range are not counted here: {html.escape('; '.join(said))}.</p>"
        f"<ul>{items}{more}</ul></section>"
    )


def render_html(data: dict[str, Any]) -> str:
    t = data["totals"]
    agents: dict[str, Any] = data["agents"]
    msg_rows = [
        (
            name,
            [
                ("sent", a["messages"]["sent"]),
                ("accepted", a["messages"]["accepted"]),
                ("rejected", a["messages"]["rejected"]),
            ],
        )
        for name, a in agents.items()
        if any(a["messages"][k] for k in ("sent", "accepted", "rejected"))
    ]
    token_rows = [
        (
            f"{r['provider']} / {r['model']}",
            [("prompt", r.get("prompt_tokens", 0)), ("completion", r.get("completion_tokens", 0))],
        )
        for r in data["tokens"]
    ]
    comms_rows = [(name, sorted(a["comms"].items())) for name, a in agents.items() if a["comms"]]
    reason_rows = [(reason, [("rejections", n)]) for reason, n in t["rejection_reasons"].items()]
    cards = "".join(
        f'<div class="card">{html.escape(label)}<b>{value:,}</b></div>'
        for label, value in (
            ("agents", t["agents"]),
            ("messages sent", t["sent"]),
            ("accepted", t["accepted"]),
            ("rejected", t["rejected"]),
            ("LLM calls", t["llm_calls"]),
            ("status changes", t["status_changes"]),
            ("comms records", sum(t["comms"].values())),
            ("dead letters", sum(t["dead_letters"].values())),
        )
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>agentstream audit report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Audit report</h1>",
        f'<p class="meta">From {html.escape(str(data["since"] or "the oldest record"))} to '
        f"{html.escape(str(data['until']))} · {data['events']:,} events"
        f" · {data['duplicates_ignored']:,} duplicate deliveries ignored"
        f" · generated {html.escape(data['generated_at'])}</p>",
        _missing(data),
        f'<div class="cards">{cards}</div>',
        "<h2>Messages</h2>",
        bar_chart("messages", "Messages per agent: sent, accepted, rejected", msg_rows),
        bar_chart("rejections", "Rejection reasons", reason_rows),
        "<h2>LLM usage</h2>",
        bar_chart("tokens", "Tokens by provider and model", token_rows),
        _table(
            ["provider", "model", "calls", "prompt tokens", "completion tokens", "total"],
            _token_rows(data["tokens"]),
        ),
        "<h2>Communication records</h2>",
        bar_chart("comms", "Communication records by kind, per agent", comms_rows),
        "<h2>Per agent</h2>",
    ]
    for name, a in agents.items():
        m, llm = a["messages"], a["llm"]
        parts.append(
            f'<section class="agent" data-agent="{html.escape(name)}"><h3>{html.escape(name)}</h3>'
        )
        parts.append(
            _table(
                ["sent", "accepted", "rejected", "LLM calls"],
                [(m["sent"], m["accepted"], m["rejected"], llm["calls"])],
            )
        )
        if m["rejection_reasons"]:
            parts.append(_table(["rejection reason", "count"], m["rejection_reasons"].items()))
        if llm["tokens"]:
            parts.append(
                _table(
                    ["provider", "model", "calls", "prompt", "completion", "total"],
                    _token_rows(llm["tokens"]),
                )
            )
        if llm["by_status"]:
            parts.append(_table(["LLM call status", "count"], llm["by_status"].items()))
        if a["status_changes"]:
            parts.append(
                _table(
                    ["at", "from", "to", "reason"],
                    [
                        (s["at"], s["from"] or "—", s["to"], s["reason"])
                        for s in a["status_changes"]
                    ],
                )
            )
        if a["comms"]:
            parts.append(_table(["communication kind", "records"], a["comms"].items()))
        parts.append("</section>")
    if t["dead_letters"]:
        parts.append("<h2>Dead letters</h2>")
        parts.append(_table(["consumer", "dead letters"], t["dead_letters"].items()))
    parts.append("</body></html>\n")
    return "\n".join(parts)

"""The operator console's data: one JSON document (the *snapshot*) built from what the
cluster-wide JSON views answer, every worker's counters, and the tails of a few topics.

Pure functions, no I/O: the worker's sampler (`agents.health.console`) gathers the inputs
once per interval and calls `build`; the page (`/ui/`) and `agentstream top` both show
the document it returns, so they always show the same numbers.

Inputs
------
``workers``   every worker's own share (``GET /ui/api/worker?local=1``): Prometheus
              counters of this process, LLM latency histograms, requests in flight,
              consumer lag and health components — gathered by `streams.web_cluster`.
``views``     the aggregate views' answers, each for the whole cluster: ``/agents/status``,
              ``/security/decisions/``, ``/llm/breakers``, ``/llm/usage``,
              ``/security/policies/`` (path → ``(HTTP status, body)``).
``tail``      decoded events read from the ends of ``agent.status``,
              ``security.decisions``, ``pipeline.deadletter``, ``llm.breaker`` and
              ``pipeline.checkpoints`` (every partition: cluster-wide by nature).
``history``   earlier `Sample`s of the counters: rates per second are differences of
              cumulative counters over `RATE_WINDOW_S`, per worker (a worker that
              restarted counts from zero again, so a counter that went down counts its
              new value), summed over the workers.

Scopes
------
`build` makes the admin document (policy patterns included, and decision reasons as
they are). `for_read` turns it into what a read token sees: no patterns, and no reason
that quotes one (a ``blocked_patterns`` reason names the patterns that matched; a broken
policy's error quotes its pattern). Message content is never part of either: decisions
carry ids, verdicts, rules and reasons only; dead letters carry their original bytes
with every secret value redacted (`streams.redaction.redact_raw`), which is what a dead
letter is for.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agentstream.streams.redaction import redact_raw

VERSION = 1
#: seconds between two snapshots of a worker (and so between two frames of every client)
INTERVAL_S = 2.0
#: rates are measured over this much history (several intervals: smoother than one)
RATE_WINDOW_S = 10.0
#: latency percentiles are computed over the histogram's growth in this window, or over
#: everything when nothing new came in it
LATENCY_WINDOW_S = 60.0
#: how many items of each list a snapshot carries
MAX_TIMELINE = 200
MAX_DECISIONS = 50
MAX_DEAD_LETTERS = 50
MAX_BREAKER_TRANSITIONS = 20
MAX_TOP = 8
#: characters of a dead letter's original bytes shown in a snapshot (the browser asks
#: for the rest)
DEAD_LETTER_PREVIEW = 2048
#: bytes of a dead letter's original bytes (redacted) the console keeps: the most its
#: search shows. The whole bytes of the last 1,000 dead letters came to a gigabyte.
KEPT_ORIGINAL_BYTES = 65536
#: the key under which a kept dead letter's payload holds them (`kept_dead_letter`)
KEPT = "original_kept"
#: what a read token sees instead of a reason that quotes a policy's pattern
HIDDEN_REASON = "a blocked pattern matched (which one: scope admin)"
HIDDEN_BROKEN = "a policy's pattern does not compile (its error quotes it: scope admin)"
PATTERN_FIELDS = ("allowed_patterns", "blocked_patterns")
#: the views the sampler asks (the snapshot's sections say which did not answer)
VIEWS = (
    "/agents/status",
    "/security/decisions/",
    "/llm/breakers",
    "/llm/usage",
    "/security/policies/",
)

# -- probes: what agents add to a worker's own share -----------------------------------------
Probe = Callable[[], Any]
#: name → function returning JSON-able data, included in ``/ui/api/worker`` (e.g. the
#: LLM stage's requests in flight). Kept in `streams` so that agents register without
#: importing each other (as `streams.health.CHECKS`).
PROBES: dict[str, Probe] = {}
#: the policy patterns in force on this worker ({policy_id: {field: [patterns]}}), set by
#: the security agent; only admin snapshots carry them
PATTERNS: list[Probe] = []


def register_probe(name: str, probe: Probe) -> None:
    PROBES[name] = probe


def register_patterns(probe: Probe) -> None:
    PATTERNS[:] = [probe]


def run_probes() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, probe in sorted(PROBES.items()):
        try:
            out[name] = probe()
        except Exception as exc:  # a failing probe is reported, never a failing view
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# -- Prometheus counters of this process -------------------------------------------------------
#: metric (without ``_total``) → the label its values are keyed by ("|" joins several)
COUNTERS = {
    "agentstream_security_decisions": ("verdict",),
    "agentstream_dead_letters": ("topic", "error_class"),
    "agentstream_events_in": ("consumer",),
    "agentstream_events_out": ("topic",),
    "agentstream_llm_calls": ("provider", "status"),
}
LATENCY_METRIC = "agentstream_llm_latency_seconds"
#: the sample names `read_counters` reads
COUNTER_SAMPLES = frozenset(
    [f"{name}_total" for name in COUNTERS]
    + [f"{LATENCY_METRIC}{suffix}" for suffix in ("_bucket", "_count", "_sum")]
)


def read_registry(registry: Any) -> dict[str, Any]:
    """`read_counters` of a prometheus-client registry, collecting only the metrics it
    reads: a whole registry's ``collect()`` also runs the collectors that build their
    samples from tables at that moment (the latest value of every metric series,
    `agents.metrics.agent.SeriesCollector`, scans the metrics table), which the console,
    sampling every `INTERVAL_S`, never shows."""
    return read_counters(registry.restricted_registry(COUNTER_SAMPLES).collect())


def read_counters(families: Iterable[Any]) -> dict[str, Any]:
    """The counters and the LLM latency histogram of a prometheus-client registry's
    ``collect()`` as plain JSON: ``{"counters": {metric: {"a|b": n}}, "latency":
    {provider: {"le": [...], "counts": [...cumulative], "count", "sum"}}}``."""
    counters: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
    latency: dict[str, dict[str, Any]] = {}
    for fam in families:
        if fam.name in COUNTERS:
            labels = COUNTERS[fam.name]
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = "|".join(str(s.labels.get(x, "")) for x in labels)
                    counters[fam.name][key] = counters[fam.name].get(key, 0) + float(s.value)
        elif fam.name == LATENCY_METRIC:
            for s in fam.samples:
                h = latency.setdefault(
                    s.labels.get("provider", ""), {"le": [], "counts": [], "count": 0, "sum": 0.0}
                )
                if s.name.endswith("_bucket"):
                    h["le"].append(s.labels["le"])
                    h["counts"].append(float(s.value))
                elif s.name.endswith("_count"):
                    h["count"] = float(s.value)
                elif s.name.endswith("_sum"):
                    h["sum"] = float(s.value)
    return {"counters": counters, "latency": latency}


# -- rates --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """The cumulative counters of every worker at one moment (`at`: seconds, any epoch)."""

    at: float
    #: worker URL → its ``counters`` (`read_counters`)
    counters: dict[str, dict[str, dict[str, float]]]
    #: worker URL → its LLM latency histograms
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)


def _delta(new: float, old: float | None) -> float:
    """How much a cumulative counter grew; one that went down was reset by a restart,
    so all of its new value is growth."""
    if old is None:
        return 0.0
    return new if new < old else new - old


def counter_growth(
    history: Sequence[Sample], metric: str, window_s: float = RATE_WINDOW_S
) -> tuple[dict[str, float], float]:
    """Per key of `metric`: how much it grew, summed over the workers, between the
    oldest sample within `window_s` of the newest and the newest; and the seconds
    between them (0: fewer than two samples)."""
    if len(history) < 2:
        return {}, 0.0
    newest = history[-1]
    oldest = next(s for s in history if newest.at - s.at <= window_s + 1e-9)
    if oldest is newest:
        oldest = history[-2]
    grown: dict[str, float] = {}
    for url, counters in newest.counters.items():
        before = oldest.counters.get(url)
        for key, value in counters.get(metric, {}).items():
            # a worker absent from the older sample joined since: its growth is unknown
            old = None if before is None else before.get(metric, {}).get(key, 0.0)
            grown[key] = grown.get(key, 0.0) + _delta(value, old)
    return grown, newest.at - oldest.at


def rates(
    history: Sequence[Sample],
    metric: str,
    key: Callable[[str], str | None] = lambda k: k,
    window_s: float = RATE_WINDOW_S,
) -> dict[str, float]:
    """Per second of `metric`, its keys grouped by `key` (None: left out)."""
    grown, seconds = counter_growth(history, metric, window_s)
    out: dict[str, float] = {}
    if seconds <= 0:
        return out
    for k, v in grown.items():
        group = key(k)
        if group is not None:
            out[group] = out.get(group, 0.0) + v / seconds
    return {k: round(v, 3) for k, v in sorted(out.items())}


def totals(history: Sequence[Sample], metric: str) -> dict[str, float]:
    """The newest sample's cumulative counters of `metric`, summed over the workers."""
    out: dict[str, float] = {}
    if not history:
        return out
    for counters in history[-1].counters.values():
        for k, v in counters.get(metric, {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


# -- latency percentiles --------------------------------------------------------------------
def _le(value: str) -> float:
    return math.inf if value in ("+Inf", "inf", "Inf") else float(value)


def quantile(q: float, le: Sequence[str], counts: Sequence[float]) -> float | None:
    """The `q` quantile of a histogram with cumulative bucket `counts` at upper bounds
    `le`, interpolated linearly inside its bucket (as Prometheus' histogram_quantile);
    the highest finite bound when it falls in the +Inf bucket; None without data."""
    bounds = [_le(x) for x in le]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            inside = count - prev_count
            share = 1.0 if inside <= 0 else (rank - prev_count) / inside
            return prev_bound + (bound - prev_bound) * share
        prev_bound, prev_count = bound, count
    return prev_bound


def latency(history: Sequence[Sample], window_s: float = LATENCY_WINDOW_S) -> dict[str, Any]:
    """Per provider: p50, p90, p99 (seconds) and how many requests they cover, over the
    histogram's growth within `window_s` ("window": "recent"), or over everything the
    workers counted when nothing was measured in it ("window": "all")."""
    if not history:
        return {}
    newest = history[-1]
    oldest = next((s for s in history if newest.at - s.at <= window_s + 1e-9), newest)

    def summed(
        sample: Sample, *, minus: Sample | None = None
    ) -> dict[str, tuple[list[str], list[float]]]:
        out: dict[str, tuple[list[str], list[float]]] = {}
        for url, by_provider in sample.latency.items():
            for provider, h in by_provider.items():
                counts = list(h.get("counts", []))
                if minus is not None:
                    before = minus.latency.get(url, {}).get(provider)
                    if before is not None and len(before["counts"]) == len(counts):
                        base = list(before["counts"])
                        if counts and counts[-1] >= base[-1]:  # not reset since
                            counts = [a - b for a, b in zip(counts, base, strict=True)]
                le, acc = out.setdefault(provider, (list(h.get("le", [])), [0.0] * len(counts)))
                if len(acc) == len(counts):
                    out[provider] = (le, [a + b for a, b in zip(acc, counts, strict=True)])
        return out

    recent = summed(newest, minus=oldest if oldest is not newest else None)
    everything = summed(newest)
    result: dict[str, Any] = {}
    for provider, (le, counts) in sorted(everything.items()):
        window = "all"
        r_le, r_counts = recent.get(provider, (le, counts))
        if oldest is not newest and r_counts and r_counts[-1] > 0:
            le, counts, window = r_le, r_counts, "recent"
        result[provider] = {
            "p50": _round(quantile(0.5, le, counts)),
            "p90": _round(quantile(0.9, le, counts)),
            "p99": _round(quantile(0.99, le, counts)),
            "count": int(counts[-1]) if counts else 0,
            "window": window,
        }
    return result


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# -- the topic tails ----------------------------------------------------------------------------
@dataclass
class Tail:
    """Decoded events from the ends of the console's topics, oldest first: each item is
    ``{"at": epoch seconds, "partition", "offset", "payload": {...}}`` (the payload as
    JSON), except dead letters, which keep the event's ``payload`` too."""

    status: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    breakers: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    #: dead letters read since the tail started (the list keeps only the last ones)
    dead_letters_seen: int = 0


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(value: Any) -> Any:
    """A time the views give as epoch seconds, as ISO-8601 (anything else as it is)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return _iso(float(value))
    return value


def _strip(topic: str, prefix: str) -> str:
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


def timeline(tail: Tail, limit: int = MAX_TIMELINE) -> list[dict[str, Any]]:
    """Agent status changes, newest first."""
    out = []
    for item in reversed(tail.status[-limit:]):
        p = item["payload"]
        out.append(
            {
                "agent_id": p.get("agent_id"),
                "previous": p.get("previous"),
                "current": p.get("current"),
                "reason": p.get("reason"),
                "changed_at": p.get("changed_at") or _iso(item["at"]),
            }
        )
    return out


def recent_decisions(tail: Tail, limit: int = MAX_DECISIONS) -> list[dict[str, Any]]:
    """The newest decisions, newest first: who, verdict, rules, reasons, policies —
    never the message's content (a decision does not carry it)."""
    out = []
    for item in reversed(tail.decisions[-limit:]):
        p = item["payload"]
        out.append(
            {
                "at": p.get("evaluated_at") or _iso(item["at"]),
                "message_id": p.get("message_id"),
                "sender_id": p.get("sender_id"),
                "recipient_id": p.get("recipient_id"),
                "verdict": p.get("verdict"),
                "rules": list(p.get("rules") or []),
                "reasons": list(p.get("reasons") or []),
                "policies": dict(p.get("policies") or {}),
                "default_applied": bool(p.get("default_applied")),
            }
        )
    return out


def top_rejections(
    counts: Mapping[str, Any], tail: Tail, limit: int = MAX_TOP
) -> tuple[list[list[Any]], list[list[Any]]]:
    """The rules that denied most (all time: the decisions view's ``deny`` counts) and
    the policies that denied most (among the decisions in the tail: a count per policy
    is not kept anywhere else)."""
    deny = counts.get("deny") or {}
    rules = sorted(((r, int(n)) for r, n in deny.items() if r != "*"), key=lambda x: (-x[1], x[0]))
    by_policy: dict[str, int] = {}
    for item in tail.decisions:
        p = item["payload"]
        if p.get("verdict") != "deny":
            continue
        named = list((p.get("policies") or {}).keys()) or (
            ["(no policy)"] if p.get("default_applied") else []
        )
        for pid in named:
            by_policy[pid] = by_policy.get(pid, 0) + 1
    policies = sorted(by_policy.items(), key=lambda x: (-x[1], x[0]))
    return [list(x) for x in rules[:limit]], [list(x) for x in policies[:limit]]


def replay_command(dl: Mapping[str, Any], at_ms: int) -> str:
    """The `agentstream replay` command that prints a dead letter's original record
    (with its coordinates): its topic (full name, taken literally), the millisecond of
    its timestamp."""
    ts = dl.get("timestamp_ms")
    ms = int(ts) if isinstance(ts, int) and ts > 0 else at_ms
    return (
        f"agentstream replay --topics {shlex.quote(str(dl.get('topic', '')))} "
        f"--since {ms} --until {ms + 1} --meta"
    )


#: a dead letter's original bytes as the console keeps them: at most
#: `KEPT_ORIGINAL_BYTES` of them, redacted (None: not base64), their size after redaction,
#: and whether the bound cut them
Kept = tuple[bytes | None, int, bool]


def keep_original(original_b64: str, limit: int | None = KEPT_ORIGINAL_BYTES) -> Kept:
    """A dead letter's original bytes, every secret value redacted (the whole bytes, then
    cut: redaction reads the JSON they are), at most `limit` of them, cut between
    characters."""
    try:
        raw = base64.b64decode(original_b64, validate=True)
    except (binascii.Error, ValueError):
        return None, 0, False
    kept = redact_raw(raw)
    if limit is None or len(kept) <= limit:
        return kept, len(kept), False
    end = limit
    while end > 0 and kept[end] & 0xC0 == 0x80:
        end -= 1  # not inside a character's UTF-8 sequence
    return kept[:end], len(kept), True


def kept_dead_letter(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter's payload as the console's tail keeps it: its original bytes as
    `keep_original` keeps them (under `KEPT`), no base64 of them nor of the key."""
    out = {k: v for k, v in payload.items() if k not in ("original_b64", "key_b64")}
    out[KEPT] = keep_original(str(payload.get("original_b64", "")))
    return out


def original_text(original_b64: str, limit: int | None = None) -> tuple[str, int, bool]:
    """A dead letter's original bytes, every secret value redacted, as text (bytes that
    are not UTF-8 as ``\\xNN``); their size after redaction, and whether `limit`
    characters cut it."""
    return _text(keep_original(original_b64, None), limit)


def _text(kept: Kept, limit: int | None) -> tuple[str, int, bool]:
    data, size, cut = kept
    if data is None:
        return "(not base64)", 0, False
    text = data.decode("utf-8", errors="backslashreplace")
    if limit is not None and len(text) > limit:
        return text[:limit], size, True
    return text, size, cut


def dead_letter(item: Mapping[str, Any], prefix: str, preview: int | None) -> dict[str, Any]:
    """One dead letter as the console shows it (its payload as the tail keeps it,
    `kept_dead_letter`, or as it came)."""
    p = item["payload"]
    kept = p.get(KEPT)
    text, size, cut = _text(
        kept if kept is not None else keep_original(str(p.get("original_b64", ""))), preview
    )
    at_ms = int(item["at"] * 1000)
    topic = str(p.get("topic", ""))
    return {
        "id": f"{item['partition']}:{item['offset']}",
        "at": _iso(item["at"]),
        "at_ms": at_ms,
        "reason": p.get("error_class"),
        "message": p.get("error_message"),
        "topic": _strip(topic, prefix),
        "partition": p.get("partition"),
        "offset": p.get("offset"),
        "consumer": p.get("consumer"),
        "original": text,
        "original_size": size,
        "original_truncated": bool(p.get("original_truncated")) or cut,
        "replay": replay_command(p, at_ms),
    }


def dead_letters(
    tail: Tail,
    prefix: str,
    *,
    reason: str | None = None,
    topic: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int = MAX_DEAD_LETTERS,
    preview: int | None = DEAD_LETTER_PREVIEW,
) -> list[dict[str, Any]]:
    """The tail's dead letters that match, newest first."""
    out = []
    for item in reversed(tail.dead_letters):
        p = item["payload"]
        at_ms = int(item["at"] * 1000)
        if reason and p.get("error_class") != reason:
            continue
        if topic and _strip(str(p.get("topic", "")), prefix) != topic:
            continue
        if since_ms is not None and at_ms < since_ms:
            continue
        if until_ms is not None and at_ms >= until_ms:
            continue
        out.append(dead_letter(item, prefix, preview))
        if len(out) >= limit:
            break
    return out


def _tally(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def breaker_transitions(tail: Tail) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in reversed(tail.breakers):
        p = item["payload"]
        rows = out.setdefault(str(p.get("provider")), [])
        if len(rows) < MAX_BREAKER_TRANSITIONS:
            rows.append(
                {
                    "at": p.get("changed_at") or _iso(item["at"]),
                    "previous": p.get("previous"),
                    "current": p.get("current"),
                    "failures": p.get("failures"),
                    "reason": p.get("reason"),
                }
            )
    return out


def checkpoint_ages(tail: Tail, now: float) -> list[dict[str, Any]]:
    """Per worker: its last checkpoint and how old it is."""
    last: dict[str, dict[str, Any]] = {}
    for item in tail.checkpoints:
        p = item["payload"]
        last[str(p.get("worker_id"))] = {**p, "_at": item["at"]}
    out = []
    for worker_id, p in sorted(last.items()):
        taken = _parse_iso(p.get("taken_at")) or p["_at"]
        out.append(
            {
                "worker_id": worker_id,
                "taken_at": _iso(taken),
                "age_s": round(max(0.0, now - taken), 1),
                "reason": p.get("reason"),
                "tables": len(p.get("tables") or {}),
            }
        )
    return out


def _parse_iso(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- the document ---------------------------------------------------------------------------
def partial_reasons(body: Mapping[str, Any]) -> list[str]:
    """Why an aggregate view's answer is partial (`streams.web_cluster.Gathered.meta`)."""
    out = [f"{m.get('worker')}: {m.get('error')}" for m in body.get("missing") or ()]
    out += [f"{url}: restoring its tables" for url in body.get("restoring") or ()]
    if body.get("unowned_partitions"):
        out.append(f"partitions {body['unowned_partitions']} owned by no worker")
    if body.get("unheld_partitions"):
        out.append(str(body.get("error") or f"unheld partitions {body['unheld_partitions']}"))
    return out


def _view(views: Mapping[str, tuple[int, Any]], path: str, problems: dict[str, str]) -> Any:
    status, body = views.get(path, (0, None))
    if status == 200 and isinstance(body, dict):
        if body.get("partial"):
            problems[path] = "partial: " + ("; ".join(partial_reasons(body)) or "?")
        return body
    if status == 0:
        problems[path] = "not asked"
    elif isinstance(body, dict) and (body.get("error") or body.get("reason")):
        problems[path] = f"HTTP {status}: {body.get('error')} {body.get('reason') or ''}".strip()
    else:
        problems[path] = f"HTTP {status}"
    return {}


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v
    )


def share_problem(body: Any) -> str | None:
    """What is wrong with a worker's share of the console (`/ui/api/worker`), None when it
    has the shape `build` and the rates read: one peer's bad answer must not stop every
    frame (it is reported under the frame's problems instead)."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    lag = body.get("lag") or {}
    if not isinstance(lag, dict):
        return "lag is not an object"
    for tp, n in lag.items():
        part = tp.rpartition(":")[2]
        if not (part.isascii() and part.isdigit()) or not _numbers([n]):
            return f"lag {tp!r}: not topic:partition → number"
    for name in ("probes", "components", "counters", "latency"):
        if not isinstance(body.get(name) or {}, dict):
            return f"{name} is not an object"
    if not isinstance((body.get("probes") or {}).get("llm") or {}, dict):
        return "probes.llm is not an object"
    for metric, by_key in (body.get("counters") or {}).items():
        if not isinstance(by_key, dict) or not _numbers(list(by_key.values())):
            return f"counters {metric!r}: not key → number"
    for provider, h in (body.get("latency") or {}).items():
        if not isinstance(h, dict) or not _numbers(h.get("counts", [])):
            return f"latency {provider!r}: no histogram"
        le = h.get("le", [])
        if not isinstance(le, list) or len(le) != len(h.get("counts", [])):
            return f"latency {provider!r}: no histogram"
        try:
            [_le(x) for x in le]
        except (TypeError, ValueError):
            return f"latency {provider!r}: a bound is not a number"
    return None


def usable_shares(
    answers: Iterable[Sequence[Any]], problems: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The answers of `share_problem`'s shape; the others noted in `problems` (under
    ``worker URL``)."""
    out = []
    for url, body in answers:
        why = share_problem(body)
        if why is None:
            out.append((str(url), body))
        elif problems is not None:
            problems[f"worker {url}"] = f"malformed answer: {why}"
    return out


def _stage(consumer: str) -> str:
    return consumer or "?"


def build(
    *,
    now: float,
    self_url: str,
    prefix: str,
    workers: Mapping[str, Any],
    views: Mapping[str, tuple[int, Any]],
    tail: Tail,
    history: Sequence[Sample],
    patterns: Mapping[str, Mapping[str, Any]] | None = None,
    interval_s: float = INTERVAL_S,
) -> dict[str, Any]:
    """The admin snapshot (see the module doc); `for_read` makes the read one.

    `workers` is `web_cluster.Gathered`'s shape: ``{"answers": [[url, body], ...],
    "missing": [...], "not_serving": [...]}``; `history` ends with this moment's sample.
    """
    problems: dict[str, str] = {}
    answers = usable_shares(workers.get("answers", []), problems)
    for m in workers.get("missing", []):
        problems[f"worker {m.get('worker')}"] = str(m.get("error"))

    # -- agents
    status = _view(views, "/agents/status", problems)
    agents = [
        {
            "agent_id": d.get("agent_id"),
            "status": d.get("status"),
            "seconds_since_heartbeat": d.get("seconds_since_heartbeat"),
            "last_heartbeat_at": _when(d.get("last_heartbeat_at")),
            "status_changed_at": _when(d.get("status_changed_at")),
            "missed_beats": d.get("missed_beats"),
            "reason": d.get("reason"),
        }
        for d in status.get("agents", [])
    ]
    timeouts = [d.get("timeout_s") for d in status.get("agents", []) if d.get("timeout_s")]

    # -- messages
    decisions = _view(views, "/security/decisions/", problems)
    verdicts = rates(history, "agentstream_security_decisions")
    dead = rates(history, "agentstream_dead_letters", key=lambda k: "all")
    top_rules, top_policies = top_rejections(decisions.get("counts", {}), tail)
    counts = decisions.get("counts", {})

    # -- dead letters
    reasons = _tally(str(i["payload"].get("error_class")) for i in tail.dead_letters)
    topics = _tally(_strip(str(i["payload"].get("topic")), prefix) for i in tail.dead_letters)

    # -- LLM
    breakers_view = _view(views, "/llm/breakers", problems)
    transitions = breaker_transitions(tail)
    breakers = {}
    for name in sorted(set(breakers_view.get("breakers", {})) | set(transitions)):
        b = breakers_view.get("breakers", {}).get(name, {})
        live = b.get("live") or {"state": "closed", "failures": 0}
        breakers[name] = {
            "state": live.get("state"),
            "failures": live.get("failures", 0),
            "transitions": transitions.get(name, []),
        }
    usage = _view(views, "/llm/usage", problems)
    in_flight = None
    for _, body in answers:
        n = ((body.get("probes") or {}).get("llm") or {}).get("in_flight")
        if isinstance(n, int):
            in_flight = (in_flight or 0) + n

    # -- pipeline
    lag = []
    health = {}
    for url, body in answers:
        for tp, n in sorted((body.get("lag") or {}).items()):
            topic, _, part = tp.rpartition(":")
            lag.append(
                {"topic": _strip(topic, prefix), "partition": int(part), "lag": n, "worker": url}
            )
        health[url] = {
            "worker_id": body.get("worker_id"),
            "status": body.get("status"),
            "uptime_s": body.get("uptime_s"),
            "components": body.get("components", {}),
        }
    lag.sort(key=lambda r: (r["topic"], r["partition"]))

    # -- policies
    pol = _view(views, "/security/policies/", problems)
    policies = []
    for p in pol.get("policies", []):
        row = {
            "policy_id": p.get("policy_id"),
            "version": p.get("version"),
            "level": p.get("level"),
            "description": p.get("description", ""),
            "signed_by": p.get("signed_by", ""),
            "broken": p.get("broken"),
        }
        extra = (patterns or {}).get(str(p.get("policy_id")))
        if extra is not None:
            row.update({k: list(extra.get(k) or []) for k in PATTERN_FIELDS})
            if extra.get("broken") is not None:
                row["broken"] = extra["broken"]
        policies.append(row)

    return {
        "version": VERSION,
        "at": _iso(now),
        "interval_s": interval_s,
        "served_by": self_url,
        #: rates need two samples: the first snapshot of a hub has none yet
        "rates_measured": len(history) >= 2,
        "workers": [u for u, _ in answers],
        "partial": bool(problems),
        "problems": problems,
        "agents": {
            "counts": status.get("counts", {"up": 0, "down": 0}),
            "deciding": status.get("deciding"),
            "detection_delay_s": max(timeouts) if timeouts else None,
            "list": agents,
            "timeline": timeline(tail),
        },
        "messages": {
            "accepted_per_s": verdicts.get("allow", 0.0),
            "rejected_per_s": verdicts.get("deny", 0.0),
            "dead_lettered_per_s": dead.get("all", 0.0),
            "accepted_total": int((counts.get("allow") or {}).get("*", 0)),
            "rejected_total": int((counts.get("deny") or {}).get("*", 0)),
            "top_rules": top_rules,
            "top_policies": top_policies,
            "recent": recent_decisions(tail),
        },
        "dead_letters": {
            "seen": tail.dead_letters_seen,
            "by_reason": reasons,
            "by_topic": topics,
            "recent": dead_letters(tail, prefix, limit=MAX_DEAD_LETTERS),
        },
        "llm": {
            "in_flight": in_flight,
            "latency": latency(history),
            "breakers": breakers,
            "usage": {k: usage.get(k, {}) for k in ("agent", "provider", "model")},
        },
        "pipeline": {
            "lag": lag,
            "throughput": rates(history, "agentstream_events_in", key=_stage),
            "produced": rates(
                history,
                "agentstream_events_out",
                key=lambda t: _strip(t, prefix),
            ),
            "health": health,
            "checkpoints": checkpoint_ages(tail, now),
        },
        "policies": {
            "ready": pol.get("ready"),
            "enabled": pol.get("enabled"),
            "default_action": pol.get("default_action"),
            "updated_at": _when(pol.get("updated_at")),
            "patterns_shown": patterns is not None,
            "policies": policies,
        },
    }


#: the rules whose reasons quote a policy's pattern: a ``blocked_patterns`` reason names
#: the patterns that matched, an ``invalid_policy`` one a broken pattern's error
QUOTING_RULES = ("blocked_patterns", "invalid_policy")
#: the end of a reason naming its policy (`agents.security.policy.Violation.reason`)
_POLICY_SUFFIX = re.compile(r" \[policy [A-Za-z0-9._:-]+ v\d+\]$")


def read_reason(reason: str) -> str:
    """A decision reason (``rule: detail [policy p vN]``) as a read token sees it: the
    detail of a rule that quotes a pattern replaced, the rule and policy kept."""
    rule = reason.partition(": ")[0]
    if rule not in QUOTING_RULES:
        return reason
    suffix = _POLICY_SUFFIX.search(reason)
    hidden = HIDDEN_REASON if rule == "blocked_patterns" else HIDDEN_BROKEN
    return f"{rule}: {hidden}{suffix.group(0) if suffix else ''}"


def for_read(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a read token sees of an admin snapshot: no patterns, no reason quoting one."""
    out = dict(doc)
    msgs = dict(doc["messages"])
    msgs["recent"] = [
        {**d, "reasons": [read_reason(r) for r in d["reasons"]]} for d in msgs["recent"]
    ]
    out["messages"] = msgs
    pols = dict(doc["policies"])
    pols["patterns_shown"] = False
    rows = []
    for p in pols["policies"]:
        row = {k: v for k, v in p.items() if k not in PATTERN_FIELDS}
        if row.get("broken") is not None:
            row["broken"] = HIDDEN_BROKEN
        rows.append(row)
    pols["policies"] = rows
    out["policies"] = pols
    return out

"""The chaos suite's checker: what came out of the pipeline compared with what went in.

Pure: it takes records already read (by `tests.chaos.collect`, with a read_committed
consumer) and returns a `CheckResult`; nothing here touches Kafka, so the unit tests in
`tests/unit/test_chaos_checker.py` feed it synthetic records.

What it asserts, per run:

* **nothing lost** — every input record has an outcome (accepted + rejected + dead
  letters): per message id, as many outcomes as the id has copies on the input topic (a
  producer that re-sent wrote two copies, each processed on its own); a dead letter
  names its input by (partition, offset) on the input topic and is mapped back to the
  input found there; every decodable input *record* — (partition, offset), not merely
  its id — has a decision on `security.decisions`, which names its source record, so a
  copy lost while the other copy is decided twice does not pass as "one each";
* **duplicates** — outcomes beyond one per input copy, decisions beyond one per input
  record, and (exactly-once) any source offset decided again: under exactly-once any is
  a failure; under at-least-once they are counted and compared with the bound "one
  commit interval's worth of input per fault";
* **right verdicts** — a valid message is accepted, or rejected when it carries the word
  the run's policy blocks; a crash, a replay or a rebalance must not change a verdict (a
  table update kept from an abandoned batch could, e.g. a false replay rejection);
* **poison routing** — every poison input is a dead letter, no valid input is;
* **order per partition** — within each partition the source offsets of the decisions
  (and of the outcomes) increase, except where an at-least-once replay goes back over
  offsets already decided (a replay); going back to an offset never decided before is a
  violation;
* `judge_rebuild` / `judge_audit` read the JSON of `agentstream rebuild --all --json` and
  `agentstream audit verify --json`.

It also computes `resume_times`: for each fault, how long until every partition the faulted
worker held had an output again (`resume_after_kill_s`).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

EXACTLY_ONCE = "exactly_once"
AT_LEAST_ONCE = "at_least_once"

#: the output topics every input must reach one of (catalogue names)
OUTCOME_KINDS = ("accepted", "rejected", "deadletter")
DECISION = "decision"
POISON_KINDS = ("undecodable", "wrongtype", "invalid")
#: how a poison input (which has no decodable message id) carries its id in its bytes
ID_MARK = b"chaos-id="
_ID_RE = re.compile(rb"chaos-id=([A-Za-z0-9._-]+)")
#: ids and detail lists in results are capped at this many entries
SAMPLE = 20
#: valid message n carries the word the run's policy blocks when n % REJECT_EVERY is
#: REJECTED_AT (`tests.chaos.load`): its outcome must be a rejection, every other one's
#: an acceptance
REJECT_EVERY, REJECTED_AT = 10, 3
BLOCKED_WORD = "forbidden"


def expected_outcome(input_id: str) -> str | None:
    """ "accepted" or "rejected" for a valid load message id (`<tag>.<n>`); None for an
    id the load did not number so."""
    tail = input_id.rsplit(".", 1)[-1]
    if not tail.isdigit():
        return None
    return "rejected" if int(tail) % REJECT_EVERY == REJECTED_AT else "accepted"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One record found on the input topic."""

    partition: int
    offset: int
    id: str
    #: the poison kind ("undecodable", "wrongtype", "invalid"), None for a valid message
    poison: str | None = None


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record on an output topic. `id` is the message id when the record names it
    (accepted, rejected, decision); a dead letter names its source instead."""

    kind: str
    partition: int
    offset: int
    id: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    #: broker/producer timestamp of the record, ms
    timestamp_ms: int = 0
    #: wall-clock time (s) the collector saw it (read_committed: when it became visible)
    seen_at: float = 0.0
    #: when the worker made it, ms (a decision's `evaluated_at`), else None
    made_at_ms: int | None = None

    @property
    def made_at(self) -> float:
        """When the output was made, s: the worker's own time for a decision, else the
        record's timestamp. The catalogue topics take the broker's append time, and a
        produce request a killed worker had already sent is appended after the kill: by
        its record timestamp it would look made by the worker that took over."""
        return (self.made_at_ms if self.made_at_ms is not None else self.timestamp_ms) / 1000.0


def poison_kind(input_id: str) -> str | None:
    """Poison ids end in `.<kind>` (see `tests.chaos.load`)."""
    tail = input_id.rsplit(".", 1)[-1]
    return tail if tail in POISON_KINDS else None


def parse_input(partition: int, offset: int, value: bytes | None) -> InputRecord | None:
    """The input record of an `agent.messages` record: a valid message by its message id,
    a poison record by the id marked in its bytes; None for a record the suite did not
    write (no id at all)."""
    if value is None:
        return None
    if ID_MARK in value:
        m = _ID_RE.search(value)
        if m:
            ident = m.group(1).decode()
            return InputRecord(partition, offset, ident, poison_kind(ident) or "unknown")
    try:
        doc = orjson.loads(value)
        ident = doc["payload"]["message_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(ident, str):
        return None
    return InputRecord(partition, offset, ident, None)


def parse_output(
    kind: str,
    partition: int,
    offset: int,
    value: bytes | None,
    timestamp_ms: int = 0,
    seen_at: float = 0.0,
) -> OutputRecord | None:
    """An output record as the checker needs it; None when it is not an event at all."""
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
        payload = doc["payload"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(payload, dict):
        return None
    if kind == "deadletter":
        return OutputRecord(
            kind,
            partition,
            offset,
            None,
            source_topic=payload.get("topic"),
            source_partition=payload.get("partition"),
            source_offset=payload.get("offset"),
            timestamp_ms=timestamp_ms,
            seen_at=seen_at,
        )
    ident = payload.get("message_id")
    return OutputRecord(
        kind,
        partition,
        offset,
        ident if isinstance(ident, str) else None,
        source_partition=payload.get("source_partition"),
        source_offset=payload.get("source_offset"),
        timestamp_ms=timestamp_ms,
        seen_at=seen_at,
        made_at_ms=_ms(payload.get("evaluated_at")),
    )


def _ms(text: object) -> int | None:
    """An ISO 8601 time as ms since the epoch; None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


# --------------------------------------------------------------------------- order


@dataclass(frozen=True, slots=True)
class OrderViolation:
    stream: str
    partition: int
    offset: int
    source_offset: int
    highest_before: int


def order_check(source_offsets: Iterable[int]) -> tuple[list[tuple[int, int, int]], int]:
    """Walk the source offsets of one partition's outputs in the order they were written.
    Returns (violations, replays): a violation is (index, source offset, highest offset
    before it) for an offset below one already seen that was never seen itself — a later
    input decided before an earlier one; an offset seen before is a replay (at-least-once
    redelivery), not a violation."""
    seen: set[int] = set()
    highest = -1
    violations: list[tuple[int, int, int]] = []
    replays = 0
    for i, off in enumerate(source_offsets):
        if off > highest:
            highest = off
        elif off in seen:
            replays += 1
        else:
            violations.append((i, off, highest))
        seen.add(off)
    return violations, replays


# --------------------------------------------------------------------------- result


class _Verdict:
    """What both result types share: failed when any failure was found."""

    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]
        out["ok"] = self.ok
        return out


@dataclass
class CheckResult(_Verdict):
    guarantee: str
    inputs: int = 0
    input_copies: int = 0  # records on the input topic (> inputs: the producer re-sent)
    poison_inputs: int = 0
    outcomes: int = 0
    decisions: int = 0
    dead_letters: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    missing_decisions: int = 0
    missing_decision_ids: list[str] = field(default_factory=list)
    duplicates: int = 0  # outcome records beyond one per input copy
    duplicate_ids: list[str] = field(default_factory=list)
    decision_duplicates: int = 0
    poison_not_dead_lettered: int = 0
    valid_dead_lettered: int = 0
    unknown_outputs: int = 0  # outputs that name no input of this run
    wrong_outcomes: int = 0  # accepted where the policy blocks, or rejected where not
    wrong_outcome_ids: list[str] = field(default_factory=list)
    unresolved_dead_letters: int = 0
    order_violations: int = 0
    order_samples: list[dict[str, Any]] = field(default_factory=list)
    replays: int = 0
    faults: int = 0
    dup_bound: float | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def dup_bound(faults: int, throughput_eps: float | None, commit_interval_s: float) -> float | None:
    """At-least-once: a fault replays at most the input since the last commit — about one
    commit interval's worth of throughput per fault."""
    if throughput_eps is None or faults <= 0:
        return None if throughput_eps is None else 0.0
    return faults * commit_interval_s * throughput_eps


def check(
    inputs: Sequence[InputRecord],
    outputs: Sequence[OutputRecord],
    *,
    guarantee: str,
    input_topic: str | None = None,
    faults: int = 0,
    throughput_eps: float | None = None,
    commit_interval_s: float = 1.0,
) -> CheckResult:
    """Compare inputs and outputs; see the module docstring for what is asserted.
    `input_topic`, when given, is what a dead letter's source topic must be for it to
    count (dead letters of other consumers are ignored)."""
    res = CheckResult(guarantee=guarantee, faults=faults)
    copies: Counter[str] = Counter()
    by_offset: dict[tuple[int, int], InputRecord] = {}
    #: id -> its copies' (partition, offset), in input order
    copy_at: dict[str, list[tuple[int, int]]] = defaultdict(list)
    poison: dict[str, str | None] = {}
    for rec in inputs:
        copies[rec.id] += 1
        by_offset[(rec.partition, rec.offset)] = rec
        copy_at[rec.id].append((rec.partition, rec.offset))
        poison[rec.id] = rec.poison
    res.inputs = len(copies)
    res.input_copies = len(inputs)
    res.poison_inputs = sum(1 for p in poison.values() if p)

    outcome_count: Counter[str] = Counter()
    #: decisions per source record (partition, offset)
    decided: Counter[tuple[int, int]] = Counter()
    dead_lettered: set[str] = set()
    # (stream, partition) -> source offsets in written order
    streams: dict[tuple[str, int], list[int]] = defaultdict(list)
    places: dict[tuple[str, int], list[int]] = defaultdict(list)

    for out in sorted(outputs, key=lambda o: (o.kind, o.partition, o.offset)):
        if out.kind == "deadletter":
            if input_topic is not None and out.source_topic not in (None, input_topic):
                continue
            src = (out.source_partition, out.source_offset)
            found = by_offset.get(src) if None not in src else None  # type: ignore[arg-type]
            if found is None:
                res.unresolved_dead_letters += 1
                continue
            res.dead_letters += 1
            res.outcomes += 1
            outcome_count[found.id] += 1
            dead_lettered.add(found.id)
            key = ("deadletter", found.partition)
            streams[key].append(found.offset)
            places[key].append(out.offset)
            continue
        if out.id is None or out.id not in copies:
            res.unknown_outputs += 1
            continue
        if out.kind == DECISION:
            sp, so = out.source_partition, out.source_offset
            source = by_offset.get((sp, so)) if sp is not None and so is not None else None
            if source is None or source.id != out.id:
                res.unknown_outputs += 1  # a decision must name its input record
                continue
            res.decisions += 1
            decided[(sp, so)] += 1  # type: ignore[index]
            streams[(DECISION, sp)].append(so)  # type: ignore[index,arg-type]
            places[(DECISION, sp)].append(out.offset)
        elif out.kind in OUTCOME_KINDS:
            expected = expected_outcome(out.id)
            if expected is not None and out.kind != expected:
                res.wrong_outcomes += 1
                if len(res.wrong_outcome_ids) < SAMPLE:
                    res.wrong_outcome_ids.append(out.id)
            # an outcome names its id only: the n-th of an id stands for its n-th copy
            at = copy_at[out.id]
            sp, so = at[min(outcome_count[out.id], len(at) - 1)]
            res.outcomes += 1
            outcome_count[out.id] += 1
            streams[(out.kind, sp)].append(so)
            places[(out.kind, sp)].append(out.offset)

    short = sorted(i for i in copies if outcome_count[i] < copies[i])
    res.lost = sum(copies[i] - outcome_count[i] for i in short)
    res.lost_ids = short[:SAMPLE]
    no_decision = sorted(
        rec.id for rec in inputs if not rec.poison and not decided[(rec.partition, rec.offset)]
    )
    res.missing_decisions, res.missing_decision_ids = len(no_decision), no_decision[:SAMPLE]
    dup_ids = sorted(i for i, n in outcome_count.items() if n > copies[i])
    res.duplicates = sum(outcome_count[i] - copies[i] for i in dup_ids)
    res.duplicate_ids = dup_ids[:SAMPLE]
    res.decision_duplicates = sum(n - 1 for n in decided.values() if n > 1)
    res.poison_not_dead_lettered = sum(
        1 for i, p in poison.items() if p and outcome_count[i] and i not in dead_lettered
    )
    res.valid_dead_lettered = sum(1 for i in dead_lettered if not poison[i])

    for (stream, part), offsets in sorted(streams.items()):
        violations, replays = order_check(offsets)
        res.replays += replays
        res.order_violations += len(violations)
        for idx, off, high in violations[: SAMPLE - len(res.order_samples)]:
            res.order_samples.append(
                asdict(OrderViolation(stream, part, places[(stream, part)][idx], off, high))
            )

    res.dup_bound = dup_bound(faults, throughput_eps, commit_interval_s)
    _judge(res)
    return res


def _judge(res: CheckResult) -> None:
    eos = res.guarantee == EXACTLY_ONCE
    if res.lost:
        res.failures.append(
            f"{res.lost} input record(s) lost (fewer accepted/rejected/dead letters than "
            "copies on the input topic)"
        )
    if res.missing_decisions:
        res.failures.append(f"{res.missing_decisions} decodable input record(s) without a decision")
    if res.poison_not_dead_lettered:
        res.failures.append(f"{res.poison_not_dead_lettered} poison input(s) not dead-lettered")
    if res.valid_dead_lettered:
        res.failures.append(f"{res.valid_dead_lettered} valid input(s) dead-lettered")
    if res.order_violations:
        res.failures.append(f"{res.order_violations} per-partition order violation(s)")
    if res.wrong_outcomes:
        res.failures.append(
            f"{res.wrong_outcomes} outcome(s) against the run's policy (accepted where it "
            f"blocks, rejected where it does not): {res.wrong_outcome_ids[:3]}"
        )
    if res.unknown_outputs:
        res.warnings.append(f"{res.unknown_outputs} output(s) naming no input of this run")
    if res.unresolved_dead_letters:
        res.warnings.append(
            f"{res.unresolved_dead_letters} dead letter(s) whose (partition, offset) is no "
            "input record"
        )
    if res.input_copies > res.inputs:
        res.warnings.append(
            f"the producer wrote {res.input_copies - res.inputs} input(s) twice (re-sent "
            "after a failed send); each copy is expected to have its own outcome"
        )
    dups = res.duplicates + res.decision_duplicates
    if eos and (dups or res.replays):
        res.failures.append(
            f"exactly-once: {res.duplicates} duplicate outcome(s), "
            f"{res.decision_duplicates} duplicate decision(s), {res.replays} source "
            "offset(s) written again (read_committed)"
        )
    elif dups and res.dup_bound is not None and res.duplicates > res.dup_bound:
        res.warnings.append(
            f"at-least-once: {res.duplicates} duplicate outcome(s) exceed the bound of "
            f"{res.dup_bound:.0f} (one commit interval's worth per fault x {res.faults})"
        )


# --------------------------------------------------------------------------- resume


@dataclass(frozen=True, slots=True)
class FaultMark:
    """A fault for resume measurement: at wall time `at`, the worker holding `partitions`
    of the input topic went away (kill -9, SIGSTOP) or the broker did."""

    kind: str
    target: str
    at: float
    partitions: frozenset[int]


def resume_times(
    faults: Sequence[FaultMark], decisions: Iterable[OutputRecord]
) -> list[float | None]:
    """For each fault: seconds until *every* partition it took had a decision made after
    it (`OutputRecord.made_at` > fault time), as seen by the collector; the fault is
    marked once the process is gone, so no output of the dead worker counts. A partition
    hit again by a later fault before it resumed is left to that fault (a worker killed
    twice in a row: the second kill's wait is not the first's). None when no partition
    is left to measure (no partitions, or none had an output after the fault: nothing
    resumed, which the loss check judges)."""
    by_part: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for d in decisions:
        p = d.source_partition if d.source_partition is not None else d.partition
        by_part[p].append((d.made_at, d.seen_at))
    out: list[float | None] = []
    for f in faults:
        worst: float | None = None
        for p in f.partitions:
            first = min((seen for ts, seen in by_part.get(p, ()) if ts > f.at), default=None)
            if first is None:
                continue
            if any(f.at < g.at < first and p in g.partitions for g in faults if g is not f):
                continue  # superseded: a later fault on this partition came first
            worst = first if worst is None else max(worst, first)
        out.append(None if worst is None else max(0.0, worst - f.at))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    rank = max(1, math.ceil(q / 100 * len(vals)))
    return vals[min(rank, len(vals)) - 1]


# --------------------------------------------------------------------------- CLI checks


@dataclass
class Verdict:
    ok: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    #: findings that are a documented caveat of the guarantee, not a failure
    tolerated: str = ""


#: tables that count events. Their counters keep the offset they counted up to, so the
#: inputs decided again after a crash are counted once (`streams.tables.security.counted`);
#: under at-least-once a worker whose partitions were revoked may still finish its batch
#: and write a counter after the partition's new owner restored it (docs/guarantees.md
#: "Tables after a crash"), so a difference there is reported, not failed
COUNTING_TABLES = frozenset({"security_decision_counts"})


#: the tables with a changelog that `enforce_policy` workers write
WORKER_TABLES = ("security_decision_counts", "security_replay")


def judge_rebuild(
    lines: Iterable[str],
    guarantee: str,
    returncode: int = 0,
    tables: Iterable[str] | None = WORKER_TABLES,
) -> Verdict:
    """`agentstream rebuild --all --json` output (one JSON comparison per line), judged
    for `tables` (the JSON does not say whether a live table exists: a table no worker
    of the run writes compares an empty changelog; None: every line that says
    `live_available`, or does not say)."""
    wanted = None if tables is None else set(tables)
    compared, differ = [], []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        c = orjson.loads(line)
        if wanted is not None and c.get("table") not in wanted:
            continue
        if wanted is None and not c.get("live_available", True):
            continue
        compared.append(c["table"])
        if not c.get("equal"):
            differ.append(c)
    missing = sorted(wanted - set(compared)) if wanted is not None else []
    if not compared or missing:
        return Verdict(False, f"not compared: {missing or 'any table'} (exit {returncode})")
    names = [c["table"] for c in differ]
    details = {"compared": compared, "differ": names, "differing": differ[:5]}
    if not differ:
        return Verdict(True, f"{len(compared)} table(s) equal to their rebuild", details)
    tolerable = guarantee != EXACTLY_ONCE and all(n in COUNTING_TABLES for n in names)
    summary = f"differ from their rebuild: {', '.join(names)}"
    if tolerable:
        return Verdict(True, summary, details, tolerated="counting table drift (at-least-once)")
    return Verdict(False, summary, details)


def judge_audit(doc: Mapping[str, Any] | None, guarantee: str, crashed: bool = True) -> Verdict:
    """`agentstream audit verify --json`. Under at-least-once an `unsigned` tail after a
    worker died without its clean stop (`crashed`: a kill -9, a raise, a crash) is the
    documented crash caveat (docs/audit.md): counted, tolerated; without one, unsigned
    records are a failure."""
    if doc is None:
        return Verdict(False, "audit verify produced no JSON")
    counts = {k: int(v) for k, v in (doc.get("counts") or {}).items() if v}
    trusted = doc.get("trusted_keys") or []
    details = {"counts": counts, "records": doc.get("records"), "trusted_keys": trusted}
    if not trusted:
        return Verdict(False, "audit verify trusted no chain key", details)
    if doc.get("ok"):
        return Verdict(True, f"chains intact ({doc.get('records')} record(s))", details)
    other = {k: v for k, v in counts.items() if k != "unsigned"}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "not ok"
    if guarantee != EXACTLY_ONCE and crashed and not other and counts.get("unsigned"):
        return Verdict(True, summary, details, tolerated="unsigned tails after kill -9")
    return Verdict(False, summary, details)


# --------------------------------------------------------------------------- LLM stage
# `llm_saturated`: every `llm.request` must end in exactly one final `llm.response`
# (any status: completed, failed — a typed failure carrying its `error` — or cancelled)
# or, if the agent could not publish one, a dead letter. call_llm holds a request's
# offset until its response is out, outside the exactly-once commit gate, so its outputs
# are at-least-once by design (docs/guarantees.md): duplicate responses are counted under
# both guarantees and judged against the at-least-once bound under both.

LLM_STATUSES = ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class LlmResponseRecord:
    """One record on `llm.responses`."""

    partition: int
    offset: int
    request_id: str
    status: str
    #: the typed error of a failed response (`ErrorInfo.error_class`)
    error_class: str | None = None
    content: str = ""
    timestamp_ms: int = 0
    seen_at: float = 0.0


def parse_llm_request(partition: int, offset: int, value: bytes | None) -> InputRecord | None:
    """An `llm.requests` record as an input (its id: the request id)."""
    if value is None:
        return None
    try:
        ident = orjson.loads(value)["payload"]["request_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return InputRecord(partition, offset, ident) if isinstance(ident, str) else None


def parse_llm_response(
    partition: int, offset: int, value: bytes | None, timestamp_ms: int = 0, seen_at: float = 0.0
) -> LlmResponseRecord | None:
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
        payload = doc["payload"]
        ident, status = payload["request_id"], payload["status"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(ident, str) or not isinstance(status, str):
        return None
    error = payload.get("error")
    error_class = error.get("error_class") if isinstance(error, dict) else None
    return LlmResponseRecord(
        partition,
        offset,
        ident,
        status,
        error_class if isinstance(error_class, str) else None,
        str(payload.get("content") or ""),
        timestamp_ms,
        seen_at,
    )


@dataclass
class LlmCheckResult(_Verdict):
    guarantee: str
    requests: int = 0
    request_copies: int = 0
    responses: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    #: final responses beyond one per request id (the agent deduplicates re-sent copies)
    duplicates: int = 0
    duplicate_ids: list[str] = field(default_factory=list)
    dead_lettered: int = 0
    dead_lettered_ids: list[str] = field(default_factory=list)
    unknown_responses: int = 0
    unresolved_dead_letters: int = 0
    failed_untyped: int = 0
    completed_empty: int = 0
    faults: int = 0
    throughput_rps: float | None = None
    dup_bound: float | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_llm(
    requests: Sequence[InputRecord],
    responses: Sequence[LlmResponseRecord],
    dead_letters: Sequence[OutputRecord] = (),
    *,
    guarantee: str,
    request_topic: str | None = None,
    faults: int = 0,
    throughput_rps: float | None = None,
    commit_interval_s: float = 1.0,
    cancellations: bool = False,
    min_completed_share: float = 0.0,
) -> LlmCheckResult:
    """Requests against their final responses (see the section comment). Fails on: a
    request without a final response nor a dead letter (lost), a well-formed request
    dead-lettered, a response naming no request of the run, a failed response without
    its typed error, a completed one without content, a cancelled one when the run sent
    no cancellation, fewer completed responses than `min_completed_share` of the
    requests, and duplicate responses beyond the at-least-once bound (one commit
    interval's worth of responses per fault) — under both guarantees: LLM outputs are
    at-least-once by design."""
    res = LlmCheckResult(guarantee=guarantee, faults=faults, throughput_rps=throughput_rps)
    copies: Counter[str] = Counter(r.id for r in requests)
    by_offset = {(r.partition, r.offset): r for r in requests}
    res.requests, res.request_copies = len(copies), len(requests)
    answered: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for resp in responses:
        if resp.request_id not in copies:
            res.unknown_responses += 1
            continue
        res.responses += 1
        answered[resp.request_id] += 1
        statuses[resp.status] += 1
        if resp.status == "failed" and not resp.error_class:
            res.failed_untyped += 1
        if resp.status == "completed" and not resp.content:
            res.completed_empty += 1
    res.by_status = {s: statuses[s] for s in sorted(statuses)}
    dead: set[str] = set()
    for d in dead_letters:
        if d.kind != "deadletter":
            continue
        if request_topic is not None and d.source_topic != request_topic:
            continue
        src = (d.source_partition, d.source_offset)
        found = by_offset.get(src) if None not in src else None  # type: ignore[arg-type]
        if found is None:
            res.unresolved_dead_letters += 1
            continue
        dead.add(found.id)
    lost = sorted(i for i in copies if not answered[i] and i not in dead)
    res.lost, res.lost_ids = len(lost), lost[:SAMPLE]
    dups = sorted(i for i, n in answered.items() if n > 1)
    res.duplicates = sum(answered[i] - 1 for i in dups)
    res.duplicate_ids = dups[:SAMPLE]
    res.dead_lettered, res.dead_lettered_ids = len(dead), sorted(dead)[:SAMPLE]
    res.dup_bound = dup_bound(faults, throughput_rps, commit_interval_s)
    _judge_llm(res, cancellations, min_completed_share)
    return res


def _judge_llm(res: LlmCheckResult, cancellations: bool, min_completed_share: float) -> None:
    if res.lost:
        res.failures.append(f"{res.lost} LLM request(s) lost (no final response, no dead letter)")
    if res.dead_lettered:
        res.failures.append(f"{res.dead_lettered} well-formed LLM request(s) dead-lettered")
    if res.unknown_responses:
        res.failures.append(f"{res.unknown_responses} response(s) naming no request of the run")
    if res.failed_untyped:
        res.failures.append(f"{res.failed_untyped} failed response(s) without a typed error")
    if res.completed_empty:
        res.failures.append(f"{res.completed_empty} completed response(s) without content")
    unknown = {s: n for s, n in res.by_status.items() if s not in LLM_STATUSES}
    if unknown:
        res.failures.append(f"responses of unknown status: {unknown}")
    cancelled = res.by_status.get("cancelled", 0)
    if cancelled and not cancellations:
        res.failures.append(f"{cancelled} response(s) cancelled though nothing was cancelled")
    completed = res.by_status.get("completed", 0)
    if res.requests and completed < min_completed_share * res.requests:
        res.failures.append(
            f"only {completed} of {res.requests} request(s) completed (< "
            f"{min_completed_share:.0%}): the stage did not get its calls through"
        )
    if res.unresolved_dead_letters:
        res.warnings.append(
            f"{res.unresolved_dead_letters} LLM dead letter(s) whose (partition, offset) is "
            "no request record"
        )
    if res.duplicates:
        bound = res.dup_bound
        within = bound is not None and res.duplicates <= bound
        text = (
            f"{res.duplicates} duplicate final response(s) under {res.guarantee} "
            f"(at-least-once bound {'-' if bound is None else f'{bound:.0f}'}: LLM outputs "
            "are at-least-once under both guarantees)"
        )
        (res.warnings if within else res.failures).append(text)

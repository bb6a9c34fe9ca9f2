"""The chaos suite's checker on synthetic records: loss, duplicates, poison routing,
per-partition order (with at-least-once replays), resume times, and the verdicts on
`agentstream rebuild` / `audit verify` output."""

from __future__ import annotations

import orjson

from tests.chaos import checker
from tests.chaos.checker import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    FaultMark,
    InputRecord,
    OutputRecord,
    check,
    order_check,
    parse_input,
    parse_output,
    resume_times,
)
from tests.chaos.load import input_record

TOPIC = "ns.agent.messages"


def inputs(n: int, partitions: int = 2) -> list[InputRecord]:
    """n valid inputs, round-robin over partitions, offsets counting per partition."""
    return [InputRecord(i % partitions, i // partitions, f"m{i}") for i in range(n)]


def outcome(rec: InputRecord, offset: int, kind: str = "accepted") -> OutputRecord:
    return OutputRecord(kind, rec.partition, offset, rec.id)


def decision(rec: InputRecord, offset: int) -> OutputRecord:
    return OutputRecord("decision", rec.partition, offset, rec.id, None, rec.partition, rec.offset)


def dead_letter(rec: InputRecord, offset: int) -> OutputRecord:
    return OutputRecord("deadletter", 0, offset, None, TOPIC, rec.partition, rec.offset)


def clean_run(ins: list[InputRecord]) -> list[OutputRecord]:
    out: list[OutputRecord] = []
    next_off: dict[int, int] = {}
    for rec in ins:
        off = next_off.get(rec.partition, 0)
        next_off[rec.partition] = off + 1
        out += [outcome(rec, off), decision(rec, off)]
    return out


def test_clean_run_passes_under_both_guarantees() -> None:
    ins = inputs(50)
    for guarantee in (AT_LEAST_ONCE, EXACTLY_ONCE):
        res = check(ins, clean_run(ins), guarantee=guarantee, input_topic=TOPIC)
        assert res.ok, res.failures
        assert (res.inputs, res.outcomes, res.decisions) == (50, 50, 50)
        assert res.lost == res.duplicates == res.order_violations == 0


def test_lost_inputs_are_named() -> None:
    ins = inputs(20)
    outs = [o for o in clean_run(ins) if o.id not in ("m3", "m7") or o.kind == "decision"]
    res = check(ins, outs, guarantee=AT_LEAST_ONCE)
    assert not res.ok
    assert res.lost == 2 and res.lost_ids == ["m3", "m7"]
    assert res.missing_decisions == 0
    assert any("lost" in f for f in res.failures)


def test_missing_decision_is_a_failure() -> None:
    ins = inputs(10)
    outs = [o for o in clean_run(ins) if not (o.kind == "decision" and o.id == "m4")]
    res = check(ins, outs, guarantee=EXACTLY_ONCE)
    assert res.lost == 0 and res.missing_decisions == 1
    assert res.missing_decision_ids == ["m4"] and not res.ok


def test_duplicates_fail_exactly_once_and_are_counted_at_least_once() -> None:
    ins = inputs(10)
    outs = clean_run(ins)
    # a replay of m2 and m4 (partition 0, source offsets 1 and 2) after the rest
    outs += [outcome(ins[2], 100), decision(ins[2], 100)]
    outs += [outcome(ins[4], 101), decision(ins[4], 101)]
    eos = check(ins, outs, guarantee=EXACTLY_ONCE)
    assert not eos.ok and eos.duplicates == 2 and eos.decision_duplicates == 2
    assert eos.duplicate_ids == ["m2", "m4"]
    assert any("exactly-once" in f for f in eos.failures)

    alo = check(ins, outs, guarantee=AT_LEAST_ONCE, faults=1, throughput_eps=100.0)
    assert alo.ok, alo.failures
    assert alo.duplicates == 2 and alo.replays == 4  # outcome + decision streams, 2 each
    assert alo.dup_bound == 100.0  # one commit interval (1 s) x 100 ev/s x 1 fault


def test_duplicates_beyond_the_bound_are_a_warning() -> None:
    ins = inputs(10)
    outs = clean_run(ins) + clean_run(ins)  # everything twice: a full replay
    res = check(ins, outs, guarantee=AT_LEAST_ONCE, faults=1, throughput_eps=2.0)
    assert res.ok and res.duplicates == 10
    assert any("exceed the bound" in w for w in res.warnings)


def test_resent_input_copies_are_not_duplicates() -> None:
    ins = inputs(4)
    again = InputRecord(0, 50, "m2")  # the producer re-sent m2 after a failed send
    outs = [*clean_run(ins), outcome(again, 60), decision(again, 60)]
    res = check([*ins, again], outs, guarantee=EXACTLY_ONCE)
    assert res.ok, res.failures
    assert res.input_copies == 5 and res.inputs == 4 and res.duplicates == 0
    assert any("twice" in w for w in res.warnings)


def test_dead_letters_map_back_by_partition_and_offset() -> None:
    ins = inputs(6)
    bad = [
        InputRecord(1, 10, "p1.undecodable", "undecodable"),
        InputRecord(0, 11, "p2.invalid", "invalid"),
    ]
    outs = [*clean_run(ins), dead_letter(bad[0], 0), dead_letter(bad[1], 1)]
    res = check([*ins, *bad], outs, guarantee=EXACTLY_ONCE, input_topic=TOPIC)
    assert res.ok, res.failures
    assert res.dead_letters == 2 and res.poison_inputs == 2 and res.lost == 0


def test_poison_not_dead_lettered_and_valid_dead_lettered_fail() -> None:
    ins = inputs(4)
    bad = InputRecord(1, 10, "p1.wrongtype", "wrongtype")
    # the poison record forwarded as if valid, a valid one dead-lettered instead
    outs = [o for o in clean_run(ins) if o.id != "m1" or o.kind == "decision"]
    outs += [OutputRecord("accepted", 1, 9, "p1.wrongtype"), dead_letter(ins[1], 5)]
    res = check([*ins, bad], outs, guarantee=AT_LEAST_ONCE, input_topic=TOPIC)
    assert res.poison_not_dead_lettered == 1 and res.valid_dead_lettered == 1
    assert res.lost == 0 and not res.ok


def test_dead_letters_of_other_topics_and_unknown_offsets() -> None:
    ins = inputs(2)
    other = OutputRecord("deadletter", 0, 5, None, "ns.security.policies", 0, 0)
    stray = OutputRecord("deadletter", 0, 6, None, TOPIC, 0, 999)
    res = check(ins, [*clean_run(ins), other, stray], guarantee=EXACTLY_ONCE, input_topic=TOPIC)
    assert res.ok and res.dead_letters == 0 and res.unresolved_dead_letters == 1


def test_order_violation_detected_and_replays_tolerated() -> None:
    assert order_check([0, 1, 2, 3]) == ([], 0)
    # at-least-once replay: back to 1 after 3, offsets seen before
    assert order_check([0, 1, 2, 3, 1, 2, 3, 4]) == ([], 3)
    # 2 decided after 3 although never decided before: a violation
    violations, replays = order_check([0, 1, 3, 2, 4])
    assert violations == [(3, 2, 3)] and replays == 0


def test_order_violation_in_decisions_fails_the_check() -> None:
    ins = inputs(8, partitions=1)
    outs = [outcome(r, i) for i, r in enumerate(ins)]
    order = [0, 1, 2, 4, 3, 5, 6, 7]  # decisions of inputs 3 and 4 swapped
    outs += [decision(ins[j], k) for k, j in enumerate(order)]
    res = check(ins, outs, guarantee=AT_LEAST_ONCE)
    assert res.order_violations == 1 and not res.ok
    assert res.order_samples[0]["stream"] == "decision"
    assert res.order_samples[0]["source_offset"] == 3


def test_unknown_outputs_are_warned_about() -> None:
    ins = inputs(2)
    res = check(
        ins, [*clean_run(ins), OutputRecord("accepted", 0, 9, "zzz")], guarantee=EXACTLY_ONCE
    )
    assert res.ok and res.unknown_outputs == 1 and res.warnings


def test_parse_inputs_and_outputs_from_real_bytes() -> None:
    for n in range(400):
        _key, value = input_record("tag", n, poison_every=100)
        rec = parse_input(1, n, value)
        assert rec is not None
        if n % 100 == 99:
            assert rec.poison in checker.POISON_KINDS and rec.id.startswith(f"tag.{n}.")
        else:
            assert rec.poison is None and rec.id == f"tag.{n}"
    assert parse_input(0, 0, b"not ours") is None
    dec = orjson.dumps(
        {"payload": {"message_id": "tag.1", "source_partition": 2, "source_offset": 7}}
    )
    out = parse_output("decision", 2, 3, dec, 1000, 5.0)
    assert out is not None and (out.id, out.source_partition, out.source_offset) == ("tag.1", 2, 7)
    dl = orjson.dumps({"payload": {"topic": TOPIC, "partition": 1, "offset": 4}})
    out = parse_output("deadletter", 0, 0, dl)
    assert out is not None and (out.source_topic, out.source_partition, out.source_offset) == (
        TOPIC,
        1,
        4,
    )
    assert parse_output("accepted", 0, 0, b"\xff") is None


def test_resume_times_count_only_outputs_produced_after_the_fault() -> None:
    decisions = [
        # produced before the kill, seen after: does not count
        OutputRecord("decision", 0, 0, "a", None, 0, 0, timestamp_ms=9_900, seen_at=10.5),
        OutputRecord("decision", 1, 0, "b", None, 1, 0, timestamp_ms=10_200, seen_at=10.3),
        OutputRecord("decision", 0, 1, "c", None, 0, 1, timestamp_ms=14_000, seen_at=14.2),
    ]
    faults = [
        FaultMark("kill -9", "w0", 10.0, frozenset({0})),
        FaultMark("kill -9", "w1", 10.0, frozenset({1})),
        FaultMark("kill -9", "w2", 20.0, frozenset({0, 1})),
        FaultMark("kill -9", "w3", 5.0, frozenset()),
    ]
    got = resume_times(faults, decisions)
    assert got[0] is not None and abs(got[0] - 4.2) < 1e-9
    assert got[1] is not None and abs(got[1] - 0.3) < 1e-9
    assert got[2] is None and got[3] is None
    assert checker.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert checker.percentile([], 50) is None


def test_resume_times_go_by_when_a_decision_was_made_not_when_it_was_appended() -> None:
    # The catalogue topics take the broker's append time: a decision the killed worker
    # made before the kill but whose produce request the broker appended after it carries
    # a record timestamp past the fault. It must not make the partition look resumed.
    late = parse_output(
        "decision",
        0,
        0,
        orjson.dumps(
            {
                "payload": {
                    "message_id": "a",
                    "source_partition": 0,
                    "source_offset": 0,
                    "evaluated_at": "2026-12-06T12:00:09.900000Z",
                }
            }
        ),
        timestamp_ms=1_796_558_410_050,  # 12:00:10.050, appended after the fault at 10.0
        seen_at=1_796_558_410.1,
    )
    assert late is not None
    resumed = OutputRecord(
        "decision", 0, 1, "b", None, 0, 1, timestamp_ms=1_796_558_414_000, seen_at=1_796_558_414.2
    )
    fault = FaultMark("kill -9", "w0", 1_796_558_410.0, frozenset({0}))
    got = resume_times([fault], [late, resumed])
    assert got[0] is not None and abs(got[0] - 4.2) < 1e-6


def test_resume_waits_for_every_partition_the_fault_took() -> None:
    # partition 0 resumes at once, partition 1 only after 30 s: the fault resumed at 30
    decisions = [
        OutputRecord("decision", 0, 0, "a", None, 0, 0, timestamp_ms=10_100, seen_at=10.2),
        OutputRecord("decision", 1, 0, "b", None, 1, 0, timestamp_ms=39_900, seen_at=40.0),
    ]
    got = resume_times([FaultMark("kill -9", "w0", 10.0, frozenset({0, 1}))], decisions)
    assert got[0] is not None and abs(got[0] - 30.0) < 1e-9


def test_a_partition_hit_again_before_it_resumed_is_left_to_the_later_fault() -> None:
    decisions = [
        OutputRecord("decision", 0, 0, "a", None, 0, 0, timestamp_ms=11_000, seen_at=11.0),
        OutputRecord("decision", 1, 0, "b", None, 1, 0, timestamp_ms=25_000, seen_at=25.0),
    ]
    faults = [
        FaultMark("kill -9", "w0", 10.0, frozenset({0, 1})),
        FaultMark("kill -9", "w0", 12.0, frozenset({1})),  # killed again while recovering
    ]
    first, second = resume_times(faults, decisions)
    assert first is not None and abs(first - 1.0) < 1e-9  # partition 1 is the second's
    assert second is not None and abs(second - 13.0) < 1e-9


def test_judge_rebuild() -> None:
    def line(table: str, equal: bool) -> str:
        return orjson.dumps({"table": table, "equal": equal}).decode()

    equal = [line("security_decision_counts", True), line("security_replay", True)]
    assert checker.judge_rebuild(equal, EXACTLY_ONCE).ok
    drift = [line("security_decision_counts", False), line("security_replay", True)]
    assert not checker.judge_rebuild(drift, EXACTLY_ONCE).ok
    tolerated = checker.judge_rebuild(drift, AT_LEAST_ONCE)
    assert tolerated.ok and tolerated.tolerated
    assert not checker.judge_rebuild([line("security_replay", False), equal[0]], AT_LEAST_ONCE).ok
    assert not checker.judge_rebuild(["Error: no broker"], EXACTLY_ONCE).ok
    assert not checker.judge_rebuild(equal[:1], EXACTLY_ONCE).ok  # a table not compared


def test_judge_audit() -> None:
    ok = {"ok": True, "counts": {}, "records": 10, "trusted_keys": ["worker"]}
    assert checker.judge_audit(ok, EXACTLY_ONCE).ok
    assert not checker.judge_audit(None, EXACTLY_ONCE).ok
    assert not checker.judge_audit({**ok, "trusted_keys": []}, EXACTLY_ONCE).ok
    unsigned = {**ok, "ok": False, "counts": {"unsigned": 3, "forged": 0}}
    assert not checker.judge_audit(unsigned, EXACTLY_ONCE).ok
    assert checker.judge_audit(unsigned, AT_LEAST_ONCE).tolerated
    # no worker died without its clean stop: nothing explains an unsigned record
    assert not checker.judge_audit(unsigned, AT_LEAST_ONCE, crashed=False).ok
    forged = {**ok, "ok": False, "counts": {"unsigned": 3, "forged": 1}}
    assert not checker.judge_audit(forged, AT_LEAST_ONCE).ok


def test_a_lost_copy_does_not_hide_behind_the_other_copy_decided_twice() -> None:
    # m2 was re-sent: copy (0, 1) is never decided, copy (0, 50) is decided twice; the
    # totals per id still match (two outcomes, two decisions for two copies)
    ins = inputs(4)
    again = InputRecord(0, 50, "m2")
    first = ins[2]
    assert (first.partition, first.offset, first.id) == (0, 1, "m2")
    outs = [o for o in clean_run(ins) if o.id != "m2"]
    outs += [outcome(again, 60), decision(again, 60), outcome(again, 61), decision(again, 61)]
    for guarantee in (EXACTLY_ONCE, AT_LEAST_ONCE):
        res = check([*ins, again], outs, guarantee=guarantee)
        assert not res.ok
        assert res.missing_decisions == 1 and res.missing_decision_ids == ["m2"]
        assert res.decision_duplicates == 1


def test_a_copy_without_any_outcome_is_lost() -> None:
    ins = inputs(4)
    again = InputRecord(0, 50, "m2")
    res = check([*ins, again], clean_run(ins), guarantee=AT_LEAST_ONCE)
    assert not res.ok and res.lost == 1 and res.lost_ids == ["m2"]


def test_a_decision_naming_no_input_record_counts_for_nothing() -> None:
    ins = inputs(2)
    outs = [outcome(ins[0], 0), outcome(ins[1], 0)]
    outs += [
        decision(ins[0], 0),
        OutputRecord("decision", 1, 1, "m1", None, 1, 7),  # no input at (1, 7)
    ]
    res = check(ins, outs, guarantee=EXACTLY_ONCE)
    assert not res.ok and res.missing_decision_ids == ["m1"] and res.unknown_outputs == 1


def test_an_outcome_against_the_policy_fails_the_run() -> None:
    # t.3 carries the blocked word (tests.chaos.load): accepting it, or rejecting t.4,
    # is a verdict a crash or a replay changed
    ins = [InputRecord(0, n, f"t.{n}") for n in range(3, 6)]
    right = [
        OutputRecord("rejected", 0, 0, "t.3"),
        OutputRecord("accepted", 0, 0, "t.4"),
        OutputRecord("accepted", 0, 1, "t.5"),
        *(decision(rec, i) for i, rec in enumerate(ins)),
    ]
    assert check(ins, right, guarantee=EXACTLY_ONCE).ok
    wrong = [
        OutputRecord("accepted", 0, 0, "t.3"),
        OutputRecord("rejected", 0, 0, "t.4"),
        *right[2:],
    ]
    res = check(ins, wrong, guarantee=EXACTLY_ONCE)
    assert not res.ok and res.wrong_outcomes == 2
    assert checker.expected_outcome("t.13") == "rejected"
    assert checker.expected_outcome("t.14.invalid") is None
    assert input_record("t", 13)[1].count(checker.BLOCKED_WORD.encode()) == 1
    assert checker.BLOCKED_WORD.encode() not in input_record("t", 14)[1]

"""The checks of `agent_raises` and `llm_saturated` on synthetic input (no Kafka): the LLM
requests -> final responses checker, the parsing of the records it reads, and the
reading of a raise out of a worker's log. (Belongs with tests/unit/test_chaos_checker.py.)"""

from __future__ import annotations

import time

import orjson

from agentstream.schemas import Event, encode
from agentstream.schemas.llm import ErrorInfo, LLMResponse
from tests.chaos.checker import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    InputRecord,
    LlmResponseRecord,
    OutputRecord,
    check_llm,
    parse_llm_request,
    parse_llm_response,
)
from tests.chaos.load import llm_request_record
from tests.chaos.raises import parse_life

TOPIC = "ns.llm.requests"


def requests(n: int) -> list[InputRecord]:
    return [InputRecord(i % 2, i // 2, f"r{i}") for i in range(n)]


def answer(i: int, status: str = "completed", offset: int | None = None) -> LlmResponseRecord:
    error = "ProviderRateLimited" if status == "failed" else None
    content = "words" if status == "completed" else ""
    return LlmResponseRecord(0, i if offset is None else offset, f"r{i}", status, error, content)


def test_one_final_response_per_request_passes() -> None:
    res = check_llm(
        requests(6),
        [answer(i) for i in range(5)] + [answer(5, "failed")],
        guarantee=EXACTLY_ONCE,
        faults=1,
        throughput_rps=5.0,
    )
    assert res.ok, res.failures
    assert res.by_status == {"completed": 5, "failed": 1}
    assert res.lost == res.duplicates == 0


def test_a_request_without_response_is_lost() -> None:
    res = check_llm(requests(4), [answer(i) for i in range(3)], guarantee=AT_LEAST_ONCE)
    assert not res.ok and res.lost == 1 and res.lost_ids == ["r3"]


def test_a_dead_letter_ends_a_request_but_fails_a_well_formed_one() -> None:
    dead = OutputRecord("deadletter", 0, 0, None, TOPIC, 1, 1)  # r3: partition 1, offset 1
    other = OutputRecord("deadletter", 0, 1, None, "ns.agent.messages", 1, 1)
    res = check_llm(
        requests(4),
        [answer(i) for i in range(3)],
        [dead, other],
        guarantee=AT_LEAST_ONCE,
        request_topic=TOPIC,
    )
    assert res.lost == 0 and res.dead_lettered == 1
    assert not res.ok and "dead-lettered" in res.failures[0]


def test_duplicates_are_judged_against_the_at_least_once_bound_under_both() -> None:
    responses = [answer(i) for i in range(4)] + [answer(0, offset=10), answer(1, offset=11)]
    for guarantee in (EXACTLY_ONCE, AT_LEAST_ONCE):
        within = check_llm(
            requests(4), responses, guarantee=guarantee, faults=1, throughput_rps=2.0
        )
        assert within.duplicates == 2 and within.ok, within.failures
        assert within.warnings
        above = check_llm(requests(4), responses, guarantee=guarantee, faults=1, throughput_rps=1.0)
        assert not above.ok and "duplicate" in above.failures[0]


def test_untyped_failures_cancellations_and_too_few_completions_fail() -> None:
    untyped = LlmResponseRecord(0, 3, "r3", "failed", None)
    res = check_llm(requests(4), [answer(i) for i in range(3)] + [untyped], guarantee=EXACTLY_ONCE)
    assert res.failed_untyped == 1 and not res.ok
    res = check_llm(
        requests(2), [answer(0), answer(1, "cancelled")], guarantee=EXACTLY_ONCE, faults=1
    )
    assert any("cancelled" in f for f in res.failures)
    res = check_llm(
        requests(4),
        [answer(0), *(answer(i, "failed") for i in (1, 2, 3))],
        guarantee=EXACTLY_ONCE,
        min_completed_share=0.9,
    )
    assert any("completed" in f for f in res.failures)
    stranger = LlmResponseRecord(0, 9, "someone-else", "completed", None, "x")
    res = check_llm(requests(1), [answer(0), stranger], guarantee=EXACTLY_ONCE)
    assert res.unknown_responses == 1 and not res.ok


def test_records_parse_from_the_wire() -> None:
    key, value = llm_request_record("ns", 7, "chaosllm")
    assert key == b"ns.llm.7"
    assert parse_llm_request(2, 5, value) == InputRecord(2, 5, "ns.llm.7")
    assert parse_llm_request(0, 0, b"not json") is None
    failed = LLMResponse(
        request_id="ns.llm.7",
        status="failed",
        error=ErrorInfo(error_class="ProviderRateLimited", message="429"),
    )
    rec = parse_llm_response(1, 3, encode(Event.of(failed, source="t")), 1000, 2.0)
    assert rec is not None
    assert (rec.request_id, rec.status, rec.error_class) == (
        "ns.llm.7",
        "failed",
        "ProviderRateLimited",
    )
    assert parse_llm_response(0, 0, orjson.dumps({"payload": {}})) is None


def test_a_raise_is_read_from_its_process_log() -> None:
    log = (
        "[2026-12-05 00:55:05,560] [5388] [INFO] [^Worker]: Ready \n"
        "[2026-12-05 00:55:08,332] [5388] [ERROR] an agent failed with a batch in hand "
        "(not acked, crashing the worker): InjectedFault('injected fault at "
        "enforce_policy.publish (call 77)') \n"
        "streams.processing.InjectedFault: injected fault at enforce_policy.publish (call 77)\n"
    )
    ready, raised, call = parse_life(log)
    assert call == 77 and ready is not None and raised is not None
    assert abs((raised - ready) - 2.772) < 1e-6
    ready_at = time.mktime(time.strptime("2026-12-05 00:55:05", "%Y-%m-%d %H:%M:%S")) + 0.56
    assert abs(ready - ready_at) < 1e-6
    assert parse_life("[2026-12-05 00:55:05,560] [1] [INFO] [^Worker]: Ready \n")[1:] == (
        None,
        None,
    )

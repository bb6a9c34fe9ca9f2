"""A hostile sender's `response_format` against the structured-output check.

The schema of an `llm.request` is the sender's, and the answer is checked against it on
the worker's event loop. A 2.6 KB schema well inside the event's size limits — forty
`$defs` each a `oneOf` of two `$ref`s to the next — makes `jsonschema` evaluate 2^40
branches: the check never returns, the event loop (heartbeats, commits, policy
enforcement) stops with it, and the request, never acked, freezes the next worker too.
Each test is a way to make the check's work explode; each must be refused when the
request arrives (no provider called), or, when the work only shows with the answer, cut
short by the check's step budget. Work is measured by the check's own step count, never
by wall time."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from referencing import Registry

from agentstream.agents.llm import structured
from agentstream.agents.llm.processor import AgentProcessor
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.agents.llm.structured import InvalidResponseFormat, check, prepare
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest, ResponseFormat
from agentstream.streams.resilience import RetryPolicy


def chain(levels: int, link: Any = None) -> dict[str, Any]:
    """`levels` $defs, each linking to the next twice (by default a oneOf of two $refs)."""
    defs = {}
    for i in range(levels):
        ref = {"$ref": f"#/$defs/d{i + 1}"}
        defs[f"d{i}"] = link(ref) if link else {"oneOf": [ref, ref]}
    defs[f"d{levels}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


#: the finding's schema: 2^40 branches
ATTACK = chain(40)


def fmt(schema: Any) -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": schema})


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    # the checker is cached per schema; tests that move the limits must not see old ones
    structured.clear_cache()
    yield
    structured.clear_cache()


def test_the_attack_fits_the_events_own_limits() -> None:
    """It is decoded as a valid request: the event schema's depth and item limits do not
    see a problem (the bound has to come from the structured-output check)."""
    assert len(orjson.dumps(ATTACK)) < 3000
    config = LLMConfig.model_validate({"response_format": fmt(ATTACK).model_dump()})
    assert config.response_format is not None


def test_the_exponential_schema_is_refused_when_the_request_arrives() -> None:
    with pytest.raises(InvalidResponseFormat, match="more than 20000 subschemas"):
        prepare(fmt(ATTACK))


@pytest.mark.parametrize(
    "link",
    [
        lambda ref: {"anyOf": [ref, {"allOf": [ref]}]},
        lambda ref: {"allOf": [ref, ref]},
        lambda ref: {"if": ref, "then": ref},
        lambda ref: {"not": ref, "dependentSchemas": {"a": ref}},
        # through the answer's children too: both apply to the same child
        lambda ref: {"items": ref, "contains": ref},
        lambda ref: {"properties": {"a": ref}, "additionalProperties": ref},
    ],
    ids=["anyOf", "allOf", "if-then", "not-dependentSchemas", "items-contains", "properties"],
)
def test_every_applicator_that_doubles_per_level_is_refused(link: Any) -> None:
    with pytest.raises(InvalidResponseFormat, match="more than 20000 subschemas"):
        prepare(fmt(chain(40, link)))


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
        {
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"not": {"$ref": "#/$defs/a"}}},
            "properties": {"x": {"$ref": "#/$defs/a"}},
        },
    ],
    ids=["itself", "through-anyOf", "mutual"],
)
def test_a_ref_back_to_itself_at_the_same_place_is_refused(schema: dict[str, Any]) -> None:
    """Recursion that does not descend into the answer never ends (jsonschema raised
    RecursionError after the provider had answered)."""
    with pytest.raises(InvalidResponseFormat, match="refers back to itself"):
        prepare(fmt(schema))


@pytest.mark.parametrize(
    ("schema", "error"),
    [
        ({"properties": {"type": {"type": "string"}}, "items": {"$ref": "#/properties"}}, "not a"),
        ({"enum": [{"type": 5}], "items": {"$ref": "#/enum/0"}}, "not a"),
        ({"$ref": "https://json-schema.org/draft/2020-12/schema"}, "does not resolve"),
        ({"$ref": "other.json#/a"}, "does not resolve"),
        ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ],
    ids=["properties-object", "enum-value", "meta-schema", "relative", "missing"],
)
def test_a_ref_that_does_not_lead_to_a_subschema_of_its_own_is_refused(
    schema: dict[str, Any], error: str
) -> None:
    """A `$ref` into data (jsonschema raised UnknownType / TypeError mid-check), or out of
    the schema (a meta-schema the library bundles: work the schema's size does not show)."""
    with pytest.raises(InvalidResponseFormat, match=error):
        prepare(fmt(schema))


async def test_through_the_processor_no_provider_is_called() -> None:
    """The built-in `local` provider would answer it (with null) and the check would
    then run forever; instead the request fails at once, the reason in the response."""
    processor = AgentProcessor(
        LLMRegistry(secrets=None),
        policy=RetryPolicy(base_delay_s=0.001, max_delay_s=0.01),
        breaker_failures=3,
        breaker_window_s=60,
        breaker_reset_s=10,
    )
    request = LLMRequest(
        request_id="r-attack",
        agent_id="agent-1",
        provider="local",
        stream=False,
        context=LLMContext(messages=[ChatMessage(role="user", content="anything")]),
        config=LLMConfig(response_format=fmt(ATTACK)),
    )
    outcome = await processor.process_request(request)
    assert outcome.status == "failed" and outcome.attempts == []
    assert outcome.error is not None and outcome.error.error_class == "InvalidResponseFormat"
    assert "more than 20000 subschemas" in outcome.error.message
    assert outcome.schema_valid is None


# -- the backstop: the check's own budget -------------------------------------------------------
def test_the_check_stops_at_its_step_budget_even_on_the_attack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With admission out of the way, the check alone must still return: cut short, the
    answer is reported not valid, and it did not go past its budget."""
    monkeypatch.setattr(structured, "MAX_EXPANDED_SCHEMA", 2**64)
    monkeypatch.setattr(structured, "MAX_CHECK_STEPS", 5_000)
    verdict = check(fmt(ATTACK), "null")
    assert verdict is not None and not verdict.valid
    assert "not checked: over 5000 steps" in verdict.error
    assert 5_000 < verdict.steps < 5_000 + 100


def _big_answer(items: int) -> str:
    rng = random.Random(7)
    return orjson.dumps([{"k": rng.random(), "v": "w" * 40} for _ in range(items)]).decode()


def test_error_messages_are_charged_by_the_answer_they_quote() -> None:
    """Every failing `type` quotes the whole answer in its message (repr); a oneOf of 1000
    failing branches over a 5,000-item answer was 1000 reprs of it. The schema is small
    per place of the answer, so admission lets it through; the budget stops it."""
    schema = {"$defs": {"s": {"type": "string"}}, "oneOf": [{"$ref": "#/$defs/s"}] * 1000}
    prepare(fmt(schema))
    verdict = check(fmt(schema), _big_answer(5_000))
    assert verdict is not None and not verdict.valid and "not checked" in verdict.error
    # the last charge went over: one error quoting the answer (5 steps an item)
    assert verdict.steps <= structured.MAX_CHECK_STEPS + 1 + 5 * 5_000 + 1


@pytest.mark.parametrize("applicator", ["anyOf", "oneOf"])
def test_false_branches_are_charged_for_the_answer_they_quote(applicator: str) -> None:
    """`false` fails with "False schema does not allow <the answer>", made where no
    keyword is metered; anyOf keeps only whether it failed, so no error shows either."""
    schema = {applicator: [False] * 1000 + [True]}
    verdict = check(fmt(schema), _big_answer(5_000))
    assert verdict is not None and not verdict.valid and "not checked" in verdict.error
    assert verdict.steps <= structured.MAX_CHECK_STEPS + 1_000 * (1 + 5 * 5_000) + 2_000


def test_a_pattern_is_charged_by_the_text_it_scans_before_scanning() -> None:
    """RE2 is linear, but per byte it may cost thousands of instruction steps: this one
    is ~4 ms per KiB; repeated 200 times over a 64 KiB answer it was ~50 s."""
    slow = "[ab]*a[ab]{1000}!x"
    schema = {"allOf": [{"pattern": slow}, {"pattern": slow + "y"}] * 100}
    text = "".join(random.Random(3).choice("ab") for _ in range(65_536))
    verdict = check(fmt(schema), orjson.dumps(text).decode())
    assert verdict is not None and not verdict.valid and "not checked" in verdict.error
    # stopped before the first scan: one charge over the budget, nothing scanned
    assert verdict.steps > structured.MAX_CHECK_STEPS
    assert verdict.steps <= structured.MAX_CHECK_STEPS + 65_536 * (1_010 + 16) // 128


def test_a_pattern_compiling_to_a_huge_program_is_refused() -> None:
    """Its compiling time and memory, and each scan's cost per byte, grow with it."""
    with pytest.raises(InvalidResponseFormat, match="24004 RE2 instructions"):
        prepare(fmt({"type": "string", "pattern": "\\w{1000}" * 8}))


def test_unique_items_is_linear_in_the_answer() -> None:
    """jsonschema compares objects pairwise: 10,000 of them were 5·10^7 comparisons.
    Here the check is a step per node of the answer (5 per item)."""
    answer = orjson.dumps([{"n": i, "s": str(i)} for i in range(10_000)]).decode()
    schema = {"type": "array", "uniqueItems": True}
    verdict = check(fmt(schema), answer)
    assert verdict is not None and verdict.valid, verdict
    assert verdict.steps < 6 * 10_000
    dup = check(fmt(schema), '[{"a": [1, 2.0]}, {"b": 1}, {"a": [1.0, 2]}]')
    assert dup is not None and not dup.valid and "non-unique" in dup.error
    assert check(fmt(schema), "[1, true, [1], [true], {}, []]") == structured.Verdict(True)


def test_anchor_refs_do_not_re_crawl_the_schema_at_every_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """referencing crawls an uncrawled registry's whole schema for every `$anchor`
    lookup, and jsonschema looks one up per `$ref` applied: 2,000 anchors and 2,000
    properties referring to them were 33 s of the event loop (1,500 fit the event's
    limits: ~19 s). The registry is crawled once, when the request arrives."""
    n = 1_500
    schema = {
        "$defs": {f"a{i}": {"$anchor": f"a{i}", "type": "integer"} for i in range(n)},
        "type": "object",
        "properties": {f"p{i}": {"$ref": f"#a{i}"} for i in range(n)},
    }
    prepare(fmt(schema))
    crawls = []
    crawl = Registry.crawl

    def counted(self: Registry[Any]) -> Registry[Any]:
        crawls.append(1)
        return crawl(self)

    monkeypatch.setattr(Registry, "crawl", counted)
    verdict = check(fmt(schema), orjson.dumps({f"p{i}": i for i in range(n)}).decode())
    assert verdict == structured.Verdict(True)
    assert crawls == []

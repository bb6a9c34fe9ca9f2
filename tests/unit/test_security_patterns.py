"""Policy patterns: RE2 keeps hostile patterns linear, and refuses what it cannot run."""

from __future__ import annotations

import dataclasses
import functools
import time

import pytest
import re2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentstream.agents.security.patterns import (
    DEFAULT_SCAN_BUDGET_MS,
    MAX_PROGRAM_SIZE,
    MAX_SPAN_SEARCHES,
    PatternError,
    PatternList,
    _build_set,
    compile_pattern,
    cost_problems,
    unclosed_quote,
    validate_patterns,
    worst_case_inputs,
    worst_case_scan,
)
from agentstream.schemas.security import MAX_PATTERN_LENGTH, MAX_PATTERNS


def test_catastrophic_backtracking_pattern_finishes_in_milliseconds() -> None:
    text = ("a" * 50_000 + "!").encode()
    patterns = PatternList.build(["(a+)+$"])
    started = time.perf_counter()
    assert not patterns.any_match(text)
    assert patterns.matching(text) == []
    elapsed = time.perf_counter() - started
    # Python's `re` would not finish this in our lifetime; RE2 is linear in the text.
    assert elapsed < 0.05, elapsed


def test_nested_quantifiers_in_a_union_stay_linear() -> None:
    text = ("x" * 20_000 + "y" * 20_000 + "!").encode()
    patterns = PatternList.build(["(x+x+)+y$", "(.*a){12}", "(y|yy)+$", "secret"])
    started = time.perf_counter()
    assert not patterns.any_match(text)
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "invalid escape"),  # back-reference: needs backtracking
        ("(?=x)y", "invalid perl operator"),  # look-ahead
        ("(?<!x)y", "invalid perl operator"),  # look-behind
        ("a{1000}{1000}", "bad repetition"),
        ("(unclosed", "missing )"),
    ],
)
def test_dangerous_or_invalid_patterns_are_refused_by_name(pattern: str, why: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    assert repr(pattern) in str(info.value)
    assert why in str(info.value)


def test_program_size_is_bounded() -> None:
    with pytest.raises(PatternError, match="instructions"):
        compile_pattern(r"\pL{200}")
    assert compile_pattern(r"\w{100}").programsize < MAX_PROGRAM_SIZE


def test_length_and_count_are_bounded() -> None:
    with pytest.raises(PatternError, match="longer than"):
        compile_pattern("a" * (MAX_PATTERN_LENGTH + 1))
    with pytest.raises(PatternError, match="empty"):
        compile_pattern("")
    problems = validate_patterns(["ok"] * (MAX_PATTERNS + 1))
    assert problems == [f"{MAX_PATTERNS + 1} patterns (limit {MAX_PATTERNS})"]
    assert validate_patterns(["fine", "(?i)pass(word)?\\s*[:=]"]) == []


def test_union_and_individual_matches_agree() -> None:
    plist = PatternList.build(["(?i)password", "^report:", "sk-[A-Za-z0-9]{8,}", "^report:"])
    assert plist.patterns == ("(?i)password", "^report:", "sk-[A-Za-z0-9]{8,}")  # deduplicated
    assert plist.any_match(b"my PASSWORD is")
    assert plist.matching(b"report: key sk-abcdefgh12") == ["^report:", "sk-[A-Za-z0-9]{8,}"]
    assert not plist.any_match(b"nothing here, not a report:")
    # flags stay inside their alternative: (?i) does not leak into the others
    assert not PatternList.build(["(?i)x", "abc"]).any_match(b"ABC")
    assert PatternList.build(["café"]).any_match("un café".encode())
    assert not PatternList.build([])


# -- one meaning for a list: the Set agrees with the patterns searched one by one -----------

_LITERALS = ["a", "b", "ab", "é", r"\.", r"\\", r"\)", r"\(", r"\|", "-", " ", "Q", "E"]
_CLASSES = ["[ab]", "[^a]", "[a-c]", r"\d", r"\w", r"\s", ".", r"\pL", r"[\\\]]", "[[:alpha:]]"]
_QUOTES = [r"\Qa)\E", r"\Q(b|\E", r"\Qa\\E", r"\Qab", r"\Q)|", r"\Q"]  # the last 3 unclosed
_ASSERTIONS = ["^", "$", r"\b", r"\B", r"\A", r"\z"]
_FLAGS = ["(?i)", "(?s)", "(?m)", "(?U)", "(?i:", "(?P<g>", "(?P<h>"]


def _piece() -> st.SearchStrategy[str]:
    atom = st.sampled_from(_LITERALS + _CLASSES + _QUOTES + _ASSERTIONS)
    quantifier = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "*?", "{1,}"])

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map("|".join),
            st.tuples(st.sampled_from(["(", "(?:", *_FLAGS]), inner).map(
                lambda t: t[0] + t[1] + ")"
            ),
            st.tuples(st.sampled_from(_FLAGS[:4]), inner).map("".join),
            st.tuples(inner, quantifier).map("".join),
        )

    return st.recursive(st.tuples(atom, quantifier).map("".join), extend, max_leaves=5)


@functools.lru_cache(maxsize=4096)
def _valid(pattern: str) -> bool:
    return validate_patterns([pattern]) == []


_FRAGMENTS = [
    "a",
    "b",
    "c",
    "A",
    "B",
    "é",
    "É",
    " ",
    "\n",
    "-",
    ".",
    ")",
    "(",
    "|",
    "\\",
    "Q",
    "E",
    "1",
]


@st.composite
def _lists_and_text(draw: st.DrawFn, lists: int) -> tuple[list[list[str]], bytes]:
    # only what validate_patterns accepts counts: invalid pieces (an unclosed \Q, a named
    # group twice, a program too big) are dropped, lists left empty are skipped
    drawn = [
        [p for p in draw(st.lists(_piece(), min_size=1, max_size=5)) if _valid(p)]
        for _ in range(lists)
    ]
    assume(all(drawn))
    # text from short fragments and pieces of the patterns' own source (literal runs)
    sources = [p for lst in drawn for p in lst]
    fragment = st.one_of(st.sampled_from(_FRAGMENTS), st.sampled_from(sources))
    text = "".join(draw(st.lists(fragment, max_size=12)))
    return drawn, text.encode()


def _one_by_one(patterns: list[str], text: bytes) -> list[str]:
    unique = list(dict.fromkeys(patterns))
    return [p for p in unique if compile_pattern(p).search(text) is not None]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_lists_and_text(lists=1))
def test_a_list_matches_exactly_when_one_of_its_patterns_does(
    case: tuple[list[list[str]], bytes],
) -> None:
    (patterns,), text = case
    assert validate_patterns(patterns) == []
    plist = PatternList.build(patterns)
    expected = _one_by_one(patterns, text)
    assert plist.any_match(text) == bool(expected)
    assert plist.matching(text) == expected
    spans = plist.spans(text)
    assert spans == sorted(set(spans))
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert bool(spans) <= bool(expected)
    for pattern in expected:  # the leftmost match of every matching pattern is masked
        first = compile_pattern(pattern).search(text)
        assert first is not None
        if first.end() > first.start():
            assert first.span() in spans


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_lists_and_text(lists=3))
def test_the_union_of_several_policies_lists_agrees_too(
    case: tuple[list[list[str]], bytes],
) -> None:
    # what FitGroup does: one list of every fitting policy's blocked patterns
    lists, text = case
    union = [x for lst in lists for x in lst]
    plist = PatternList.build(x for lst in lists for x in lst)
    expected = _one_by_one(union, text)
    assert plist.any_match(text) == bool(expected)
    assert plist.matching(text) == expected
    assert plist.any_match(text) == any(PatternList.build(lst).any_match(text) for lst in lists)


@settings(max_examples=300, deadline=None)
@given(_piece())
def test_unclosed_quote_is_exactly_what_does_not_survive_a_group(pattern: str) -> None:
    # RE2 as the oracle: a valid pattern whose "(?:p)" is invalid is one whose \Q ran
    # past its end (and the ")" with it)
    try:
        re2.compile(pattern)
    except re2.error:
        assume(False)
    try:
        re2.compile(f"(?:{pattern})")
        wrapped_ok = True
    except re2.error:
        wrapped_ok = False
    assert unclosed_quote(pattern) == (not wrapped_ok)
    if unclosed_quote(pattern):
        assert "without a closing" in " ".join(validate_patterns([pattern]))


def test_an_unclosed_quote_cannot_swallow_another_policys_pattern() -> None:
    # Regression (main before this change): the string union "(?:\Qfoo)|(?:\Qpassword\E)"
    # is ONE literal, so any_match(b"my password is hunter2") was False on the union while
    # "\Qpassword\E" alone matches. Checked against a copy of the old PatternList.build /
    # any_match in /tmp: that copy returns False here; this test fails on the old code at
    # the pytest.raises (the old code accepted the list).
    text = b"my password is hunter2"
    with pytest.raises(PatternError, match=r"\\Q without a closing \\E"):
        PatternList.build([r"\Qfoo", r"\Qpassword\E"])
    assert validate_patterns([r"\Qfoo"]) == [
        "pattern '\\\\Qfoo' refused: \\Q without a closing \\E: everything after \\Q is "
        "matched as literal text; end the literal with \\E"
    ]
    assert validate_patterns([r"\Qfoo\E", r"\\Qfoo"]) == []  # closed; an escaped backslash
    # and the Set keeps each pattern on its own even for such a pattern (a stored policy
    # from before this check): the matcher itself cannot be swallowed
    patterns = (r"\Qfoo", r"\Qpassword\E")
    raw = PatternList(patterns, tuple(re2.compile(p) for p in patterns), _build_set(patterns))
    assert raw.any_match(text)
    assert raw.matching(text) == [r"\Qpassword\E"]
    assert raw.matching(b"xfoo") == [r"\Qfoo"]


def test_a_hidden_out_of_memory_never_reads_as_no_match() -> None:
    # google-re2's Set.Match returns [] when RE2's DFA runs out of memory; the sentinel
    # (\z, in every complete scan) tells that apart and the list is searched one by one
    class OutOfMemory:
        def Match(self, text: bytes) -> None:  # re2.Set's method name
            return None

    plist = dataclasses.replace(PatternList.build(["secret", "token"]), matcher=OutOfMemory())
    assert plist.any_match(b"a secret")
    assert plist.matching(b"a secret token") == ["secret", "token"]
    assert not plist.any_match(b"nothing")
    real = PatternList.build(["secret"]).matcher
    assert real is not None
    assert real.Match(b"nothing") == [1]  # only the sentinel: a complete scan


def test_spans_are_utf8_byte_ranges_of_every_match() -> None:
    plist = PatternList.build(["secret", "t.k.n", "x*", "nope"])
    text = "café secret token secret".encode()
    assert plist.spans(text) == [(6, 12), (13, 18), (19, 25)]
    assert text[6:12] == b"secret"
    assert PatternList.build(["x*"]).spans(b"axxbx") == [(1, 3), (4, 5)]  # empty ones skipped
    assert PatternList.build(["(?i)é+"]).spans("aÉé".encode()) == [(1, 5)]
    assert PatternList.build(["nope"]).spans(b"secret") == []
    assert PatternList.build([]).spans(b"secret") == []
    # past MAX_SPAN_SEARCHES matches, the rest of the text is one span (masks more, never less)
    many = PatternList.build(["a"]).spans(b"a" * (MAX_SPAN_SEARCHES + 100))
    assert len(many) == MAX_SPAN_SEARCHES + 1
    assert many[-1] == (MAX_SPAN_SEARCHES, MAX_SPAN_SEARCHES + 100)


# -- bounded cost at apply time -----------------------------------------------------------

#: ~190 characters, 12,000 instructions (under MAX_PROGRAM_SIZE): RE2's DFA has 2^1000
#: states for each piece, so every byte costs ~1,000s of NFA thread steps
STALLING = "[ab]*a[ab]{1000}[ab]*b[ab]{1000}" * 6
DOCS_POLICIES = [  # docs/security.md, with their max_message_size
    (
        [
            "(?i)password\\s*[:=]\\s*\\S+",
            "sk-[A-Za-z0-9]{20,}",
            "-----BEGIN [A-Z ]*PRIVATE KEY-----",
        ],
        16384,
    ),
    (["^report:", "^status:"], 65536),
]


def test_a_stalling_pattern_is_refused_quickly_and_by_name() -> None:
    assert validate_patterns([STALLING]) == []  # syntax and size are fine: only cost is not
    started = time.perf_counter()
    problems = cost_problems(["(?i)password\\s*[:=]", STALLING], 65536, DEFAULT_SCAN_BUDGET_MS)
    elapsed = time.perf_counter() - started
    assert len(problems) == 1
    assert "a worst-case scan of 65536 bytes takes ~" in problems[0]
    assert f"simplify pattern {STALLING[:77]!r}"[:-1] in problems[0]
    assert elapsed < 10, elapsed  # ~0.3 s here: never the full scan (seconds to minutes)
    cost = worst_case_scan([STALLING], 65536, budget_s=DEFAULT_SCAN_BUDGET_MS / 1000)
    assert cost.over_budget and cost.measured_bytes < 65536
    # ~1000x the budget's worth of margin is not needed: ~15x here, and a busy machine
    # only makes the stalling pattern look slower
    assert cost.ms > 3 * DEFAULT_SCAN_BUDGET_MS


@pytest.mark.parametrize(("patterns", "size"), DOCS_POLICIES)
def test_the_documented_policies_are_within_budget(patterns: list[str], size: int) -> None:
    assert cost_problems(patterns, size) == []
    cost = worst_case_scan(patterns, size)
    assert not cost.over_budget and cost.measured_bytes == size
    assert cost.ms < DEFAULT_SCAN_BUDGET_MS / 10  # ~1 ms here


def test_twenty_ordinary_patterns_are_checked_in_well_under_a_second() -> None:
    patterns = [  # the bench's kind (bench/stage_policy.py), two policies' worth
        p
        for i in range(2)
        for p in (
            rf"(?i)password{i}\s*[:=]\s*\S+",
            rf"sk-{i}[A-Za-z0-9]{{20,}}",
            rf"AKIA{i}[0-9A-Z]{{16}}",
            rf"(?i)secret[_-]?key{i}",
            rf"\b\d{{3}}-\d{{2}}-{i:04d}\b",
            rf"(?i)bearer{i}\s+[a-z0-9._-]{{10,}}",
            rf"-----BEGIN {i} PRIVATE KEY-----",
            rf"(?i)(drop|truncate)\s+table{i}",
            rf"(a+)+b{i}$",
            rf"(?i)confidential-{i}-[a-f0-9]{{8}}",
        )
    ]
    started = time.perf_counter()
    assert cost_problems(patterns, 65536) == []
    assert time.perf_counter() - started < 1.0


def test_worst_case_inputs_cover_classes_and_literals() -> None:
    inputs = worst_case_inputs(["[ab]*a[ab]{10}", "(?i)password\\s*[:=]"], 1000)
    assert all(len(text) == 1000 for text in inputs.values())
    assert any(set(text) <= set(b"ab") for text in inputs.values())
    assert b"passwordpassword" in inputs["literals"] or b"password" in inputs["literals"]
    assert worst_case_scan([], 1000).us == 0
    assert cost_problems(["a"], 0) == []

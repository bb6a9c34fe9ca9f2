"""Policy patterns: RE2 keeps hostile patterns linear, and refuses what it cannot run."""

from __future__ import annotations

import time

import pytest

from agents.security.patterns import (
    MAX_PROGRAM_SIZE,
    PatternError,
    PatternList,
    compile_pattern,
    validate_patterns,
)
from schemas.security import MAX_PATTERN_LENGTH, MAX_PATTERNS


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

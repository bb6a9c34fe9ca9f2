"""Policy patterns compiled with RE2: linear time in the input, whatever the pattern.

Python's `re` backtracks: ``(a+)+$`` against 50,000 ``a`` and a ``!`` would take longer
than the universe has left. RE2 guarantees time linear in the text and refuses the
constructs that need backtracking (back-references, look-around), so a policy author
cannot stall a worker by accident or on purpose. On top of that we bound what one pattern
may cost to build and keep: its length (schema), its compiled program size and the memory
RE2 may use for it.

Matching is `search` semantics (anywhere in the content). RE2 syntax: see
https://github.com/google/re2/wiki/Syntax — ``(?i)`` for case-insensitive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from schemas.security import MAX_PATTERN_LENGTH, MAX_PATTERNS

#: RE2's compiled program size ("instructions"): ``\w{100}`` is ~300, ``\pL{100}`` ~120,000.
MAX_PROGRAM_SIZE = 20_000
#: Memory RE2 may use for one pattern (program + DFA cache); beyond it DFA falls back to NFA.
PATTERN_MAX_MEM = 8 << 20
#: Memory for the union of a policy set's patterns (one scan per message).
UNION_MAX_MEM = 64 << 20


class PatternError(ValueError):
    """A pattern is invalid or too costly; the message names the pattern."""

    def __init__(self, pattern: str, reason: str) -> None:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        super().__init__(f"pattern {shown!r} refused: {reason}")
        self.pattern = pattern
        self.reason = reason


def _options(max_mem: int) -> Any:
    opts = re2.Options()
    opts.max_mem = max_mem
    opts.log_errors = False  # errors are raised (and reported) by us, not written to stderr
    opts.never_capture = True
    return opts


def compile_pattern(pattern: str) -> Any:
    """Compile one pattern or raise `PatternError` saying why it is refused."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(str(pattern), "empty pattern")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(pattern, f"longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = re2.compile(pattern, _options(PATTERN_MAX_MEM))
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise PatternError(
            pattern,
            f"{detail} (RE2 syntax only: no back-references or look-around, which need "
            "backtracking)",
        ) from None
    size = compiled.programsize
    if size > MAX_PROGRAM_SIZE:
        raise PatternError(
            pattern, f"compiles to {size} instructions (limit {MAX_PROGRAM_SIZE}); simplify it"
        )
    return compiled


def validate_patterns(patterns: Sequence[str]) -> list[str]:
    """Every problem with a list of patterns (empty list = all fine)."""
    problems = []
    if len(patterns) > MAX_PATTERNS:
        problems.append(f"{len(patterns)} patterns (limit {MAX_PATTERNS})")
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            problems.append(str(exc))
    return problems


@dataclass(frozen=True)
class PatternList:
    """Compiled patterns with a fast "does any match" and a slower "which match".

    The union ``(?:p1)|(?:p2)|...`` is one RE2 program, so a message is scanned once per
    list whatever its length. Which patterns matched is needed only for the reasons of a
    denial, so only then is each pattern searched on its own.
    """

    patterns: tuple[str, ...]
    compiled: tuple[Any, ...]
    union: Any | None

    @classmethod
    def build(cls, patterns: Iterable[str]) -> PatternList:
        unique = tuple(dict.fromkeys(patterns))
        compiled = tuple(compile_pattern(p) for p in unique)
        union = None
        if len(unique) > 1:
            try:
                union = re2.compile("|".join(f"(?:{p})" for p in unique), _options(UNION_MAX_MEM))
            except re2.error:
                union = None  # each pattern compiled on its own: search them one by one
        elif unique:
            union = compiled[0]
        return cls(unique, compiled, union)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def any_match(self, text: bytes) -> bool:
        if self.union is not None:
            return self.union.search(text) is not None
        return any(c.search(text) is not None for c in self.compiled)

    def matching(self, text: bytes) -> list[str]:
        return [p for p, c in zip(self.patterns, self.compiled, strict=True) if c.search(text)]

"""Policy patterns compiled with RE2: linear time in the input, whatever the pattern.

Python's `re` backtracks: ``(a+)+$`` against 50,000 ``a`` and a ``!`` would take longer
than the universe has left. RE2 guarantees time linear in the text and refuses the
constructs that need backtracking (back-references, look-around), so a policy author
cannot stall a worker by accident or on purpose. On top of that we bound what one pattern
may cost to build and keep: its length (schema), its compiled program size and the memory
RE2 may use for it.

Linear is not cheap, though: RE2's cost per byte grows with the number of NFA threads a
pattern keeps alive. ``[ab]*a[ab]{1000}`` (the "a 1000 bytes before here" language) has
2^1000 DFA states, so the DFA cache thrashes and every byte costs ~1,000s of thread
steps: 20-75 µs per byte, seconds for a 64 KiB message, where ordinary patterns take
~1-10 ns per byte.
Program size and memory limits do not catch that (``[ab]*a[ab]{250}`` is 256 instructions
and already ~2 µs per byte); measuring does: `worst_case_scan` / `cost_problems` time a
list over generated worst-case inputs at the policy's size limit, and `policy apply`
refuses lists over `DEFAULT_SCAN_BUDGET_MS`.

One list, one meaning: `PatternList.any_match` is exactly "some pattern, searched on its
own, matches". The list is an ``RE2::Set`` — each pattern parsed on its own, then
alternated as parsed expressions — never a string union ``(?:p1)|(?:p2)`` (in which a
``\\Q`` without ``\\E`` turns every later pattern into literal text).

Matching is `search` semantics (anywhere in the content). RE2 syntax: see
https://github.com/google/re2/wiki/Syntax — ``(?i)`` for case-insensitive.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from agentstream.schemas.security import MAX_PATTERN_LENGTH, MAX_PATTERNS

#: RE2's compiled program size ("instructions"): ``\w{100}`` is ~300, ``\pL{100}`` ~120,000.
#: Bounds memory and build time; it does not bound the scan time (see `worst_case_scan`).
MAX_PROGRAM_SIZE = 20_000
#: Memory RE2 may use for one pattern (program + DFA cache); beyond it DFA falls back to NFA.
PATTERN_MAX_MEM = 8 << 20
#: Memory for the RE2::Set of a list (one scan per message); a list too big for it is
#: searched pattern by pattern (same verdicts, slower).
UNION_MAX_MEM = 64 << 20
#: `PatternList.spans`: searches per pattern before the rest of the text is one span.
MAX_SPAN_SEARCHES = 256

#: Default `cost_problems` budget, ms: the worst-case evaluation (any_match + matching +
#: spans) of one list on a message of the policy's `max_message_size`. Measured at 64 KiB
#: on the 2-core development machine: the docs' example policies ~1 ms, the bench's 200
#: patterns together ~11 ms, plausible heavy patterns (``password.{0,100}[:=]``, an
#: ``.{0,40}`` key window, ``\pL`` classes) 4-20 ms; the stalling ``[ab]*a[ab]{1000}``
#: family 1.3-5 s (20-75 µs/byte). 100 ms sits near the geometric middle: ~10x above the
#: heaviest ordinary list and >10x below the stalling ones, so neither verdict flips on a
#: busy machine (noise only slows things, and a near-budget verdict is the best of three),
#: and one hostile max-size message costs a worker at most ~0.1 s.
DEFAULT_SCAN_BUDGET_MS = 100.0

#: `worst_case_scan`: first prefix scanned (then x4 until the full size, unless over
#: budget). Not smaller: a counted repetition keeps more threads alive with every byte up
#: to its count (RE2 allows 1000), so a 1 KiB prefix underestimates ``[ab]*a[ab]{1000}``
#: by ~4x; 4 KiB is within ~20 % of its full-size cost per byte.
_FIRST_PREFIX = 4096
_PREFIX_GROWTH = 4
#: never scan more than this many bytes: RE2 is linear, larger sizes are extrapolated
_MAX_MEASURED = 1 << 20
#: random block tiled to the input size (cheap to generate, period long enough for any
#: pattern RE2 accepts: counted repetitions stop at 1000)
_BLOCK = 16 << 10
#: at most this many distinct character-class alphabets get their own input
_MAX_CLASS_INPUTS = 8
#: `cost_problems`: time spent measuring patterns alone to name the most expensive one
_CULPRIT_SEARCH_S = 2.0
_SENTINEL = r"\z"  # matches at the end of every text: present in every complete Set scan


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
    opts.never_capture = True  # group 0 (the whole match) is still reported
    return opts


def unclosed_quote(pattern: str) -> bool:
    """True when a ``\\Q`` literal run is never closed by ``\\E`` (RE2 then takes the rest
    of the pattern literally). Exact for patterns RE2 accepts: outside ``\\Q...\\E`` a
    backslash always escapes the next character (``\\\\Q`` is a backslash and a Q), inside
    it only ``\\E`` is special, and a ``\\Q`` inside a character class is a syntax error."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "\\":
            i += 1
        elif pattern.startswith("\\Q", i):
            end = pattern.find("\\E", i + 2)
            if end < 0:
                return True
            i = end + 2
        else:
            i += 2
    return False


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
    if unclosed_quote(pattern):
        raise PatternError(
            pattern,
            "\\Q without a closing \\E: everything after \\Q is matched as literal text; "
            "end the literal with \\E",
        )
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


def _build_set(patterns: Sequence[str]) -> Any | None:
    """An unanchored RE2::Set of the patterns plus the end-of-text sentinel, or None when
    it cannot be built (too big for `UNION_MAX_MEM`)."""
    matcher = re2.Set.SearchSet(_options(UNION_MAX_MEM))
    try:
        for index, pattern in enumerate(patterns):
            if matcher.Add(pattern) != index:  # pragma: no cover - indices are sequential
                return None
        matcher.Add(_SENTINEL)
        matcher.Compile()
    except re2.error:
        return None
    return matcher


@dataclass(frozen=True)
class PatternList:
    """Compiled patterns with one-scan "does any match" and "which match".

    `matcher` is an RE2::Set: every pattern is parsed on its own (so flags, ``\\Q`` runs
    and anchors mean what they mean alone) and the parsed expressions are alternated
    into one DFA, so a message is scanned once per list whatever its length, and the
    scan says which patterns matched. The Python binding hides RE2::Set's "DFA out of
    memory" error (it returns no match): the sentinel ``\\z``, which matches at the end of
    every text, is in the result of every scan that reached the end, and a result
    without it is searched again pattern by pattern — never silently "no match".
    """

    patterns: tuple[str, ...]
    compiled: tuple[Any, ...]
    matcher: Any | None = field(repr=False)

    @classmethod
    def build(cls, patterns: Iterable[str]) -> PatternList:
        unique = tuple(dict.fromkeys(patterns))
        compiled = tuple(compile_pattern(p) for p in unique)
        return cls(unique, compiled, _build_set(unique) if unique else None)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def indices(self, text: bytes) -> list[int]:
        """Indices (in list order) of the patterns that match `text`."""
        if self.matcher is not None:
            hits = self.matcher.Match(text)
            sentinel = len(self.patterns)
            if hits and sentinel in hits:
                return sorted(i for i in hits if i != sentinel)
        return [i for i, c in enumerate(self.compiled) if c.search(text) is not None]

    def any_match(self, text: bytes) -> bool:
        if self.matcher is not None:
            hits = self.matcher.Match(text)
            if hits and len(self.patterns) in hits:  # the sentinel: the scan completed
                return len(hits) > 1
        return any(c.search(text) is not None for c in self.compiled)

    def matching(self, text: bytes) -> list[str]:
        """The patterns that match, in list order."""
        if not self.patterns:
            return []
        return [self.patterns[i] for i in self.indices(text)]

    def spans(self, text: bytes) -> list[tuple[int, int]]:
        """Byte ``[start, end)`` of every non-empty, non-overlapping match (leftmost first,
        as `re.finditer` walks them) of every matching pattern, sorted; spans of
        different patterns may overlap. After `MAX_SPAN_SEARCHES` searches for one
        pattern, the rest of the text from its next match on is one span (a pattern
        matching at every byte cannot cost a search per byte; masking errs on the side of
        hiding more)."""
        return self.spans_of(text, self.indices(text) if self.patterns else ())

    def spans_of(self, text: bytes, indices: Iterable[int]) -> list[tuple[int, int]]:
        """`spans` of the patterns at `indices` only (ones `indices` found matching
        `text`): for a caller that scanned `text` already and needs the spans of some of
        its matches."""
        out: set[tuple[int, int]] = set()
        end = len(text)
        for i in indices:
            compiled = self.compiled[i]
            pos = 0
            for _ in range(MAX_SPAN_SEARCHES):
                if pos > end:
                    break
                found = compiled.search(text, pos)
                if found is None:
                    break
                start, stop = found.span()
                if stop > start:
                    out.add((start, stop))
                    pos = stop
                else:
                    pos = start + 1
            else:
                if pos < end:
                    found = compiled.search(text, pos)
                    if found is not None and found.start() < end:
                        out.add((found.start(), end))
        return sorted(out)


# -- cost at apply time -------------------------------------------------------------------


@dataclass(frozen=True)
class ScanCost:
    """What the worst generated input costs a list, for a message of `size` bytes."""

    #: the message size the estimate is for
    size: int
    #: slowest whole evaluation (any_match + matching + spans), µs, for `size` bytes
    us: float
    #: the input that was slowest (see `worst_case_inputs`)
    input: str
    #: that input's cost per operation, µs for `size` bytes
    any_match_us: float
    matching_us: float
    spans_us: float
    #: bytes actually scanned for the estimate (< size: extrapolated linearly)
    measured_bytes: int
    #: the scan stopped early because the estimate exceeded the budget
    over_budget: bool

    @property
    def ms(self) -> float:
        return self.us / 1000


_META = set("\\.+*?()|[]{}^$")
_PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " \n"
_WORD = string.ascii_letters + string.digits + "_"
_LETTERS_WIDE = string.ascii_letters + "éüßжπ日"
_ESCAPE_CLASSES = {
    "d": string.digits,
    "D": string.ascii_letters + string.punctuation + " ",
    "w": _WORD,
    "W": string.punctuation.replace("_", "") + " \n",
    "s": " \t\n\r",
    "S": _WORD + string.punctuation,
    "p": _LETTERS_WIDE + string.digits,
    "P": string.digits + string.punctuation + " ",
    "C": _PRINTABLE,
}
_ESCAPE_LITERALS = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


def _bracket(pattern: str, i: int) -> tuple[str, int]:
    """The characters of the class starting at ``pattern[i] == '['`` (a printable sample
    for negated classes), and the index after it. Approximate: only feeds input
    generation."""
    j = i + 1
    negated = j < len(pattern) and pattern[j] == "^"
    j += negated
    members: list[str] = []
    first = True
    while j < len(pattern) and (pattern[j] != "]" or first):
        first = False
        if pattern.startswith("[:", j):
            close = pattern.find(":]", j)
            if close > 0:
                members.extend(string.ascii_letters + string.digits)
                j = close + 2
                continue
        char = pattern[j]
        if char == "\\" and j + 1 < len(pattern):
            esc = pattern[j + 1]
            if esc in _ESCAPE_CLASSES:
                members.extend(_ESCAPE_CLASSES[esc])
                j += 2
                if esc in "pP" and j < len(pattern) and pattern[j] == "{":
                    j = max(j, pattern.find("}", j) + 1)
                elif esc in "pP":
                    j += 1
                continue
            char = _ESCAPE_LITERALS.get(esc, esc)
            j += 2
        else:
            j += 1
        if j + 1 < len(pattern) and pattern[j] == "-" and pattern[j + 1] != "]":
            hi = pattern[j + 1]
            j += 2
            if hi == "\\" and j < len(pattern):
                hi = _ESCAPE_LITERALS.get(pattern[j], pattern[j])
                j += 1
            lo_cp, hi_cp = ord(char), ord(hi)
            if lo_cp <= hi_cp:
                step = max(1, (hi_cp - lo_cp + 1) // 64)  # a sample of wide ranges
                members.extend(chr(c) for c in range(lo_cp, hi_cp + 1, step))
            continue
        members.append(char)
    if negated:
        excluded = set(members)
        members = [c for c in _PRINTABLE if c not in excluded]
    return "".join(dict.fromkeys(members)), j + 1


def _pattern_parts(pattern: str) -> tuple[list[str], list[str]]:
    """(character-class alphabets, literal runs) of a pattern, approximately."""
    classes: list[str] = []
    literals: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            literals.append("".join(run))
            run.clear()

    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            esc = pattern[i + 1]
            if esc == "Q":
                end = pattern.find("\\E", i + 2)
                end = n if end < 0 else end
                run.extend(pattern[i + 2 : end])
                i = end + 2
                continue
            if esc in _ESCAPE_CLASSES:
                flush()
                classes.append(_ESCAPE_CLASSES[esc])
                i += 2
                if esc in "pP":
                    i = pattern.find("}", i) + 1 if pattern.startswith("{", i) else i + 1
                continue
            if esc.isalnum() and esc not in _ESCAPE_LITERALS:  # \b \B \A \z \x.. \1
                flush()
                i += 2
                continue
            run.append(_ESCAPE_LITERALS.get(esc, esc))
            i += 2
        elif char == "[":
            flush()
            members, i = _bracket(pattern, i)
            if members:
                classes.append(members)
        elif char == "(" and pattern.startswith("(?", i):
            flush()
            close = i + 2
            while close < n and pattern[close] not in ":)>":
                close += 1
            i = close + 1 if close < n and pattern[close] in ":)" else i + 2
        elif char == "{":
            flush()
            close = pattern.find("}", i)
            i = close + 1 if close > 0 else i + 1
        elif char == ".":
            flush()
            classes.append(_PRINTABLE)
            i += 1
        elif char in _META:
            flush()
            i += 1
        else:
            run.append(char)
            i += 1
    flush()
    return classes, literals


def _tile(block: str, size: int) -> bytes:
    raw = block.encode()
    return (raw * (size // len(raw) + 1))[:size] if raw else b""


def worst_case_inputs(patterns: Sequence[str], size: int, *, seed: int = 0) -> dict[str, bytes]:
    """Named inputs of `size` bytes meant to keep many of the patterns' NFA threads alive
    (random blocks tiled, deterministic for a seed):

    - ``ascii``: random printable ASCII;
    - ``pattern-chars``: random characters taken from the patterns' classes and literals;
    - ``class N``: random characters of one character class (``[ab]``, ``\\w``, ...);
    - ``literals``: the patterns' literal runs (``password``, ``sk-``, ``a``) repeated in
      random order, and ``literals+classes``: the same with class characters between.
    """
    rng = random.Random(seed)
    block = min(_BLOCK, max(size, 1))
    classes: list[str] = []
    literals: list[str] = []
    for pattern in patterns:
        c, lit = _pattern_parts(pattern)
        classes.extend(c)
        literals.extend(lit)
    classes = list(dict.fromkeys(x for x in classes if x))
    literals = list(dict.fromkeys(x for x in literals if x))

    def random_text(alphabet: str) -> str:
        return "".join(rng.choices(alphabet, k=block))

    def from_pieces(pieces: list[str]) -> str:
        out: list[str] = []
        length = 0
        while length < block:
            piece = rng.choice(pieces)
            out.append(piece)
            length += len(piece)
        return "".join(out)

    inputs = {"ascii": random_text(_PRINTABLE)}
    mentioned = "".join(dict.fromkeys("".join(classes) + "".join(literals)))
    if mentioned:
        inputs["pattern-chars"] = random_text(mentioned)
    # the narrowest classes first: they are what keeps counted repetitions alive
    for number, alphabet in enumerate(sorted(classes, key=len)[:_MAX_CLASS_INPUTS]):
        inputs[f"class {number} {alphabet[:12]!r}"] = random_text(alphabet)
    if literals:
        inputs["literals"] = from_pieces(literals)
        if classes:
            sample = [rng.choice(a) * rng.randint(1, 3) for a in classes for _ in range(4)]
            inputs["literals+classes"] = from_pieces(literals + sample)
    return {name: _tile(text, size) for name, text in inputs.items()}


def _time_evaluation(patterns: Sequence[str], text: bytes) -> tuple[float, float, float]:
    """Seconds for any_match, matching and spans on a freshly built list (cold DFA cache:
    a hostile sender can send texts that each need new states)."""
    plist = PatternList.build(patterns)
    started = time.perf_counter()
    plist.any_match(text)
    t_any = time.perf_counter()
    plist.matching(text)
    t_matching = time.perf_counter()
    plist.spans(text)
    t_spans = time.perf_counter()
    return t_any - started, t_matching - t_any, t_spans - t_matching


def _estimate(
    patterns: Sequence[str], text: bytes, size: int, budget_s: float | None
) -> tuple[tuple[float, float, float], int, bool]:
    """(seconds per operation for `size` bytes, bytes measured, over budget): scan
    prefixes growing x4, stopping as soon as the linear extrapolation exceeds the budget
    (the best of three decides when it is within 4x of the budget)."""
    limit = min(size, _MAX_MEASURED)
    measured = min(limit, _FIRST_PREFIX)
    budget = float("inf") if budget_s is None else budget_s
    while True:
        scale = size / measured
        any_s, matching_s, spans_s = _time_evaluation(patterns, text[:measured])
        if budget < (any_s + matching_s + spans_s) * scale < 4 * budget:
            # near the budget: noise (a busy machine) only makes things slower, so the
            # best of three decides
            for _ in range(2):
                again = _time_evaluation(patterns, text[:measured])
                if sum(again) < any_s + matching_s + spans_s:
                    any_s, matching_s, spans_s = again
        over = (any_s + matching_s + spans_s) * scale > budget
        if over or measured >= limit:
            return (any_s * scale, matching_s * scale, spans_s * scale), measured, over
        measured = min(limit, measured * _PREFIX_GROWTH)


def worst_case_scan(
    patterns: Sequence[str], size: int, *, budget_s: float | None = None, seed: int = 0
) -> ScanCost:
    """The slowest evaluation (any_match + matching + spans) of `patterns` over
    `worst_case_inputs` of `size` bytes.

    Each input is scanned on a prefix first (4 KiB, then x4 up to `size`, at most 1 MiB)
    and the time extrapolated linearly (RE2 is linear in the text; `spans` is too, thanks
    to `MAX_SPAN_SEARCHES`). With a budget, it stops as soon as an estimate exceeds it
    (``over_budget``), so a pattern that would take a minute costs a fraction of a
    second to refuse; without one every input is measured to the full size.
    """
    worst = ScanCost(size, 0.0, "", 0.0, 0.0, 0.0, 0, False)
    if not patterns or size <= 0:
        return worst
    for name, text in worst_case_inputs(patterns, size, seed=seed).items():
        ops, measured, over = _estimate(patterns, text, size, budget_s)
        us = sum(ops) * 1e6
        if us > worst.us or over:
            worst = ScanCost(
                size, us, name, ops[0] * 1e6, ops[1] * 1e6, ops[2] * 1e6, measured, over
            )
        if over:
            break
    return worst


def cost_problems(
    patterns: Sequence[str], size: int, budget_ms: float = DEFAULT_SCAN_BUDGET_MS
) -> list[str]:
    """Human-readable refusals when the worst-case evaluation of a message of `size` bytes
    exceeds `budget_ms`, naming the most expensive pattern (measured alone on the input
    that was worst for the list). Empty when within budget. Assumes the patterns are
    valid (`validate_patterns` first)."""
    if not patterns or size <= 0:
        return []
    budget_s = budget_ms / 1000
    cost = worst_case_scan(patterns, size, budget_s=budget_s)
    if not cost.over_budget and cost.us <= budget_ms * 1000:
        return []
    text = worst_case_inputs(patterns, size)[cost.input]
    measured = max(cost.measured_bytes, 1)
    scale = size / measured
    alone: dict[str, float] = {}
    started = time.perf_counter()
    for pattern in dict.fromkeys(patterns):
        alone[pattern] = sum(_time_evaluation([pattern], text[:measured])) * scale * 1000
        if time.perf_counter() - started > _CULPRIT_SEARCH_S:
            break  # many slow patterns: name the worst found so far
    culprit = max(alone, key=lambda p: alone[p])
    others = sum(1 for p, ms in alone.items() if ms > budget_ms and p != culprit)
    shown = culprit if len(culprit) <= 80 else culprit[:77] + "..."
    at_least = " or more" if cost.measured_bytes < size else ""
    problem = (
        f"a worst-case scan of {size} bytes takes ~{cost.ms:.0f} ms{at_least} (budget "
        f"{budget_ms:g} ms, input {cost.input}); simplify pattern {shown!r} "
        f"(~{alone[culprit]:.0f} ms alone)"
    )
    if others:
        problem += f" and {others} other pattern(s) over budget alone"
    elif alone[culprit] <= budget_ms:
        problem += "; no pattern alone is over budget: split the list or simplify several"
    return [problem]

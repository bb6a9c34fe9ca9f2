"""Structured output: check a final answer against the request's `response_format`.

`json_schema` answers must be JSON matching the schema (JSON Schema, draft 2020-12 unless
the schema's `$schema` names another, validated by the `jsonschema` library);
`json_object` answers must be a JSON object; `text` is not checked.

The schema comes from whoever may publish requests, and the check runs on the worker's
event loop, so the schema is treated as hostile. Its size in the event is bounded
(`schemas.llm.ResponseFormat`), but the work of a check is not its size: forty `$defs`,
each a `oneOf` of two `$ref`s to the next, are 2.6 KB and 2^40 branches to evaluate. So:

* When the request arrives (`prepare`, before any provider is called) the schema is
  surveyed (`_Survey`) and refused (`InvalidResponseFormat`) unless checking an answer
  against it is bounded: every `$ref` resolves inside the schema, to a subschema; with
  every `$ref` expanded (and recursion unrolled down to the answer's depth limit) at
  most `MAX_EXPANDED_SCHEMA` subschemas apply to any one place of an answer, nested at
  most `MAX_SCHEMA_NESTING` deep; no `$ref` comes back to itself at the same place of
  the answer (that never ends). What would make the survey inexact is refused too:
  `$dynamicRef` / `$recursiveRef` (dynamic scope), `$id` below the root (several
  documents in one), draft 3 (`type` and `extends` hold schemas).
* `pattern` is matched with RE2 (linear time, as the security agent's policy patterns),
  not Python's backtracking `re`; a pattern compiling to more than `MAX_PATTERN_PROGRAM`
  instructions is refused. `patternProperties` is refused (jsonschema matches it with
  `re`), and so are `unevaluatedProperties` / `unevaluatedItems` (jsonschema re-walks
  the schema for them and compares keys in lists: quadratic in the answer).
* The check itself is metered, as a backstop: every keyword applied costs a step, plus
  the work inside it (items of the answer it walks, values of an `enum`, bytes times RE2
  instructions of a `pattern` scan, the part of the answer an error message quotes), and
  a check over `MAX_CHECK_STEPS` stops: the answer is reported not valid, saying it was
  not checked. A budget rather than a thread: a thread cannot be stopped.
* `$ref` resolves inside the schema only: the validator gets a `referencing` registry
  holding the schema alone, which retrieves nothing. (Without one, jsonschema 4.x still
  fetches remote `$ref`s with urllib — a request could make the worker connect anywhere.)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
import re2
import referencing.jsonschema
from jsonschema import exceptions, validators
from referencing import Registry
from referencing.exceptions import Unresolvable

from agentstream.schemas.llm import ResponseFormat
from agentstream.streams.errors import ProviderRequestError

#: deepest answer checked; deeper JSON is reported invalid rather than recursed into
MAX_ANSWER_DEPTH = 64
#: the most subschemas (each `const` / `enum` item counting one more) that apply to one
#: place of an answer, every `$ref` expanded. Twice what a schema within the event's
#: 10,000 keys and values can hold without `$ref`s: room to reuse definitions.
MAX_EXPANDED_SCHEMA = 20_000
#: the deepest chain of subschemas one evaluation follows ($refs included). jsonschema
#: takes 2-3 Python frames for each (measured: `not` 2.7, `if` 2.5, `allOf` and `$ref`
#: 2): 200 is ~530 frames, inside Python's 1,000 with the worker's own stack (a few
#: dozen) below it. Past the limit a RecursionError can surface inside `rpds` (Rust,
#: under `referencing`) as a PanicException, a BaseException nothing catches. Recursive
#: schemas take 2-3 per level of answer (a tree's `children: {items: {$ref: "#"}}` 3 per
#: two levels, a linked list's `next: {anyOf: [{$ref: "#"}, null]}` 3 per level): 64
#: levels of answer fit.
MAX_SCHEMA_NESTING = 200
#: the survey's own work: a step per subschema considered at one depth of the answer and
#: per keyword and subschema it holds (~1.5 µs each: at most ~0.15 s, less than
#: jsonschema's own check of a schema of 500 properties). A recursive schema is considered
#: once per level of answer it can reach: one of ~1,500 subschemas per level is over it.
MAX_SURVEY_STEPS = 100_000
#: steps one answer's check may take. A step is ~3 µs of jsonschema (a simple keyword;
#: ~11 µs for a `$ref` to a `oneOf` that fails): at most ~1 s of the event loop. An answer
#: of 5,000 closed objects of two typed properties is ~65,000.
MAX_CHECK_STEPS = 100_000
#: RE2 instructions one pattern may compile to (``\\pL{16}`` is ~19,000), and all the
#: patterns of a schema together (compiling is ~50 ns per instruction)
MAX_PATTERN_PROGRAM = 20_000
MAX_SCHEMA_PROGRAM = 200_000
#: a pattern scan costs a step per this many characters times (instructions + 16). RE2 takes
#: up to ~10 ns per byte and instruction when its DFA thrashes (``[ab]*a[ab]{1000}``);
#: a character is up to 4 bytes: 128 * 4 * 10 ns ≈ 5 µs, about a step.
_SCAN_PER_STEP = 128
_PATTERN_MAX_MEM = 8 << 20
#: an answer's (or schema value's) size, as a step of work per node and per KiB of text
_TEXT_PER_STEP = 1024


class InvalidResponseFormat(ProviderRequestError):
    """The request's `response_format` schema cannot be used (no provider is called)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    valid: bool
    error: str = ""
    #: the check's work, in steps (see `MAX_CHECK_STEPS`)
    steps: int = field(default=0, compare=False)


def prepare(fmt: ResponseFormat | None) -> Any:
    """The checker of a response format (cached per schema), or None when the answer is
    not checked. Raises `InvalidResponseFormat` for a schema that cannot be used."""
    if fmt is None or fmt.type != "json_schema" or fmt.json_schema is None:
        return None
    built = _checker(orjson.dumps(fmt.json_schema["schema"], option=orjson.OPT_SORT_KEYS))
    if isinstance(built, str):
        raise InvalidResponseFormat(built)  # a fresh one: a cached one's traceback grows
    return built


def check(fmt: ResponseFormat | None, content: str) -> Verdict | None:
    """Does `content` satisfy `fmt`? None when there is nothing to check (`text`).
    Raises `InvalidResponseFormat` as `prepare` does."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        return Verdict(False, f"not JSON: {exc}"[:500])
    if _depth_over(value, MAX_ANSWER_DEPTH):
        return Verdict(False, f"nested deeper than {MAX_ANSWER_DEPTH} levels")
    if fmt.type == "json_object":
        return Verdict(True) if isinstance(value, dict) else Verdict(False, "not a JSON object")
    validator = prepare(fmt)
    meter = _Meter(MAX_CHECK_STEPS, _answer_sizes(value))
    token = _METER.set(meter)
    try:
        error = exceptions.best_match(validator.iter_errors(value))
    except _OverBudget:
        return Verdict(
            False,
            f"not checked: over {MAX_CHECK_STEPS} steps of work against this schema",
            steps=meter.used,
        )
    except Unresolvable as exc:  # the survey resolved every $ref: not expected
        return Verdict(False, f"schema reference cannot be resolved: {exc}"[:500], meter.used)
    finally:
        _METER.reset(token)
    if error is None:
        return Verdict(True, steps=meter.used)
    return Verdict(False, f"{_where(error)}{error.message}"[:500], steps=meter.used)


def clear_cache() -> None:
    """Forget the checkers built so far (tests that change the limits)."""
    _checker.cache_clear()


@lru_cache(maxsize=128)
def _checker(schema_json: bytes) -> Any:
    """The validator of a schema, or why the schema is refused (refusals are cached too:
    a sender repeating one costs a lookup, not a survey)."""
    try:
        return _build(orjson.loads(schema_json))
    except InvalidResponseFormat as exc:
        return str(exc)
    except Exception as exc:  # the sender's schema, whatever jsonschema makes of it
        # jsonschema assumes well-formed keywords it reads before checking the schema
        # (`$schema` a string, `$id` a URL): a list there raises TypeError, an unclosed
        # IPv6 literal ValueError. The schema is the sender's: refuse it, as any other
        return f"response_format: the schema cannot be used: {type(exc).__name__}: {exc}"[:300]


def _build(schema: Any) -> Any:
    base = validators.validator_for(schema, default=validators.Draft202012Validator)
    if base is validators.Draft3Validator:
        raise InvalidResponseFormat("response_format: draft-03 schemas are not supported")
    try:
        base.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise InvalidResponseFormat(
            f"response_format: not a valid JSON Schema: {_where(exc)}{exc.message[:300]}"
        ) from None
    survey = _Survey(schema, base)
    cls = validators.extend(base, survey.metered_keywords())
    return cls(schema, registry=survey.registry)


# -- the survey ------------------------------------------------------------------------------
#: where a keyword applies its subschemas: at the same place of the answer (None), or to
#: the answer's children — ("object", name) to one property, ("array", index) to one item,
#: "*" to every child of that kind
_Kind = tuple[str, Any] | None
_ONE, _MANY, _MAP = "one", "many", "map"
_APPLICATORS: dict[str, tuple[str, _Kind]] = {
    "allOf": (_MANY, None),
    "anyOf": (_MANY, None),
    "oneOf": (_MANY, None),
    "not": (_ONE, None),
    "if": (_ONE, None),
    "then": (_ONE, None),
    "else": (_ONE, None),
    "dependentSchemas": (_MAP, None),
    "dependencies": (_MAP, None),  # draft 4-7; its arrays of names are skipped
    "properties": (_MAP, ("object", None)),  # None: the property's own name
    "patternProperties": (_MAP, ("object", "*")),
    "additionalProperties": (_ONE, ("object", "*")),
    "unevaluatedProperties": (_ONE, ("object", "*")),
    "propertyNames": (_ONE, ("object", "*")),
    "prefixItems": (_MANY, ("array", None)),  # None: the item's own index
    "items": (_ONE, ("array", "*")),  # a list of schemas in draft 4-2019: as prefixItems
    "additionalItems": (_ONE, ("array", "*")),
    "contains": (_ONE, ("array", "*")),
    "unevaluatedItems": (_ONE, ("array", "*")),
}
#: keywords refused wherever the schema's draft evaluates them, and why
_REFUSED = {
    "patternProperties": "use properties",
    "unevaluatedProperties": "use additionalProperties",
    "unevaluatedItems": "use items",
    "$dynamicRef": "use $ref",
    "$recursiveRef": "use $ref",
}
#: where subschemas live that only `$ref`s apply
_CONTAINERS = ("$defs", "definitions")
#: keywords whose value an error message quotes, or which compare the answer with it:
#: charged by the value's size
_SIZED = ("const", "enum", "not", "oneOf")
#: `$ref`s: applicators too (`$dynamicRef` and `$recursiveRef` are refused)
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")
#: applicators whose own error quotes the answer (their errors are charged up front)
_QUOTE_ANSWER = frozenset({"anyOf", "oneOf", "not", "contains"})
#: keywords that walk the answer's items or properties
_WALK_ANSWER = frozenset(
    {"additionalProperties", "propertyNames", "items", "prefixItems", "additionalItems"}
    | {"contains", "patternProperties"}
)
#: keywords that walk their own value (names, branches)
_WALK_VALUE = frozenset(
    {"required", "dependentRequired", "dependencies", "dependentSchemas", "properties"}
    | {"allOf", "anyOf", "oneOf"}
)
#: beyond this many kinds of child, a subschema's per-child costs are folded into one
#: cost for every child (their maximum: never less than the truth)
_MAX_KINDS = 64


@dataclass(frozen=True, slots=True)
class _Cost:
    """A subschema applied at one place of an answer (at some depth)."""

    #: subschemas that apply at that place, every $ref expanded
    here: int
    #: per kind of child: the most subschemas that apply at one place under such a child
    below: dict[tuple[str, Any], int]
    #: the most that apply at any one place, here or below
    worst: int
    #: the longest chain of subschemas an evaluation from here follows
    height: int


_NOTHING = _Cost(0, {}, 0, 0)
_LEAF = _Cost(1, {}, 1, 1)  # true / false


class _Survey:
    """What admission learns of a schema: whether checking answers against it is bounded
    (else `InvalidResponseFormat`), its patterns compiled, the sizes its keywords are
    charged by. One pass over the schema's tree, then a memoised walk of the $ref graph
    (each subschema once per depth of the answer it can apply at)."""

    def __init__(self, schema: Any, cls: Any) -> None:
        self.cls = cls
        meta = cls.META_SCHEMA
        self.spec = referencing.jsonschema.specification_with(
            meta.get("$id") or meta.get("id") or "",
            default=referencing.jsonschema.DRAFT202012,
        )
        resource = self.spec.create_resource(schema)
        # crawled once here: referencing re-crawls the whole schema at every `$anchor`
        # lookup of an uncrawled registry, and jsonschema looks one up per `$ref` applied
        self.registry = Registry().with_resource(resource.id() or "", resource).crawl()
        self.resolver = self.registry.resolver_with_root(resource)
        #: pattern → (compiled, RE2 instructions)
        self.patterns: dict[str, tuple[Any, int]] = {}
        #: id of a `_SIZED` keyword's value → its size in steps
        self.sizes: dict[int, int] = {}
        self._schemas: set[int] = set()  # ids of the tree's subschemas (objects)
        self._program = 0
        self._targets: dict[str, Any] = {}
        self._memo: dict[tuple[int, int], _Cost] = {}
        self._leaves: dict[int, _Cost] = {}  # subschemas applying no others: any depth
        self._open: set[tuple[int, int]] = set()
        self._work = 0
        self._scan(schema)
        self._cost(schema, 0, 1, None)
        self._memo.clear()
        self._leaves.clear()

    def _evaluates(self, keyword: str) -> bool:
        """Does the schema's draft apply this keyword (else jsonschema ignores it)?"""
        known = self.cls.VALIDATORS
        return keyword in known or (keyword in ("then", "else") and "if" in known)

    def _scan(self, root: Any) -> None:
        """Every subschema of the tree, $refs not followed: refuse what cannot be bounded,
        compile the patterns, size the values errors quote."""
        stack = [root]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict):
                continue
            self._schemas.add(id(node))
            if node is not root and (uri := self.spec.id_of(node)) is not None:
                raise InvalidResponseFormat(
                    f"response_format: $id {str(uri)[:80]!r} below the root is not "
                    "supported (one schema document: use $defs and $ref)"
                )
            for key, instead in _REFUSED.items():
                if key in node and self._evaluates(key):
                    raise InvalidResponseFormat(
                        f"response_format: {key} is not supported ({instead})"
                    )
            pattern = node.get("pattern")
            if isinstance(pattern, str) and self._evaluates("pattern"):
                self._compile(pattern)
            for key in _SIZED:
                if key in node and self._evaluates(key):
                    self.sizes[id(node[key])] = _size(node[key])
            stack.extend(child for child, _ in self._subschemas(node))
            for key in _CONTAINERS:
                defs = node.get(key)
                if isinstance(defs, dict):
                    if not _meta_schema_checks(self.cls, key):
                        for name, each in defs.items():
                            self._check_definition(key, name, each)
                    stack.extend(defs.values())

    def _check_definition(self, key: str, name: str, schema: Any) -> None:
        """A definition the draft's meta-schema does not look into (`$defs` of a draft-07
        schema): checked on its own, as a `$ref` may lead to it."""
        try:
            self.cls.check_schema(schema)
        except exceptions.SchemaError as exc:
            raise InvalidResponseFormat(
                f"response_format: not a valid JSON Schema: at /{key}/{name[:80]}"
                f"{'/' if exc.absolute_path else ''}"
                f"{'/'.join(str(p) for p in exc.absolute_path)}: {exc.message[:300]}"
            ) from None

    def _compile(self, pattern: str) -> None:
        if pattern in self.patterns:
            return
        try:
            compiled = re2.compile(pattern, _re2_options())
        except re2.error as exc:
            raise InvalidResponseFormat(
                f"response_format: pattern {pattern[:80]!r} is not RE2 syntax: {exc}"
            ) from None
        program = compiled.programsize
        if program > MAX_PATTERN_PROGRAM:
            raise InvalidResponseFormat(
                f"response_format: pattern {pattern[:80]!r} compiles to {program} RE2 "
                f"instructions (at most {MAX_PATTERN_PROGRAM}); simplify it"
            )
        self._program += program
        if self._program > MAX_SCHEMA_PROGRAM:
            raise InvalidResponseFormat(
                f"response_format: the patterns compile to over {MAX_SCHEMA_PROGRAM} RE2 "
                "instructions in all"
            )
        self.patterns[pattern] = (compiled, program)

    def _subschemas(self, node: dict[str, Any]) -> Iterator[tuple[Any, _Kind]]:
        """The subschemas `node` applies itself, and where (see `_APPLICATORS`)."""
        for key, value in node.items():
            shape, kind = _APPLICATORS.get(key, (None, None))
            if shape is None or not self._evaluates(key):
                continue
            if key == "items" and isinstance(value, list):
                shape, kind = _MANY, ("array", None)
            if shape == _ONE:
                children: Iterable[tuple[Any, Any]] = [(None, value)]
            elif shape == _MANY:
                children = enumerate(value) if isinstance(value, list) else ()
            else:
                children = value.items() if isinstance(value, dict) else ()
            for name, child in children:
                if isinstance(child, dict | bool):
                    yield child, (kind if kind is None or kind[1] else (kind[0], name))

    def _target(self, ref: str) -> Any:
        if ref in self._targets:
            return self._targets[ref]
        try:
            target = self.resolver.lookup(ref).contents
        except (Unresolvable, ValueError):  # ValueError: urljoin of a malformed URI
            raise InvalidResponseFormat(
                f"response_format: $ref {ref[:80]!r} does not resolve inside the schema "
                "(other documents are never fetched)"
            ) from None
        if not isinstance(target, bool) and id(target) not in self._schemas:
            raise InvalidResponseFormat(
                f"response_format: $ref {ref[:80]!r} leads to {type(target).__name__} "
                "data that is not a subschema"
            )
        self._targets[ref] = target
        return target

    def _cost(self, node: Any, depth: int, nesting: int, via: str | None) -> _Cost:
        """`node` applied at a place `depth` levels into the answer, `nesting` subschemas
        into the evaluation; `via` is the $ref followed to it."""
        if depth > MAX_ANSWER_DEPTH:  # deeper answers are refused before any check
            return _NOTHING
        if not isinstance(node, dict):
            return _LEAF
        self._work += 1
        leaf = self._leaves.get(id(node))
        if leaf is not None:
            return leaf
        key = (id(node), depth)
        done = self._memo.get(key)
        if done is None and key in self._open:
            at = f" ($ref {via[:80]!r})" if via is not None else ""
            raise InvalidResponseFormat(
                f"response_format: the schema refers back to itself{at} at the same place "
                "of the answer: checking would never end"
            )
        if nesting - 1 + (done.height if done else 1) > MAX_SCHEMA_NESTING:
            raise InvalidResponseFormat(
                f"response_format: subschemas nest more than {MAX_SCHEMA_NESTING} deep "
                f"($refs followed, down to the answer's {MAX_ANSWER_DEPTH} levels)"
            )
        if done is not None:
            return done
        edges: list[tuple[Any, _Kind, str | None]] = [
            (child, kind, None) for child, kind in self._subschemas(node)
        ]
        ref = node.get("$ref")
        if isinstance(ref, str):
            edges.append((self._target(ref), None, ref))
        self._work += len(node) + len(edges)
        if self._work > MAX_SURVEY_STEPS:
            raise InvalidResponseFormat(
                f"response_format: the schema is too large to survey (over "
                f"{MAX_SURVEY_STEPS} steps): simplify it"
            )
        here = 1 + sum(self.sizes.get(id(node[k]), 0) for k in ("const", "enum") if k in node)
        if not edges:  # most subschemas: the same at every depth
            self._leaves[id(node)] = _Cost(here, {}, here, 1)
            return self._leaves[id(node)]
        self._open.add(key)
        below: dict[tuple[str, Any], int] = {}
        height = 0
        for child, kind, through in edges:
            if kind is None:
                cost = self._cost(child, depth, nesting + 1, through)
                here += cost.here
                for k, v in cost.below.items():
                    below[k] = below.get(k, 0) + v
                self._work += len(cost.below)
            else:
                cost = self._cost(child, depth + 1, nesting + 1, through)
                below[kind] = below.get(kind, 0) + cost.worst
            height = max(height, cost.height)
        self._open.discard(key)
        if len(below) > _MAX_KINDS:
            below = {(family, "*"): n for family, n in _per_family(below).items()}
        worst = max(here, *_per_family(below).values())
        if worst > MAX_EXPANDED_SCHEMA:
            raise InvalidResponseFormat(
                "response_format: with its $refs expanded, the schema applies more than "
                f"{MAX_EXPANDED_SCHEMA} subschemas to one place of the answer"
            )
        cost = _Cost(here, below, worst, height + 1)
        self._memo[key] = cost
        return cost

    # -- the metered check ---------------------------------------------------------------
    def metered_keywords(self) -> dict[str, Any]:
        """Every keyword of the draft, charging the check's meter before it works."""
        own = {"pattern": self._pattern, "uniqueItems": _unique_items}
        return {
            keyword: _metered(keyword, own.get(keyword, apply), self.sizes)
            for keyword, apply in self.cls.VALIDATORS.items()
        }

    def _pattern(self, validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
        if not validator.is_type(instance, "string"):
            return
        compiled, program = self.patterns[pattern]  # every pattern applied was surveyed
        meter = _METER.get()
        if meter is not None:  # before the scan: an over-budget scan never starts
            meter.charge(len(instance) * (program + 16) // _SCAN_PER_STEP)
        if not compiled.search(instance):
            yield exceptions.ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


def _per_family(below: dict[tuple[str, Any], int]) -> dict[str, int]:
    """The most subschemas at one place under one child, per kind of child (object /
    array): those for every child plus the most of those for one named child."""
    every: dict[str, int] = {}
    named: dict[str, int] = {}
    for (family, which), n in below.items():
        if which == "*":
            every[family] = every.get(family, 0) + n
        else:
            named[family] = max(named.get(family, 0), n)
    return {f: every.get(f, 0) + named.get(f, 0) for f in every.keys() | named.keys()} or {"": 0}


@lru_cache(maxsize=16)
def _meta_schema_checks(cls: Any, container: str) -> bool:
    """Does the draft's meta-schema check the subschemas under `container`?"""
    try:
        cls.check_schema({container: {"x": {"type": 12}}})
    except exceptions.SchemaError:
        return True
    return False


def _re2_options() -> Any:
    opts = re2.Options()
    opts.max_mem = _PATTERN_MAX_MEM
    opts.log_errors = False  # errors are reported by us, not written to stderr
    opts.never_capture = True  # match or not is all the check needs
    return opts


def _size(value: Any) -> int:
    """A JSON value's size in steps: a node each, and a step per KiB of text."""
    total = 0
    stack = [value]
    while stack:
        node = stack.pop()
        total += 1
        if isinstance(node, str):
            total += len(node) // _TEXT_PER_STEP
        elif isinstance(node, dict):
            total += sum(len(k) // _TEXT_PER_STEP for k in node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


# -- the meter -------------------------------------------------------------------------------
class _OverBudget(Exception):
    """The check took more than `MAX_CHECK_STEPS` steps."""


class _Meter:
    """One check's budget. The answer's container sizes are measured once up front, so
    charging for an error message that quotes a part of it is a lookup."""

    __slots__ = ("left", "sizes", "used")

    def __init__(self, steps: int, sizes: dict[int, int]) -> None:
        self.left = steps
        self.used = 0
        self.sizes = sizes

    def charge(self, steps: int) -> None:
        self.used += steps
        self.left -= steps
        if self.left < 0:
            raise _OverBudget

    def weight(self, instance: Any) -> int:
        if isinstance(instance, str):
            return 1 + len(instance) // _TEXT_PER_STEP
        if isinstance(instance, dict | list):
            return self.sizes.get(id(instance), 1 + len(instance))
        return 1

    def quoted(self, errors: Iterable[Any], instance: Any, extra: int) -> Iterator[Any]:
        """An assertion's errors, each charged by what its message quotes (the answer,
        and the keyword's value for `enum` / `const`)."""
        for error in errors:
            self.charge(1 + self.weight(instance) + extra)
            yield error


_METER: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar(
    "structured_output_meter", default=None
)


def _metered(keyword: str, apply: Any, sizes: dict[int, int]) -> Any:
    """`apply` charging the check's meter for the work it is about to do.

    Applicators (keywords applying subschemas: errors from below pass through them) are
    charged up front, their own errors included, and return jsonschema's generator as
    it is: wrapping it would add a Python frame to every level of the evaluation (see
    `MAX_SCHEMA_NESTING`). Assertions, the leaves, charge each error they make."""
    walks_answer = keyword in _WALK_ANSWER
    walks_value = keyword in _WALK_VALUE
    quotes_answer = keyword in _QUOTE_ANSWER
    whole_answer = keyword == "uniqueItems"
    sized = keyword in _SIZED
    applies = keyword in _APPLICATORS or keyword in _REFS

    def metered(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        meter = _METER.get()
        if meter is None:  # not within `check` (the survey's own tests)
            return apply(validator, value, instance, schema)
        steps = 1
        if walks_answer and isinstance(instance, dict | list):
            steps += len(instance)
        if walks_value and isinstance(value, dict | list):
            steps += len(value)
        if whole_answer or quotes_answer:
            steps += meter.weight(instance)
        quoted = sizes.get(id(value), 0) if sized else 0
        if applies:
            # a `false` subschema fails with a message quoting (its part of) the answer,
            # made in `descend` or behind anyOf / oneOf / not / contains, which only look
            # at whether it failed: charged here
            # (additionalProperties: false quotes only the extra names: walked already)
            falses = 0 if keyword == "additionalProperties" else _falses(keyword, value)
            meter.charge(steps + quoted + falses * meter.weight(instance))
            return apply(validator, value, instance, schema)
        if keyword in ("const", "enum"):
            steps += quoted  # compared with the answer whether it fails or not
        meter.charge(steps)
        errors = apply(validator, value, instance, schema)
        return None if errors is None else meter.quoted(errors, instance, quoted)

    return metered


def _falses(keyword: str, value: Any) -> int:
    """The `false` subschemas an applicator's value holds."""
    shape = _APPLICATORS.get(keyword, (None, None))[0]
    if isinstance(value, list):  # allOf, anyOf, oneOf, prefixItems, items in draft 4-2019
        return sum(v is False for v in value)
    if shape == _MAP and isinstance(value, dict):
        return sum(v is False for v in value.values())
    return int(value is False)


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    """jsonschema's `uniqueItems` compares items pairwise when they cannot be sorted (any
    object): quadratic. Here each item is reduced to a hashable key with the same notion
    of equality (1 == 1.0, true != 1, objects regardless of key order): linear."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield exceptions.ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


def _canonical(value: Any) -> Any:
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, list):
        return ("l", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("o", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("s", value) if isinstance(value, str) else ("z", None)


def _answer_sizes(value: Any) -> dict[int, int]:
    """The size (`_size`) of every object and array in the answer, by id."""
    order = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            order.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    sizes: dict[int, int] = {}
    for node in reversed(order):  # children before their parents
        total = 1
        if isinstance(node, dict):
            total += sum(1 + len(k) // _TEXT_PER_STEP for k in node)
            children: Iterable[Any] = node.values()
        else:
            children = node
        for child in children:
            if isinstance(child, str):
                total += 1 + len(child) // _TEXT_PER_STEP
            elif isinstance(child, dict | list):
                total += sizes[id(child)]
            else:
                total += 1
        sizes[id(node)] = total
    return sizes


def _where(error: Any) -> str:
    path = "/".join(str(p) for p in error.absolute_path)
    return f"at /{path}: " if path else ""


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children)
    return False

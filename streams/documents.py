"""How deep a JSON or YAML document nests, found without building it.

Parsers build nested documents recursively: a file of 100,000 `[` exhausted the stack in a
RecursionError traceback thousands of lines long (`llm ask --tools`, the providers file).
Every reader of a document a user gives checks it here first, in one pass over the text
(JSON) or the parser's events (YAML), without recursion."""

from __future__ import annotations

#: nesting a user's document may have: the deepest real one (a policy, a JSON Schema,
#: a tool's parameters) is far shallower; deeper is a mistake
MAX_NESTING = 64


def too_deep(text: str, limit: int = MAX_NESTING, *, json_text: bool = False) -> int | None:
    """The line (from 1) where `text` nests deeper than `limit` levels of lists and
    mappings, or None. YAML's own syntax errors are raised (`yaml.YAMLError`), as the
    parser that follows would raise them."""
    return _json_too_deep(text, limit) if json_text else _yaml_too_deep(text, limit)


def _json_too_deep(text: str, limit: int) -> int | None:
    depth = 0
    line = 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line
        elif ch in "]}":
            depth -= 1
    return None


def _yaml_too_deep(text: str, limit: int) -> int | None:
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > limit:
                return event.start_mark.line + 1 if event.start_mark else 0
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
    return None

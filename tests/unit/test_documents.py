"""`streams.documents.too_deep`: a document nested past any real one is found before a
parser builds it (recursively: a RecursionError traceback)."""

from __future__ import annotations

import json

import pytest
import yaml

from agentstream.streams.documents import MAX_NESTING, too_deep


def test_json_nesting_is_counted_outside_strings_only() -> None:
    assert too_deep(json.dumps({"a": [[[1]]], "b": "[[[[[[[[" * 20}), json_text=True) is None
    assert too_deep('{"a": "\\"[[[[[[[[[[[[[["}', 4, json_text=True) is None
    deep = "\n" + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    assert too_deep(deep, json_text=True) == 2
    assert too_deep("[" * 100_000 + "]" * 100_000, json_text=True) == 1  # no RecursionError


def test_yaml_nesting_and_its_line() -> None:
    assert too_deep("a:\n  b:\n    - 1\n", 3) is None
    assert too_deep("a:\n  b:\n    - [1]\n", 3) == 3
    assert too_deep("[" * 100_000 + "]" * 100_000) == 1
    with pytest.raises(yaml.YAMLError):
        too_deep("a: [\n")

"""Byte-level SSE / NDJSON splitting used by the streaming providers."""

from __future__ import annotations

import pytest

from agentstream.agents.llm.providers._http import LineSplitter
from agentstream.agents.llm.providers.openai import SSEParser


def split_all(chunks: list[bytes]) -> list[bytes]:
    s = LineSplitter()
    out: list[bytes] = []
    for c in chunks:
        out += s.feed(c)
    return out + s.end()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_lines_with_every_line_ending_and_any_chunking(eol: bytes) -> None:
    body = eol.join([b"data: one", b"", b"data: two", b"data: 2b", b"", b"tail"])
    expected = [b"data: one", b"", b"data: two", b"data: 2b", b"", b"tail"]
    assert split_all([body]) == expected
    # every split point, including between the CR and LF of a CRLF
    for cut in range(1, len(body)):
        assert split_all([body[:cut], body[cut:]]) == expected
    assert split_all([bytes([b]) for b in body]) == expected


def test_no_trailing_partial_line() -> None:
    assert split_all([b"a\nb\n"]) == [b"a", b"b"]
    assert split_all([b"a\r\n", b"b\r\n"]) == [b"a", b"b"]


def test_sse_events_data_joined_comments_and_other_fields_ignored() -> None:
    p = SSEParser()
    lines = [
        b": keep-alive",
        b"event: message",
        b'data: {"a": 1}',
        b"",
        b"data:no-space",
        b"data: second line",
        b"id: 7",
        b"",
        b"",
        b"data: [DONE]",
    ]
    assert p.feed(lines[:3]) == []  # event not complete yet
    assert p.feed(lines[3:]) == [b'{"a": 1}', b"no-space\nsecond line"]
    assert p.feed([], end=True) == [b"[DONE]"]  # unterminated last event still counts

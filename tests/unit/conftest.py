"""Fixtures of the unit tests that talk to real sockets on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.llm_server import LLMServer


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    """One loopback LLM server (tests/llm_server.py) per test module that asks for it."""
    with LLMServer() as srv:
        yield srv

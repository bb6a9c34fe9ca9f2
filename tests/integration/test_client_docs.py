"""The examples of docs/client.md run against the test broker and print what the page
says they print, so the page cannot rot.

Every ```python block runs, in a fresh interpreter and a namespace (topic prefix) of its
own, unless the line before it is `<!-- not run: why -->`; the ```text block after it is
its expected output. The examples connect to the local broker's address, which is
replaced by the test broker's."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentstream.streams.admin import ensure_topics
from agentstream.streams.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "client.md"
#: the address the examples connect to: `agentstream kafka start`'s default
DOC_BOOTSTRAP = "127.0.0.1:19092"


@dataclass(frozen=True)
class Example:
    line: int
    code: str
    expected: str | None
    skipped: str | None


def examples(text: str) -> list[Example]:
    found = []
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```\n", text, re.M | re.S))
    for i, block in enumerate(blocks):
        if block.group(1) != "python":
            continue
        before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skipped = m.group(1) if (m := re.match(r"<!-- not run: (.*) -->", before)) else None
        expected = None
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        right_after = after is not None and not text[block.end() : after.start()].strip()
        if after is not None and right_after and after.group(1) == "text":
            expected = after.group(2)
        line = text[: block.start()].count("\n") + 1
        found.append(Example(line, block.group(2), expected, skipped))
    return found


EXAMPLES = examples(DOC.read_text())
RUN = [e for e in EXAMPLES if e.skipped is None]


def test_the_page_has_runnable_examples() -> None:
    # a renamed fence or a marker on every block would otherwise leave nothing tested
    assert len(RUN) >= 3, [e.line for e in RUN]
    for e in RUN:
        assert e.expected is not None, f"docs/client.md:{e.line}: no ```text output after it"
        assert DOC_BOOTSTRAP in e.code, f"docs/client.md:{e.line}: not the local broker"


def test_the_parser_sees_output_and_markers() -> None:
    text = (
        "```python\nprint(1)\n```\n\n```text\n1\n```\n"
        "<!-- not run: no cluster -->\n```python\nx\n```\nprose\n```text\nno\n```\n"
    )
    assert examples(text) == [
        Example(1, "print(1)\n", "1\n", None),
        Example(9, "x\n", None, "no cluster"),
    ]


@pytest.mark.parametrize("example", RUN, ids=[f"line{e.line}" for e in RUN])
async def test_example_prints_what_the_page_says(
    example: Example, settings_env: dict[str, str], kafka_bootstrap: str
) -> None:
    await ensure_topics(Settings.from_env(settings_env))
    proc = subprocess.run(
        [sys.executable, "-c", example.code.replace(DOC_BOOTSTRAP, kafka_bootstrap)],
        env=settings_env,  # the test's topic prefix; the bootstrap is in the code
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == example.expected, proc.stderr[-3000:]

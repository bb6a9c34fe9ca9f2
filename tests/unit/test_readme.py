"""README is the newcomer's page and docs/ the reference: README stays short and indexes
every page of docs/, every relative link of both leads to a file (and heading) that
exists, and the reference tables that mirror the code (the topic catalogue, the command
tree) name what the code has. The settings table is checked in test_settings.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agentstream.streams.cli import cli, load_commands
from agentstream.streams.topics import CATALOGUE, DAY_MS

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX_README_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
#: [text](target) or [text](target "title"); the text may hold one level of brackets
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ...
                yield number, target


def test_readme_is_a_page_a_newcomer_reads() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move reference "
        "material to docs/ and link it from the docs index"
    )


def test_readme_indexes_every_page_of_docs() -> None:
    index = re.findall(r"^\| \[docs/([^\]]+)\]\(docs/\1\) \| \S", README.read_text(), re.M)
    assert sorted(index) == [p.name for p in PAGES], (
        "README's docs index must list every file of docs/, one row each, with a line on "
        "what it covers"
    )


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page: Path) -> None:
    broken = []
    for number, target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{page.name}:{number}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}:{number}: {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_links_and_anchors() -> None:
    """Guards the checker itself: a page with links yields them, headings their anchors."""
    assert "docs/events.md" in {target for _, target in relative_links(README)}
    assert "the-fault-injection-suite-make-chaos" in anchors(DOCS / "reliability.md")
    assert "quick-start--the-two-commands" in anchors(README)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_code_imports_the_one_top_level_name(page: Path) -> None:
    """The distribution installs `agentstream` only: `schemas`, `streams`, `agents` and
    `infra` are its subpackages (and `agents` is the OpenAI Agents SDK's import name)."""
    old = r"(schemas|streams|agents|infra)\b"
    stale = re.compile(rf"(^\s*|`)(from|import) {old}|python -m {old}")
    found = [
        f"{page.name}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if stale.search(line)
    ]
    assert not found, "\n".join(found)


def catalogue_rows() -> list[list[str]]:
    rows = []
    for spec in CATALOGUE.values():
        if spec.compacted:
            retention = "compacted"
        elif spec.retention_ms is None:
            retention = "forever"
        else:
            retention = f"{spec.retention_ms // DAY_MS} d"
        rows.append(
            [
                spec.name,
                spec.key,
                ", ".join(spec.events),
                "default" if spec.partitions is None else str(spec.partitions),
                retention,
                spec.description,
            ]
        )
    return rows


def test_topic_table_is_the_catalogue() -> None:
    lines = (DOCS / "events.md").read_text().splitlines()
    start = lines.index("| Topic | Key | Events | Partitions | Retention | Purpose |") + 2
    documented = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        documented.append([c.strip().replace("`", "") for c in line.strip("|").split(" | ")])
    assert documented == catalogue_rows(), "docs/events.md's topic table differs from CATALOGUE"


def command_paths() -> list[str]:
    load_commands()
    paths: list[str] = []

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                paths.append(prefix + name)

    walk(cli, "")
    return paths


def test_cli_reference_names_every_command() -> None:
    text = (DOCS / "cli.md").read_text()
    paths = command_paths()
    assert {"worker", "kafka start", "policy apply", "audit worker-key revoke"} <= set(paths)
    missing = [p for p in paths if not re.search(rf"`{re.escape(p)}( [^`]*)?`", text)]
    assert not missing, f"docs/cli.md does not describe {missing}"

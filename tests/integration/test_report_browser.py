"""`agentstream audit report` end to end: events on the real broker → the CLI writes a
self-contained HTML report → real headless Chromium renders its SVG charts offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentstream.schemas import AgentMessage, CommunicationRecord, Event, LLMResponse
from agentstream.schemas.llm import Usage
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import cli

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which(CHROMIUM), "chromium is missing (apt-get install -y chromium)"
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


async def seed(settings: Settings) -> None:
    now = datetime.now(UTC)
    async with AsyncClient(settings) as client:
        inputs = [
            Event.of(
                AgentMessage(
                    message_id=f"m{i}",
                    sender_id=("alice", "bob")[i % 2],
                    recipient_id="carol",
                    content="hi",
                ),
                source="test",
            )
            for i in range(9)
        ]
        await client.publish_many("agent.messages", inputs)
        await client.publish_many(
            "agent.messages.accepted",
            [e.caused(e.payload, source="enforce_policy") for e in inputs[:6]],
        )
        rejected = []
        for e in inputs[6:]:
            payload = e.payload.model_copy(update={"metadata": {"rejection_reasons": ["blocked"]}})
            rejected.append(e.caused(payload, source="enforce_policy"))
        await client.publish_many("agent.messages.rejected", rejected)
        await client.publish_many(
            "llm.responses",
            [
                Event.of(
                    LLMResponse(
                        request_id=f"q{i}",
                        agent_id="bob",
                        status="completed",
                        provider="openai",
                        model="gpt-4o",
                        usage=Usage(prompt_tokens=100, completion_tokens=40, total_tokens=140),
                    ),
                    source="llm",
                )
                for i in range(3)
            ],
        )
        await client.publish_many(
            "comms.records",
            [
                Event.of(
                    CommunicationRecord(
                        record_id=f"c{i}", kind=k, agent_id="alice", recorded_at=now
                    ),
                    source="comms",
                )
                for i, k in enumerate(["token", "token", "wallet", "model"])
            ],
        )


async def test_report_html_renders_charts_in_chromium(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = {**settings_env, "AGENTSTREAM_AGENTS": "audit"}
    created = cli(env, "topics", "create")
    assert created.returncode == 0, created.stderr
    await seed(settings)

    out = tmp_path / "report.html"
    res = cli(env, "audit", "report", "--since", "-10m", "--until", "now", "--out", str(out))
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    assert "<script" not in page and not re.search(r"(src|href)=\"https?:", page)

    as_json = cli(env, "audit", "report", "--since", "-10m", "--format", "json")
    data: dict[str, Any] = orjson.loads(as_json.stdout)
    assert data["agents"]["alice"]["messages"]["sent"] == 5
    assert data["agents"]["bob"]["messages"]["rejected"] == 1
    assert data["agents"]["alice"]["messages"]["rejection_reasons"] == {"blocked": 2}
    assert data["tokens"] == [
        {
            "provider": "openai",
            "model": "gpt-4o",
            "calls": 3,
            "prompt_tokens": 300,
            "completion_tokens": 120,
            "total_tokens": 420,
        }
    ]

    dom = chromium(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the browser parsed the SVG charts into the DOM with the numbers on their bars
    for chart in ("messages", "rejections", "tokens", "comms"):
        assert f'data-chart="{chart}"' in dom.stdout, chart
    bars = set(
        re.findall(r'data-label="([^"]+)" data-series="([^"]+)" data-value="([^"]+)"', dom.stdout)
    )
    assert {
        ("alice", "sent", "5"),
        ("alice", "accepted", "3"),
        ("alice", "rejected", "2"),
        ("bob", "rejected", "1"),
        ("openai / gpt-4o", "prompt", "300"),
        ("alice", "token", "2"),
        ("blocked", "rejections", "3"),
    } <= bars

    shot = tmp_path / "report.png"
    res_shot = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1100,1400", out.as_uri())
    assert res_shot.returncode == 0 and shot.exists(), res_shot.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a blank page compresses to a few kB; rendered charts and tables do not
    assert len(png) > 20_000, len(png)
    keep = Path("/tmp/agentstream-report-screenshot.png")
    keep.write_bytes(png)

"""README's first command, shortened: the demo runs the whole pipeline and its summary
shows every input accounted for on the result topics."""

from __future__ import annotations

import re

import pytest

from tests.support import cli

# "repo-var": writes var/demo/, beside which test_cli_mistakes checks var/ untouched
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("repo-var")]


def _counts(line: str) -> dict[str, int]:
    return {
        k.strip(): int(v) for k, v in re.findall(r"([a-z ]+?) (\d+)(?:,|$)", line.split(":", 1)[1])
    }


def test_demo_moves_events_through_every_stage(settings_env: dict[str, str]) -> None:
    res = cli(settings_env, "demo", "--duration", "12", "--rate", "30", timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    sent = _counts([ln for ln in lines if "sent:" in ln][-1])
    seen = _counts([ln for ln in lines if "seen:" in ln][-1])
    assert sent["messages"] > 100
    # every decodable message got exactly one decision and one verdict; the rest dead letters
    assert seen["accepted"] + seen["rejected"] == sent["messages"] == seen["decisions"]
    assert seen["rejected"] > 0 and seen["accepted"] > 0
    assert seen["dead letters"] == sent["undecodable"] > 0
    assert seen["llm responses"] == sent["llm requests"] > 0
    assert seen["llm chunks"] > seen["llm responses"]
    assert seen["status changes"] >= 1  # agents seen for the first time come up

"""The operator console end to end: real workers on the real broker with demo-like
traffic; the page in headless Chromium (driven over the DevTools protocol: typed into,
navigated with the keyboard, screenshotted) and `agentstream top` in a tmux terminal.

Screenshots are kept in `ARTIFACTS` (one folder per run of each test)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agentstream.streams import console
from agentstream.streams.settings import Settings
from tests.cdp import Page, chromium, contrast
from tests.integration.test_web_cluster import two_workers
from tests.support import REPO, Worker, await_until, cli, web_tokens, with_admin_key
from tests.traffic import SECRET, Traffic

pytestmark = [pytest.mark.integration]

ARTIFACTS = Path("/tmp/agentstream-console-artifacts")
#: as the demo: agents go down 4 s after their last heartbeat
HEARTBEATS = {
    "AGENTSTREAM_HEARTBEAT_INTERVAL_S": "1",
    "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "4",
    "AGENTSTREAM_HEARTBEAT_MAX_MISSED": "3",
    "AGENTSTREAM_SECURITY_DEFAULT_ACTION": "allow",
}
POLICY = "policy_id: no-passwords\nlevel: standard\nblocked_patterns: ['hunter2']\n"
AGENTS = [f"agent-{i}" for i in range(6)]


def artifacts(name: str) -> Path:
    path = ARTIFACTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def policy_env(settings_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`settings_env` with an admin key, the topics made and a blocking policy applied."""
    env = with_admin_key({**settings_env, **HEARTBEATS}, tmp_path)
    made = cli(env, "topics", "create")
    assert made.returncode == 0, made.stderr
    (tmp_path / "policy.yaml").write_text(POLICY)
    applied = cli(env, "policy", "apply", str(tmp_path / "policy.yaml"))
    assert applied.returncode == 0, applied.stderr
    return env


@contextlib.asynccontextmanager
async def traffic(env: dict[str, str]) -> AsyncIterator[Traffic]:
    t = Traffic(list(AGENTS))
    task = asyncio.create_task(t.run(Settings.from_env(env)))
    try:
        yield t
    finally:
        t.stop.set()
        await task


# -- the page ---------------------------------------------------------------------------------
async def text(page: Page, selector: str) -> str:
    return str(await page.js(f"document.querySelector({selector!r})?.textContent ?? ''"))


async def value(page: Page, key: str) -> str:
    return await text(page, f'[data-k="{key}"]')


async def rows(page: Page, table: str) -> list[list[str]]:
    """The cells of a table's body rows (the "nothing yet" row excluded)."""
    got = await page.js(
        f"[...document.querySelectorAll('#{table} tbody tr')]"
        ".filter(tr => !tr.querySelector('td.empty'))"
        ".map(tr => [...tr.children].map(td => td.textContent))"
    )
    return [list(r) for r in got]


async def focus_by_tab(page: Page, element_id: str, limit: int = 40) -> list[str]:
    """Press Tab until `element_id` has the focus; the ids (or tags) visited."""
    seen = []
    for _ in range(limit):
        await page.press("Tab")
        active = await page.js("document.activeElement.id || document.activeElement.tagName")
        seen.append(active)
        if active == element_id:
            return seen
    raise AssertionError(f"Tab never reached #{element_id}: {seen}")


async def log_in(page: Page, token: str) -> None:
    if await page.js("document.activeElement.id") != "token":
        await focus_by_tab(page, "token")
    await page.type(token)
    await page.press("Enter")  # submits the form, as a keyboard user would
    await await_until(
        lambda: page.js("document.querySelector('#conn').dataset.state === 'live'"),
        30,
        what="the console live",
    )


#: the elements whose colours must contrast with what is behind them (WCAG AA: 4.5)
CONTRAST = [
    "body",
    "h2",
    ".kpi .label",
    ".kpi b",
    "th",
    "td",
    "caption",
    ".help",
    "nav a",
    "#conn",
    "button",
    "label",
    "td.status-up",
    "td.status-allow",
    "td.status-deny",
    "td.status-closed",
    "td.empty",
]
COLOURS_JS = """
(() => {
  const bg = (e) => {
    for (; e; e = e.parentElement) {
      const c = getComputedStyle(e).backgroundColor;
      if (c && c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c;
    }
    return 'rgb(255, 255, 255)';
  };
  const out = {};
  for (const sel of SELECTORS) {
    const e = document.querySelector(sel);
    if (e) out[sel] = [getComputedStyle(e).color, bg(e)];
  }
  return out;
})()
"""
A11Y_JS = """
(() => ({
  unlabelled: [...document.querySelectorAll('input, select, textarea')]
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
    .map(e => e.id || e.outerHTML.slice(0, 80)),
  nameless_buttons: [...document.querySelectorAll('button')]
    .filter(b => !(b.textContent.trim() || b.getAttribute('aria-label')))
    .map(b => b.outerHTML.slice(0, 80)),
  tables_without_caption: [...document.querySelectorAll('table')]
    .filter(t => !t.caption || !t.caption.textContent.trim()).map(t => t.id),
  sections_without_heading: [...document.querySelectorAll('section')]
    .filter(s => !s.getAttribute('aria-labelledby')).map(s => s.id),
  lang: document.documentElement.lang,
}))()
"""


@pytest.mark.browser
async def test_console_in_chromium(settings_env: dict[str, str], tmp_path: Path) -> None:
    env = policy_env(settings_env, tmp_path)
    tokens = web_tokens(env)
    _, urls, w1, w2 = await two_workers(env, tmp_path, "all", **HEARTBEATS)
    shots = artifacts("chromium")
    base = urls[0]
    requests: list[str] = []
    try:
        async with traffic(env) as t, chromium(tmp_path) as page:
            await page.send("Network.enable")
            page.on("Network.requestWillBeSent", lambda p: requests.append(p["request"]["url"]))
            await page.goto(base + "/ui/")
            assert await page.js("document.querySelector('#main').hidden") is True
            await page.screenshot(shots / "1-login.png")

            # -- the keyboard reaches the token field: skip link first ---------------------
            await log_in(page, tokens.read)
            assert await page.js("sessionStorage.length") == 1

            # -- every worker answered, every section holds live values ------------------
            await await_until(lambda: _eq(page, "2"), 60, what="both workers in the console")
            async with httpx.AsyncClient(headers=tokens.headers("admin"), timeout=20) as http:
                for u in urls:  # a checkpoint from each worker, for the checkpoint ages

                    async def taken(u: str = u) -> bool:
                        r = await http.post(u + "/checkpoints")
                        # 503: a rebalance still restoring the worker's tables; retry
                        assert r.status_code in (200, 503), r.text
                        return r.status_code == 200

                    await await_until(taken, 60, interval=0.5, what=f"a checkpoint by {u}")

            async def every_section_live() -> dict[str, Any] | None:
                got = {
                    "agents": await rows(page, "agent-table"),
                    "timeline": await rows(page, "timeline-table"),
                    "decisions": await rows(page, "decisions-table"),
                    "rules": await rows(page, "rules-table"),
                    "top_policies": await rows(page, "policies-top-table"),
                    "dead": await rows(page, "dl-table"),
                    "latency": await rows(page, "latency-table"),
                    "breakers": await rows(page, "breaker-table"),
                    "usage": await rows(page, "usage-model"),
                    "throughput": await rows(page, "throughput-table"),
                    "lag": await rows(page, "lag-table"),
                    "health": await rows(page, "health-table"),
                    "checkpoints": await rows(page, "checkpoint-table"),
                    "policies": await rows(page, "policy-table"),
                    "in_flight": await value(page, "llm.in_flight"),
                    "accepted_per_s": await value(page, "messages.accepted_per_s"),
                }
                ok = (
                    {r[0] for r in got["agents"] if r[1] == "up"} == set(AGENTS)
                    and got["timeline"]
                    and {"allow", "deny"} <= {r[3] for r in got["decisions"]}
                    and {r[0] for r in got["rules"]} >= {"blocked_patterns", "security_level"}
                    and "no-passwords" in {r[0] for r in got["top_policies"]}
                    and got["dead"]
                    and any(r[0] == "local" and r[1] != "-" for r in got["latency"])
                    and any(r[0] == "local" and r[1] == "closed" for r in got["breakers"])
                    and any(r[0] == "local/local-echo" for r in got["usage"])
                    and {"enforce_policy", "call_llm", "track_heartbeats"}
                    <= {r[0] for r in got["throughput"]}
                    and got["lag"]
                    and len(got["health"]) == 2
                    and len(got["checkpoints"]) == 2
                    and [r[0] for r in got["policies"]] == ["no-passwords"]
                    and got["in_flight"].isdigit()
                    and float(got["accepted_per_s"]) > 0
                )
                return got if ok else None

            live = await await_until(every_section_live, 90, interval=1, what="every section")
            # a read token sees no pattern, and no reason that quotes one
            assert live["policies"][0][5:] == ["(scope admin)", "(scope admin)"]
            body = await page.js("document.body.innerText")
            assert "hunter2" not in body and SECRET not in body
            assert console.HIDDEN_REASON in body

            # -- the numbers move -------------------------------------------------------
            first = int(await value(page, "messages.accepted_total"))
            await await_until(
                lambda: _grew(page, "messages.accepted_total", first), 20, what="counts growing"
            )
            await page.screenshot(shots / "2-live.png")

            # -- an agent going down shows within its detection delay --------------------
            gone = AGENTS[0]
            delay = float(await value(page, "agents.detection_delay_s"))
            t.silent.add(gone)
            silenced = time.monotonic()
            await await_until(
                lambda: page.js(
                    f"document.querySelector('#agent-table tr[data-agent=\"{gone}\"] td.status')"
                    "?.dataset.status === 'down'"
                ),
                60,
                interval=0.2,
                what=f"{gone} down in the page",
            )
            took = time.monotonic() - silenced
            # the monitor's own delay, its check interval, and one snapshot interval, plus
            # what two workers, the traffic and Chromium sharing two cores add to the path
            # (forwarded lookup, stream frame, render, this poll)
            bound = delay + 1 + console.INTERVAL_S + 1 + 4
            print(f"{gone} shown down {took:.1f} s after its last heartbeat (bound {bound:g})")
            assert took <= bound, (took, bound)
            # searchable by agent id, with the keyboard
            await focus_by_tab(page, "agent-search", limit=60)
            await page.type(gone)
            await await_until(
                lambda: _only(page, gone), 10, what="the timeline filtered to one agent"
            )
            changes = await rows(page, "timeline-table")
            assert any(r[2] == "up → down" for r in changes), changes
            await page.screenshot(shots / "3-agent-down.png")

            # -- a dead letter: redacted original bytes and the replay command ----------
            opened = await open_secret_dead_letter(page)
            original = await page.js("document.querySelector('#dl-original').value")
            assert "[REDACTED]" in original and SECRET not in original, original
            command = await page.js("document.querySelector('#dl-replay').value")
            assert command.startswith("agentstream replay --topics "), command
            await page.screenshot(shots / "4-dead-letter.png")
            replayed = cli(env, *shlex.split(command)[1:])
            assert replayed.returncode == 0, replayed.stderr
            records = [orjson.loads(x) for x in replayed.stdout.splitlines()]
            mine = [r for r in records if f"{r['partition']}:{r['offset']}" == opened]
            assert mine, (opened, records)
            assert b"[REDACTED]" in base64.b64decode(mine[0]["value_b64"])
            # a search by reason over every kept dead letter
            await page.js(
                "document.querySelector('#dl-reason').value = 'UndecodableEvent';"
                "document.querySelector('#dl-filter').requestSubmit()"
            )
            await await_until(
                lambda: page.js(
                    "document.querySelector('#dl-mode').textContent.startsWith('Search:')"
                ),
                20,
                what="a dead-letter search",
            )

            # -- accessibility ----------------------------------------------------------
            await page.js(
                "const s = document.querySelector('#agent-search'); s.value = '';"
                "s.dispatchEvent(new Event('input'))"
            )
            a11y = await page.js(A11Y_JS)
            assert a11y == {
                "unlabelled": [],
                "nameless_buttons": [],
                "tables_without_caption": [],
                "sections_without_heading": [],
                "lang": "en",
            }, a11y

            # (no empty table to measure once every section has rows). An agent's row can
            # be between states for a snapshot when heartbeats arrive late (a loaded
            # machine): wait for an element of every selector rather than take one look.
            async def every_selector_shown() -> dict[str, Any] | None:
                got: dict[str, Any] = await page.js(
                    COLOURS_JS.replace("SELECTORS", orjson.dumps(CONTRAST).decode())
                )
                return got if set(got) >= set(CONTRAST) - {"td.empty"} else None

            colours = await await_until(
                every_selector_shown, 30, interval=0.5, what="an element for every selector"
            )
            low = {s: round(contrast(*c), 2) for s, c in colours.items() if contrast(*c) < 4.5}
            assert low == {}, low

            # -- admin sees the patterns ------------------------------------------------
            await page.js("document.querySelector('#logout').focus()")
            await page.press("Enter")  # the token field gets the focus back
            await log_in(page, tokens.admin)
            await await_until(
                lambda: _admin_patterns(page), 30, what="the policy's patterns for admin"
            )
            await page.screenshot(shots / "5-admin.png")

            # -- nothing but this worker, one stream per connection, no polling ---------
            # (data: URLs are the browser's own icons of the date fields: no network)
            assert all(u.startswith((base, "data:")) for u in requests), requests
            streams = [u for u in requests if u.endswith("/ui/api/stream")]
            assert len(streams) == 2, streams  # the read token's, then the admin's
            assert not [u for u in requests if "/ui/api/snapshot" in u], requests
            assert page.console == [], page.console
    finally:
        await asyncio.to_thread(w2.stop)
        await asyncio.to_thread(w1.stop)
    for shot in shots.iterdir():
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, (shot, len(png))


async def _eq(page: Page, want: str) -> bool:
    return await value(page, "workers.length") == want


async def _grew(page: Page, key: str, first: int) -> bool:
    got = await value(page, key)
    return got.isdigit() and int(got) > first


async def _only(page: Page, agent: str) -> bool:
    got = await rows(page, "timeline-table")
    return bool(got) and {r[1] for r in got} == {agent}


async def _admin_patterns(page: Page) -> bool:
    got = await rows(page, "policy-table")
    return bool(got) and got[0][6] == "hunter2"


async def open_secret_dead_letter(page: Page) -> str:
    """Open dead letters (focus + Enter on their buttons) until the one with the secret;
    its partition:offset."""

    async def found() -> str | None:
        count = await page.js("document.querySelectorAll('#dl-table tbody button').length")
        for i in range(min(int(count), 20)):
            await page.js(f"document.querySelectorAll('#dl-table tbody button')[{i}].focus()")
            await page.press("Enter")
            original = await page.js("document.querySelector('#dl-original').value")
            if "[REDACTED]" in original:
                row = await page.js(
                    f"document.querySelectorAll('#dl-table tbody button')[{i}]"
                    ".closest('tr').children[3].textContent"
                )
                return str(row)
        return None

    return await await_until(found, 30, interval=1, what="the dead letter with a secret")


# -- agentstream top in a terminal ------------------------------------------------------------
def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, check=True, timeout=20
    ).stdout


def accepted(screen: str) -> int | None:
    m = re.search(r"accepted (\d+)  rejected (\d+)", screen)
    return int(m.group(1)) if m else None


async def test_top_in_a_terminal(settings_env: dict[str, str], tmp_path: Path) -> None:
    assert shutil.which("tmux"), "tmux is missing (apt-get install -y tmux)"
    env = policy_env(settings_env, tmp_path)
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    session = f"top-{tmp_path.name}"[:40]
    shots = artifacts("top")
    try:
        async with traffic(env):
            # the CLI's token is the admin one (settings_env makes it web.token)
            command = shlex.join([sys.executable, "-m", "agentstream", "top"])
            # the pane's terminal, not the test runner's: a CI job's TERM=dumb (or a
            # COLUMNS of its own) made rich draw 80 columns in the 160-column pane
            pane = {k: v for k, v in env.items() if k not in ("TERM", "COLUMNS", "LINES")}
            pane["TERM"] = "screen-256color"
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in pane.items())
            tmux(
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                "160",
                "-y",
                "60",
                "-c",
                str(REPO),
                f"env -i {exports} {command}; echo EXITED $?; sleep 600",
            )
            screens: list[str] = []

            async def screen_with(pred: Any) -> str:
                async def check() -> str | None:
                    s = tmux("capture-pane", "-p", "-t", session)
                    screens.append(s)
                    return s if pred(s) else None

                try:
                    return await await_until(check, 60, interval=0.5, what="top's screen")
                except AssertionError as exc:
                    # the last screen says why (an error line, a zero that never moved)
                    last = screens[-1] if screens else "(never captured)"
                    raise AssertionError(f"{exc}; last screen:\n{last}\n{worker.tail()}") from None

            first = await screen_with(lambda s: (accepted(s) or 0) > 0)
            assert "EXITED" not in first
            n = accepted(first)
            # the numbers change while it runs: it redraws, nothing is typed
            later = await screen_with(lambda s: (accepted(s) or 0) > (n or 0))
            for what in (
                "agents  up",
                "accepted/s",
                "dead letters  seen",
                "llm  in flight",
                "no-passwords v1",
                "throughput /s",
                "consumer lag",
            ):
                assert what in later, (what, later)
            (shots / "screen.txt").write_text(later)
            tmux("send-keys", "-t", session, "C-c")
            ended = await screen_with(lambda s: "EXITED" in s)
            assert "EXITED 0" in ended and "Traceback" not in ended, ended

        # a bad token: one line and exit 1
        bad = cli(
            {
                **env,
                "AGENTSTREAM_SECRET_SOURCES": "env",
                "AGENTSTREAM_SECRET_WEB_TOKEN": "ast_" + "x" * 43,
            },
            "top",
            "--once",
        )
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.startswith("Error: http://") and "HTTP 401" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=20)
        await asyncio.to_thread(worker.stop)

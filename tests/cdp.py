"""Headless Chromium (Debian's `chromium`, as test_report_browser.py runs it) driven over
the DevTools protocol, for pages that must be used, not only rendered: type, press keys,
read the live DOM, take screenshots. The protocol's WebSocket is spoken with aiohttp."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.test_report_browser import CHROMIUM, FLAGS

#: keys `Page.press` knows: (key, code, windowsVirtualKeyCode)
KEYS = {
    "Tab": ("Tab", "Tab", 9),
    "Enter": ("Enter", "Enter", 13),
    "Escape": ("Escape", "Escape", 27),
}


class Page:
    """One browser tab."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.console: list[str] = []
        self._handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                fut = self._waiting.pop(data["id"])
                if "error" in data:
                    fut.set_exception(AssertionError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])
            for handler in self._handlers.get(data.get("method", ""), []):
                handler(data["params"])

    def on(self, event: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call `handler` with the parameters of every `event` the page sends."""
        self._handlers.setdefault(event, []).append(handler)

    async def send(self, method: str, **params: Any) -> Any:
        n = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        async with asyncio.timeout(30):
            return await fut

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        got = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in got:
            raise AssertionError(f"{expression!r} threw: {got['exceptionDetails']}")
        return got["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while await self.js("document.readyState") != "complete":
            assert time.monotonic() < deadline, f"{url} did not load"
            await asyncio.sleep(0.1)

    async def press(self, key: str) -> None:
        name, code, vk = KEYS[key]
        common = {"key": name, "code": code, "windowsVirtualKeyCode": vk}
        text = {"text": "\r"} if key == "Enter" else {}
        await self.send("Input.dispatchKeyEvent", type="keyDown", **common, **text)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    async def type(self, text: str) -> None:
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> bytes:
        got = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(got["data"])
        path.write_bytes(png)
        return png


@contextlib.asynccontextmanager
async def chromium(tmp: Path, width: int = 1280, height: int = 1600) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab, driven over the DevTools protocol."""
    assert shutil.which(CHROMIUM), "chromium is missing (apt-get install -y chromium)"
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    log = (tmp / "chromium.log").open("w+")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        # Chromium writes its DevTools port to the profile once it listens
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, Path(log.name).read_text()[-2000:]
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                try:
                    yield page
                finally:
                    page._reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two CSS ``rgb()``/``rgba()`` colours."""

    def lum(css: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"[\d.]+", css)[:3])

        def ch(c: float) -> float:
            return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

        return 0.2126 * ch(r) + 0.7152 * ch(g) + 0.0722 * ch(b)

    a, b = sorted((lum(fg), lum(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)

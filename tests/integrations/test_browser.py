"""The web demo in headless Chromium: tabs share a session live, it hibernates and comes back.

Runs ``examples/webapp.py`` as a subprocess on 127.0.0.1 (as a person would) and drives
Debian's ``/usr/bin/chromium`` with Playwright's Python package; no browser download.
The dashboard screenshots go to ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
IDLE = 1.5
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def _need(what: str) -> None:
    if os.environ.get("KEYHIVE_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what} (KEYHIVE_REQUIRE_SERVERS=1 forbids skipping)")
    pytest.skip(what)


try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

try:
    import fastapi
    import httpx
    import uvicorn  # noqa: F401
except ImportError:  # pragma: no cover
    fastapi = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """``examples/webapp.py`` running in a subprocess, in its own working directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.runs = 0
        self.exit_code: int | None = None

    async def start(self) -> str:
        port = _free_port()
        self.runs += 1
        log = self.workdir / f"demo-{self.runs}.log"
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "examples" / "webapp.py"), "--port", str(port),
                "--idle", str(IDLE), cwd=self.workdir, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client, asyncio.timeout(20):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the demo exited: {log.read_text()}")
                try:
                    if (await client.get(self.url + "/keyhive/api/snapshot")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        assert f"open {self.url}" in log.read_text()  # it prints the URL
        return self.url

    async def stop(self) -> None:
        """Ctrl-C: uvicorn shuts down gracefully and the manager hibernates every agent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:  # pragma: no cover - only when shutdown hangs
            proc.kill()
            await proc.wait()
            raise
        self.exit_code = proc.returncode


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    if fastapi is None:
        _need("the web demo needs keyhive[fastapi]")
    server = Demo(tmp_path)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        _need("playwright (the Python package) is not installed: pip install playwright")
    if not HAVE_CHROMIUM:
        _need(f"{CHROMIUM} is missing: apt-get install chromium")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _open(context: BrowserContext, url: str) -> Page:
    page = await context.new_page()
    await page.goto(url)
    await expect(page.locator("#status")).to_have_text("live")
    return page


async def test_tabs_share_a_session_which_hibernates_and_thaws(demo: Demo, browser: Browser) -> None:
    """Two tabs of one session update each other; closed, it hibernates; reopened, it thaws."""
    ARTIFACTS.mkdir(exist_ok=True)
    url = await demo.start()
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        one = await _open(context, url)
        two = await _open(context, url)
        (cookie,) = [c for c in await context.cookies() if c["name"] == "keyhive_demo_session"]
        session = cookie["value"]

        for _ in range(3):
            await one.click("#incr")
        await expect(two.locator("#count")).to_have_text("3")
        await two.fill("#note", "hello from tab two")
        await two.click("#noteform button:not([type])")
        await expect(one.locator("#notes li")).to_have_text(["hello from tab two"])

        dash = await context.new_page()
        await dash.goto(url + "/keyhive/")
        row = dash.locator(f"tr.agent[data-key='{session}']")
        await expect(row.locator("td.attachments")).to_have_text("2")
        await expect(dash.locator("#conn")).to_have_text("live")
        await dash.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)

        await one.close()
        await two.close()
        await expect(row.locator("td.attachments")).to_have_text("0")
        gone = dash.locator(f"tr.stopped-agent[data-key='{session}']")
        await expect(gone).to_contain_text("idle_timeout", timeout=IDLE * 1000 + 10_000)
        await expect(gone).to_contain_text("hibernated")
        await expect(row).to_have_count(0)
        await expect(dash.locator(f"tr.event[data-kind='hibernated'][data-key='{session}']")).to_have_count(1)
        await dash.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        back = await _open(context, url)
        await expect(back.locator("#count")).to_have_text("3")
        await expect(back.locator("#agent")).to_contain_text("thawed")
        await expect(back.locator("#notes li")).to_have_text(["hello from tab two"])
        await expect(dash.locator(f"tr.event[data-kind='thawed'][data-key='{session}']")).to_have_count(1)
        await back.click("#incr")
        await expect(back.locator("#count")).to_have_text("4")
        await dash.screenshot(path=str(ARTIFACTS / "dashboard-thawed.png"), full_page=True)
        await back.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

        # the demo opts in to stop buttons, which ask first: dismissed, nothing happens
        asked: list[str] = []

        async def answer(dialog: Any, accept: bool) -> None:
            asked.append(dialog.message)
            await (dialog.accept() if accept else dialog.dismiss())

        dash.once("dialog", lambda d: answer(d, False))
        await dash.click(f"tr.agent[data-key='{session}'] button.stop")
        async with asyncio.timeout(5):
            while not asked:
                await asyncio.sleep(0.05)
        assert session in asked[0]
        await expect(dash.locator(f"tr.event[data-kind='stopped'][data-key='{session}']")).to_have_count(1)
        # accepted: a stop hibernates it; the open tab reconnects and thaws it
        dash.once("dialog", lambda d: answer(d, True))
        await dash.click(f"tr.agent[data-key='{session}'] button.stop")
        await expect(dash.locator(f"tr.event[data-kind='stopped'][data-key='{session}']")).to_have_count(2)
        await expect(back.locator("#thaws")).to_have_text("2")
        await expect(back.locator("#status")).to_have_text("live")
        await expect(back.locator("#count")).to_have_text("4")
        await back.close()
        await dash.close()

        await demo.stop()  # a server restart: the live agent hibernates on shutdown, thaws after
        assert demo.exit_code == 0  # Ctrl-C is a clean exit, no traceback
        assert "Traceback" not in (demo.workdir / "demo-1.log").read_text()
        url = await demo.start()
        again = await _open(context, url)
        await expect(again.locator("#count")).to_have_text("4")
        await expect(again.locator("#agent")).to_contain_text("thawed")
        await expect(again.locator("#thaws")).to_have_text("3")
        await again.close()
    finally:
        await context.close()


async def test_dashboard_fits_a_phone_and_names_what_it_counts(demo: Demo, browser: Browser) -> None:
    """At 390 px the dashboard has no sideways scroll, and its tiles say what each number counts."""
    ARTIFACTS.mkdir(exist_ok=True)
    url = await demo.start()
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    try:
        tab = await _open(context, url)
        await tab.fill("#note", "a note long enough to make a row wider than a phone screen")
        await tab.click("#noteform button:not([type])")
        dash = await context.new_page()
        await dash.goto(url + "/keyhive/")
        await expect(dash.locator("tr.agent")).to_have_count(1)
        await expect(dash.locator("tr.event").first).to_be_visible()
        await expect(dash.locator(".stat").nth(1)).to_contain_text("agents with someone attached")
        await expect(dash.locator("table.agents th").nth(2)).to_have_text("attachments (owners)")
        await dash.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)
        width = await dash.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the dashboard scrolls sideways: {width} px wide"
        assert await tab.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        await context.close()

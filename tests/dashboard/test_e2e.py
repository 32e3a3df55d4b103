"""End to end: the real bridge app and hub, real WebSocket clients, the dashboard in Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
import websockets
from playwright.async_api import Browser, BrowserContext, Page, expect

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.hub.config import token_label
from bridge.store.memory import MemoryStore
from tests.app.fakes import FakeEngine
from tests.conftest import IMAGES
from tests.dashboard.conftest import ARTIFACTS, TOKEN

CLIENT_TOKEN = "client-token"
RTT_TEXT = re.compile(r"^\d+(\.\d)? ms$")  # a measured heartbeat RTT, not "–"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Client:
    """A well-behaved /ws client that answers every heartbeat ping."""

    session: str
    ws: Any
    task: asyncio.Task[None] | None = None
    close_code: int | None = None
    pongs: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)

    async def run(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                if frame.get("type") == "ping":
                    await self.ws.send(json.dumps({"type": "pong", "ts": frame.get("ts")}))
                    self.pongs += 1
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code


async def _connect(url: str) -> Client:
    ws = await websockets.connect(url, ping_interval=None, compression=None)
    await ws.send(json.dumps({"type": "hello", "token": CLIENT_TOKEN, "session": None}))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    client = Client(session=welcome["session"], ws=ws)
    client.task = asyncio.create_task(client.run())
    return client


@pytest.fixture
async def bridge() -> AsyncIterator[tuple[BridgeApp, str]]:
    engine = FakeEngine()
    engine.loaded.set()
    settings = load_settings(
        {
            "port": str(_free_port()),
            "token": [CLIENT_TOKEN],
            "admin-token": TOKEN,
            "heartbeat": "0.3",
            "heartbeat-timeout": "5",
        },
        env={},
    )
    app = BridgeApp(settings, engine=engine, store=MemoryStore(), adapters=[])
    await app.start()
    try:
        yield app, app.urls[0].rstrip("/")
    finally:
        await app.stop(grace_s=1.0)


async def _login(browser: Browser, base: str) -> tuple[BrowserContext, Page]:
    """A new browser context logged in to the dashboard with the admin token."""
    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    page = await context.new_page()
    await page.goto(f"{base}/dashboard")
    await page.fill("#token", TOKEN)
    await page.click("#login-submit")
    await page.wait_for_url(f"{base}/dashboard")
    return context, page


async def test_real_clients_appear_show_rtt_and_get_kicked(
    browser: Browser, bridge: tuple[BridgeApp, str]
) -> None:
    _app, base = bridge
    ws_url = base.replace("http://", "ws://") + "/ws"
    context, page = await _login(browser, base)
    await expect(page.locator("#live")).to_have_text("live", timeout=5000)

    clients: list[Client] = []
    try:
        started = time.monotonic()
        first = await _connect(ws_url)
        clients.append(first)
        row = page.locator("#connections-body tr", has_text=first.session)
        await expect(row).to_be_visible(timeout=2000)
        assert time.monotonic() - started < 2.0 + 0.5  # connect + hello included
        await expect(row.locator("td").nth(5)).to_have_text(RTT_TEXT, timeout=5000)
        clients.append(await _connect(ws_url))
        await expect(page.locator("#stat-connections")).to_have_text("2", timeout=2000)

        async with aiohttp.ClientSession() as http:
            resp = await http.get(
                f"{base}/api/connections", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            listed = (await resp.json())["connections"]
            status = await (
                await http.get(f"{base}/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
            ).json()
        assert status["engine"]["model"] == "fake" and status["counts"]["all"] == 2
        mine = next(c for c in listed if c["session"] == first.session)
        assert mine["remote"].startswith("127.0.0.1") and "token" not in json.dumps(listed)

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-e2e.png"), full_page=True)

        kick = row.get_by_role("button")
        await kick.click()
        await expect(kick).to_have_text("Confirm")
        await kick.click()
        await expect(row).to_have_count(0, timeout=2000)
        assert first.task is not None
        await asyncio.wait_for(first.task, 5)
        assert first.close_code == 4000
        await expect(page.locator("#stat-connections")).to_have_text("1", timeout=2000)
        assert clients[1].close_code is None
    finally:
        for client in clients:
            await client.ws.close()
            if client.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await client.task
        await context.close()


async def test_http_api_jobs_appear_under_their_token_label(
    browser: Browser, bridge: tuple[BridgeApp, str]
) -> None:
    _app, base = bridge
    context, page = await _login(browser, base)
    await expect(page.locator("#api-jobs")).to_have_text("No HTTP API jobs.", timeout=5000)

    photo = (
        "data:image/jpeg;base64," + base64.b64encode((IMAGES / "chelsea.jpg").read_bytes()).decode()
    )
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=CLIENT_TOKEN, max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="fake",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": photo}},
                    ],
                }
            ],
        )
    finally:
        await client.close()
    row = page.locator("#api-jobs tr", has_text=answer.id)
    await expect(row).to_be_visible(timeout=3000)
    cells = row.locator("td")
    await expect(cells.nth(1)).to_have_text(token_label(CLIENT_TOKEN))
    await expect(cells.nth(2)).to_have_text("http")
    await expect(cells.nth(3)).to_have_text("done")
    await expect(page.locator("#api-live")).to_have_text("0 running")
    assert CLIENT_TOKEN not in await page.content()
    await context.close()

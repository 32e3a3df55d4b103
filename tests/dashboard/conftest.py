"""Fixtures: the dashboard alone on a loopback aiohttp server, and Debian's Chromium.

Playwright drives the system Chromium (``/usr/bin/chromium``) and never downloads a browser.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Browser, async_playwright

from bridge.dashboard import Dashboard, setup_dashboard
from tests.dashboard.fakes import FakeClock, FakeOpsSource

TOKEN = "s3cret-admin-token-for-tests"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path(os.environ.get("BRIDGE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Env:
    """One running dashboard: its client, fake source, clock and handler object."""

    client: TestClient[web.Request, web.Application]
    source: FakeOpsSource
    clock: FakeClock
    dashboard: Dashboard

    async def login(self) -> str:
        """Log in through the form; returns the CSRF token the page would read."""
        resp = await self.client.post(
            "/dashboard/login", data={"token": TOKEN}, allow_redirects=False
        )
        assert resp.status == 303, await resp.text()
        return resp.cookies["bridge_csrf"].value


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = FakeClock()
    source = FakeOpsSource(clock)
    app = web.Application()
    dashboard = setup_dashboard(app, source, TOKEN, clock=clock, refresh_s=0.05)
    assert dashboard is not None
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Env(client, source, clock, dashboard)
    finally:
        await client.close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium; fails (not skips) when the chromium package is missing."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat before any I/O starts
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (done by .ci/run)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()

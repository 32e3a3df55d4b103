"""The engine panel while the model loads: the badge and a Loading row show the progress line."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, expect

from bridge.dashboard import setup_dashboard
from tests.dashboard.conftest import TOKEN
from tests.dashboard.fakes import FakeClock, FakeOpsSource

LINE = "loading model 'big': loading weights 120/400 (30%), 2 shards, 7.5 GB, 31.4 s"


async def test_engine_panel_shows_load_progress(browser: Browser) -> None:
    source = FakeOpsSource(FakeClock(time.time()))
    source.engine.update(
        ready=False, reason=LINE, loading={"phase": "loading weights", "text": LINE}
    )
    app = web.Application()
    setup_dashboard(app, source, TOKEN, clock=source.clock, refresh_s=0.25)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{base}/dashboard")
        await page.fill("#token", TOKEN)
        await page.click("#login-submit")
        await page.wait_for_url(f"{base}/dashboard")
        await expect(page.locator("#engine-ready")).to_have_text(LINE, timeout=5000)
        await expect(page.locator("#engine-kv")).to_contain_text("Loading" + LINE)
        source.engine.update(ready=True, reason=None, loading=None)
        await expect(page.locator("#engine-ready")).to_have_text("ready", timeout=5000)
        await expect(page.locator("#engine-kv")).not_to_contain_text("Loading")
    finally:
        await server.close()

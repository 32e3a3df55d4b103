"""The /chat page in real headless Chromium: token, photo, streamed answer, resume after a blip."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright, expect

from tests.conftest import IMAGES
from tests.dashboard.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.http.conftest import TOKEN, Served
from tests.http.fakes import ANSWER, GatedEngine


class Proxy:
    """A loopback TCP proxy in front of the bridge whose connections the test can cut."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def cut(self) -> None:
        """Drop every open connection (a network blip)."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium (the system one, as for the dashboard tests)."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat before any I/O starts
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_upload_a_photo_and_see_the_streamed_answer(tiny: Served, browser: Browser) -> None:
    page = await browser.new_page()
    await page.goto(tiny.base + "/chat")
    await page.fill("#token", TOKEN)
    await page.click("#login button")
    assert await page.evaluate("sessionStorage.getItem('bridge.token')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0
    await page.set_input_files("#file", str(IMAGES / "chelsea.jpg"))
    await expect(page.locator("#preview")).to_be_visible()
    await page.click("#ask")
    await expect(page.locator("#status")).to_have_text("Done.", timeout=60_000)
    assert (await page.text_content("#answer") or "").strip()


async def test_the_page_shows_the_queue_and_resumes_after_a_network_blip(
    gated: tuple[Served, GatedEngine], browser: Browser
) -> None:
    served, engine = gated
    proxy = Proxy(int(served.base.rsplit(":", 1)[1]))
    base = await proxy.start()
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(base + "/chat")
    await page.fill("#token", TOKEN)
    await page.click("#login button")
    await page.set_input_files("#file", str(IMAGES / "chelsea.jpg"))
    engine.hold, engine.waiting = asyncio.Event(), 2
    await page.click("#ask")
    await expect(page.locator("#status")).to_have_text("Waiting in the queue (position 3)…")
    engine.hold.set()
    await expect(page.locator("#status")).to_have_text("Answering…")
    engine.release(2)
    await expect(page.locator("#answer")).to_have_text("a tabby")
    engine.release(2)  # two more words, then the network drops
    await expect(page.locator("#answer")).to_have_text("a tabby cat on")
    proxy.cut()
    await expect(page.locator("#status")).to_contain_text("resuming")
    engine.release(100)
    await expect(page.locator("#status")).to_have_text("Done.", timeout=20_000)
    await expect(page.locator("#answer")).to_have_text(ANSWER)
    await context.close()
    await proxy.close()

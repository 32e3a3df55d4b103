"""``bridge_ready`` follows ``/readyz``: 0 while loading, 1 when ready, 0 again when draining."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from tests.app.fakes import FakeEngine
from tests.app.procs import free_port


async def scrape(base: str) -> tuple[int, float]:
    """``/readyz``'s status and the ``bridge_ready`` value ``/metrics`` shows right after."""
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/readyz") as resp:
            status = resp.status
        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
    match = re.search(r"^bridge_ready ([0-9.]+)$", text, re.MULTILINE)
    assert match is not None, text
    return status, float(match.group(1))


async def test_bridge_ready_is_set_with_the_truth_of_readyz() -> None:
    engine = FakeEngine()
    settings = load_settings({"port": str(free_port()), "token": ["t"]}, env={})
    app = BridgeApp(settings, engine=engine, store=MemoryStore(), adapters=[])
    await app.start()
    try:
        base = app.urls[0]
        assert await scrape(base) == (503, 0.0)
        engine.loaded.set()
        for _ in range(500):
            if (await scrape(base))[0] == 200:
                break
            await asyncio.sleep(0.01)
        assert await scrape(base) == (200, 1.0)
        app.draining = True
        assert await scrape(base) == (503, 0.0)
    finally:
        engine.loaded.set()
        await app.stop(grace_s=1.0)


async def test_bridge_ready_is_set_by_a_scrape_alone() -> None:
    """Prometheus may scrape without anyone calling /readyz: the gauge must still be right."""
    engine = FakeEngine()
    engine.loaded.set()
    settings = load_settings({"port": str(free_port()), "token": ["t"]}, env={})
    app = BridgeApp(settings, engine=engine, store=MemoryStore(), adapters=[])
    await app.start()
    try:
        for _ in range(500):
            if engine.ready:
                break
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http, http.get(app.urls[0] + "/metrics") as resp:
            assert re.search(r"^bridge_ready 1\.0$", await resp.text(), re.MULTILINE)
    finally:
        await app.stop(grace_s=1.0)

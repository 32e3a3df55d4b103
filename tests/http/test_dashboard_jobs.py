"""HTTP API jobs on the dashboard: ``GET /api/status`` lists them under the token's label with
origin ``http`` while they run and after they end, and never shows the token itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bridge.app import BridgeApp
from bridge.hub.config import token_label
from tests.http.conftest import OTHER, TOKEN, Served, serve, user_message, wait_ready
from tests.http.fakes import WORDS, GatedEngine

ADMIN = "sk-http-dashboard-admin-token"


@pytest.fixture
async def board() -> AsyncIterator[tuple[Served, GatedEngine]]:
    """The bridge with a gated engine and an admin token for the dashboard API."""
    engine = GatedEngine()
    app: BridgeApp = await serve(engine, flags={"admin-token": ADMIN})
    try:
        await wait_ready(app.urls[0])
        served = Served(app, app.urls[0], [])
        served.openai(TOKEN)
        yield served, engine
        await served.close()
    finally:
        engine.release(1000)
        await app.stop(grace_s=1.0)


async def status(base: str) -> tuple[str, dict[str, Any]]:
    """The raw body and the ``http`` panel of ``GET /api/status``."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/api/status", headers=headers) as r,
    ):
        assert r.status == 200
        body = await r.text()
        return body, (await r.json())["http"]


async def until(base: str, check: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll the panel until ``check(panel)`` holds (fails after ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        _, panel = await status(base)
        if check(panel):
            return panel
        assert loop.time() < deadline, f"panel never matched: {panel}"
        await asyncio.sleep(0.02)


async def test_running_and_finished_http_jobs_show_by_token_label(
    board: tuple[Served, GatedEngine],
) -> None:
    served, engine = board
    assert (await status(served.base))[1] == {"live": 0, "jobs": []}
    stream = await served.client.chat.completions.create(
        model="gated", stream=True, messages=[user_message()]
    )
    chunks = aiter(stream)
    first = await anext(chunks)
    job_id = first.id

    body, panel = await status(served.base)
    assert panel["live"] == 1
    [row] = panel["jobs"]
    assert row["id"] == job_id
    assert row["token"] == token_label(TOKEN) and row["token"].startswith("tok-")
    assert row["origin"] == "http"
    assert row["state"] == "running"
    assert row["duration_s"] is None
    assert TOKEN not in body and ADMIN not in body
    assert "What is in the picture?" not in body  # the prompt is not shown

    engine.release(len(WORDS))
    async for _ in chunks:
        pass
    panel = await until(served.base, lambda p: p["live"] == 0)
    [row] = panel["jobs"]
    assert row["id"] == job_id and row["state"] == "done"
    assert row["duration_s"] is not None and row["duration_s"] >= 0
    assert row["chunks"] >= len(WORDS)


async def test_running_jobs_come_first_and_each_has_its_own_token_label(
    board: tuple[Served, GatedEngine],
) -> None:
    served, engine = board
    done = await served.client.chat.completions.create(
        model="gated", stream=True, messages=[user_message()]
    )
    engine.release(len(WORDS))
    done_id = ""
    async for chunk in done:
        done_id = chunk.id
    await until(served.base, lambda p: p["live"] == 0 and len(p["jobs"]) == 1)

    other = served.openai(OTHER)
    running = await other.chat.completions.create(
        model="gated", stream=True, messages=[user_message()]
    )
    first = await anext(aiter(running))
    body, panel = await status(served.base)
    states = [(r["id"], r["state"]) for r in panel["jobs"]]
    assert states == [(first.id, "running"), (done_id, "done")]
    assert [r["token"] for r in panel["jobs"]] == [token_label(OTHER), token_label(TOKEN)]
    assert panel["live"] == 1
    assert OTHER not in body and TOKEN not in body
    engine.release(len(WORDS))
    async for _ in running:
        pass

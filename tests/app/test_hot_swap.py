"""Hot swap through the admin API on the real engine: no job lost, a bad model keeps the old one."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import websockets

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from engine.tiny import build_tiny_model
from tests.app.procs import free_port
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES

ADMIN = "admin-token-for-swap"


async def run_jobs(url: str, count: int) -> list[dict[str, object]]:
    """Submit ``count`` jobs on one connection and return each job's last event."""
    image = base64.b64encode((IMAGES / "rocket.jpg").read_bytes()).decode()
    finals: dict[str, dict[str, object]] = {}
    async with websockets.connect(url, max_size=2**24) as ws:
        await ws.send(json.dumps({"type": "hello", "token": "client"}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        for i in range(count):
            frame = {"type": "submit", "id": f"j{i}", "prompt": "What?", "image": image}
            await ws.send(json.dumps({**frame, "max_tokens": 8}))
            await asyncio.sleep(0.02)
        while len(finals) < count:
            got = await recv_frame(ws, 120)
            if got.get("type") == "event" and got["kind"] in ("done", "error"):
                finals[str(got["id"])] = got
            elif got.get("type") == "error":
                finals[str(got.get("id"))] = got
    return list(finals.values())


async def swap(base: str, model: str) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/api/admin/model", json={"model": model}, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_swap_under_load_loses_no_job_and_a_bad_model_keeps_the_old(tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other-model")
    port = free_port()
    settings = load_settings(
        {"port": str(port), "token": ["client"], "admin-token": ADMIN, "store": "memory://"},
        env={},
    )
    app = BridgeApp(settings, store=MemoryStore())
    await app.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if app.engine.status().ready:
                break
            await asyncio.sleep(0.1)
        assert app.engine.status().ready
        jobs = asyncio.create_task(run_jobs(f"ws://127.0.0.1:{port}/ws", 24))
        await asyncio.sleep(0.3)
        status, body = await swap(base, str(other))
        assert status == 200, body
        finals = await jobs
        assert len(finals) == 24
        assert all(f.get("kind") == "done" for f in finals), finals
        assert str(other) in app.engine.status().model

        status, body = await swap(base, str(tmp_path / "no-such-model"))
        assert status in (400, 409), body
        assert "error" in body
        assert str(other) in app.engine.status().model
        assert [f.get("kind") for f in await run_jobs(f"ws://127.0.0.1:{port}/ws", 2)] == [
            "done",
            "done",
        ]
    finally:
        await app.stop(grace_s=2.0)

"""One end-to-end job through the real engine (tiny random-weight model on CPU) and the real hub."""

from __future__ import annotations

import asyncio
import random

from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.client import HubClient
from bridge.hub import Hub
from bridge.metrics import Metrics
from bridge.store.memory import MemoryStore
from engine import Engine, EngineConfig
from engine.tiny import ensure_tiny_model
from tests.conftest import IMAGES
from tests.hub.conftest import TOKEN, hub_config

IMAGE = (IMAGES / "chelsea.jpg").read_bytes()


async def test_a_real_job_streams_through_the_hub_to_the_reference_client() -> None:
    engine = Engine(
        EngineConfig(
            model=str(ensure_tiny_model()),
            device="cpu",
            max_new_tokens=12,
            warmup=False,
            cache_ttl_s=0,
        )
    )
    await engine.start()
    hub = Hub(hub_config(heartbeat_s=5.0), engine=engine, store=MemoryStore(), metrics=Metrics())
    await hub.start()
    app = web.Application()
    app.router.add_get("/ws", hub.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with HubClient(url, TOKEN, rng=random.Random(1)) as client:
            await client.submit("cat", "What is in the picture?", IMAGE, max_tokens=8)
            frames = []
            async with asyncio.timeout(120):
                async for frame in client.frames():
                    frames.append(frame)
                    if frame.get("kind") in ("done", "error"):
                        break
        kinds = [f["kind"] for f in frames]
        assert kinds[-1] == "done", frames[-1]
        assert "started" in kinds and kinds.count("done") == 1
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        text = "".join(f["text"] for f in frames if f["kind"] == "delta")
        assert text == frames[-1]["text"]
        assert frames[-1]["usage"]["completion_tokens"] >= 1
    finally:
        await hub.shutdown(grace_s=1.0)
        await server.close()
        await engine.stop(grace_s=1.0)

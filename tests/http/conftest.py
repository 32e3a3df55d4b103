"""Fixtures: a real bridge (BridgeApp) on loopback with the tiny model or a gated fake engine,
and the official ``openai`` client pointed at it."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from engine import Engine, EngineConfig
from engine.tiny import ensure_tiny_model
from engine.types import EngineLike
from tests.conftest import IMAGES
from tests.http.fakes import GatedEngine

TOKEN = "sk-http-test-token-1"
OTHER = "sk-http-test-token-2"
PHOTO = (IMAGES / "chelsea.jpg").read_bytes()
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_message(
    text: str = "What is in the picture?", url: str = DATA_URL
) -> ChatCompletionUserMessageParam:
    """One user message with a text part and an image part, as the openai docs show it."""
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }


@dataclass
class Served:
    """A running bridge: its app, base URL, and an openai client with a valid key."""

    app: BridgeApp
    base: str
    clients: list[openai.AsyncOpenAI]

    @property
    def client(self) -> openai.AsyncOpenAI:
        """A client with the valid key."""
        return self.clients[0]

    def openai(self, key: str) -> openai.AsyncOpenAI:
        """Another client (closed with the fixture)."""
        client = openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def wait_ready(base: str, timeout_s: float = 120.0) -> None:
    """Poll /readyz until 200 (the model loaded) within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            async with http.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the bridge never became ready")


async def serve(
    engine: EngineLike, store: MemoryStore | None = None, flags: dict[str, Any] | None = None
) -> BridgeApp:
    """A started bridge on a free loopback port (``flags`` by option name, e.g. ``queue-size``)."""
    options: dict[str, Any] = {"port": str(free_port()), "token": [TOKEN, OTHER], **(flags or {})}
    settings = load_settings(options, env={})
    app = BridgeApp(settings, engine=engine, store=store or MemoryStore(), adapters=[])
    await app.start()
    return app


@pytest.fixture
async def tiny() -> AsyncIterator[Served]:
    """The bridge with the real tiny model (CPU, short answers)."""
    engine = Engine(
        EngineConfig(
            model=str(ensure_tiny_model()),
            device="cpu",
            max_new_tokens=12,
            warmup=False,
            cache_ttl_s=0,
        )
    )
    app = await serve(engine, flags={"model": "tiny"})
    try:
        await wait_ready(app.urls[0])
        served = Served(app, app.urls[0], [])
        served.openai(TOKEN)
        yield served
        await served.close()
    finally:
        await app.stop(grace_s=1.0)


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Served, GatedEngine]]:
    """The bridge with an engine whose every delta the test releases."""
    engine = GatedEngine()
    app = await serve(engine)
    try:
        await wait_ready(app.urls[0])
        served = Served(app, app.urls[0], [])
        served.openai(TOKEN)
        yield served, engine
        await served.close()
    finally:
        engine.release(1000)
        await app.stop(grace_s=1.0)

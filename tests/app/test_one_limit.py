"""One ``--max-image-bytes`` moves the image limit at every entry point at once.

A real bridge (tiny model on CPU, Feishu adapter against the fake Feishu) is started with the
limit set to exactly one photo's size: the photo passes the /ws hub, the HTTP API, the Feishu
download and the engine; the same photo plus one byte is refused by each of them. Under the
default limit (20 MiB) every one of those would have accepted it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets

from adapters.base import ImageFetchError, ImageRef, InboundMessage
from adapters.telegram import TelegramAdapter
from bridge.app import BridgeApp, engine_config, hub_config
from bridge.config import ConfigError, load_settings
from bridge.metrics import Metrics
from bridge.platforms import build_adapters
from bridge.store.memory import MemoryStore
from engine import Engine, EngineError, JobRequest
from engine.limits import DEFAULT_MAX_IMAGE_BYTES, Limits, frame_bytes_for
from engine.tiny import ensure_tiny_model
from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES

TOKEN = "limit-test-client-token"
PHOTO = (IMAGES / "chelsea.webp").read_bytes()
LIMIT = len(PHOTO)
TOO_BIG = PHOTO + b"\0"  # one byte over; decoders ignore trailing bytes, the limit does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def feishu() -> AsyncIterator[FakeFeishu]:
    fake = FakeFeishu()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def bridge(feishu: FakeFeishu) -> AsyncIterator[BridgeApp]:
    settings = load_settings(
        {
            "port": str(free_port()),
            "token": [TOKEN],
            "max-image-bytes": str(LIMIT),
            "feishu-mode": "webhook",
            "feishu-app-id": APP_ID,
            "feishu-app-secret": APP_SECRET,
            "feishu-verification-token": "vt",
            "feishu-base-url": feishu.base_url,
        },
        env={},
    )
    cfg = dataclasses.replace(
        engine_config(settings),
        model=str(ensure_tiny_model()),
        device="cpu",
        max_new_tokens=4,
        warmup=False,
        cache_ttl_s=0,
    )
    app = BridgeApp(settings, engine=Engine(cfg), store=MemoryStore())
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


async def ws_submit(app: BridgeApp, job_id: str, image: bytes) -> str:
    """Submit over /ws; the code of the error frame, or the kind of the job's last event."""
    url = app.urls[0].replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
        assert (await recv_frame(ws))["type"] == "welcome"
        frame = {"type": "submit", "id": job_id, "prompt": "What is it?",
                 "image": base64.b64encode(image).decode()}  # fmt: skip
        await ws.send(json.dumps(frame))
        while True:
            got = await recv_frame(ws)
            if got["type"] == "error":
                return str(got["code"])
            if got["type"] == "event" and got["kind"] in ("done", "error"):
                return str(got["kind"])


async def http_submit(app: BridgeApp, image: bytes) -> int:
    """POST /v1/chat/completions with the image as a data URL; the status code."""
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {
                        "url": "data:image/webp;base64," + base64.b64encode(image).decode()}},
                ],
            }
        ],
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(app.urls[0] + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


def inbound(key: str) -> InboundMessage:
    return InboundMessage(
        platform="feishu",
        chat_id="oc_1",
        message_id="om_1",
        event_id="ev_1",
        sender_id="ou_1",
        text="",
        images=(ImageRef(key),),
        message_type="image",
        received_at=0.0,
    )


async def test_one_setting_moves_the_image_limit_everywhere(
    bridge: BridgeApp, feishu: FakeFeishu
) -> None:
    assert LIMIT < DEFAULT_MAX_IMAGE_BYTES  # the default would have let TOO_BIG through
    await _wait_ready(bridge)
    # /ws hub submit
    assert await ws_submit(bridge, "fits", PHOTO) == "done"
    assert await ws_submit(bridge, "over", TOO_BIG) == "too_large"
    # HTTP API
    assert await http_submit(bridge, PHOTO) == 200
    assert await http_submit(bridge, TOO_BIG) == 413
    # An IM platform's download (the adapter the bridge built from the same settings)
    [adapter] = bridge.adapters
    feishu.images["fits"] = PHOTO
    feishu.images["over"] = TOO_BIG
    assert await adapter.fetch_image(inbound("fits"), ImageRef("fits")) == PHOTO
    with pytest.raises(ImageFetchError, match="too large"):
        await adapter.fetch_image(inbound("over"), ImageRef("over"))
    # The engine itself (an in-process caller that skips every edge)
    with pytest.raises(EngineError) as refused:
        bridge.engine.submit(JobRequest("e-over", TOO_BIG, "What is it?"))
    assert refused.value.code == "too_large"
    handle = bridge.engine.submit(JobRequest("e-fits", PHOTO, "What is it?"))
    kinds = [type(e).__name__ async for e in handle.events()]
    assert kinds[-1] == "Done"


async def _wait_ready(app: BridgeApp) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(2400):
            async with http.get(app.urls[0] + "/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the bridge never became ready")


def test_the_settings_build_one_limits_read_by_every_config() -> None:
    s = load_settings({"max-image-bytes": "3MiB", "max-prompt-chars": "900"}, env={})
    limits = s.limits
    assert limits is s.limits  # built once
    assert (limits.max_image_bytes, limits.max_prompt_chars) == (3 * 2**20, 900)
    assert limits.max_frame_bytes == frame_bytes_for(3 * 2**20, 900)
    hub = hub_config(s)
    assert (hub.max_image_bytes, hub.max_prompt_chars) == (3 * 2**20, 900)
    assert hub.max_frame_bytes == limits.max_frame_bytes
    assert engine_config(s).limits is limits
    pixels = load_settings({"max-image-pixels": "1000"}, env={})
    assert engine_config(pixels).limits.max_image_pixels == 1000


def test_a_platform_keeps_its_own_lower_cap() -> None:
    flags = {"telegram-mode": "polling", "telegram-token": "123:abc", "max-image-bytes": "64MiB"}
    [telegram] = build_adapters(load_settings(flags, env={}), _metrics(), MemoryStore())
    assert isinstance(telegram, TelegramAdapter)
    assert telegram.config.max_image_bytes == 20 * 1024 * 1024  # the Bot API's own file cap
    flags["max-image-bytes"] = "1MiB"
    [telegram] = build_adapters(load_settings(flags, env={}), _metrics(), MemoryStore())
    assert isinstance(telegram, TelegramAdapter)
    assert telegram.config.max_image_bytes == 2**20


def test_a_frame_too_small_for_the_image_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max-frame-bytes"):
        load_settings({"max-image-bytes": "8MiB", "max-frame-bytes": "1MiB"}, env={})
    big = load_settings({"max-image-bytes": "1MiB", "max-frame-bytes": "64MiB"}, env={})
    assert big.limits.max_frame_bytes == 64 * 2**20
    with pytest.raises(ValueError):
        Limits(max_image_bytes=0)


def _metrics() -> Metrics:
    return Metrics()

"""Hostile prompts against a real ``bridge serve``: each is sent beside three jobs of another
client token, in the same engine batch, over ``/ws`` and in signed Feishu events; the three
neighbours always end ``done``.

The prompts are the issue's reproductions: a lone UTF-16 surrogate (``"\\ud800"`` in the JSON)
and the literal image placeholder ``<image>``. Batches hold 4 jobs and wait up to 10 s for them,
so each round's 4 jobs share one batch (checked on ``bridge_engine_batch_size``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from adapters.feishu.crypto import AESCipher, signature
from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu
from tests.app.procs import BridgeProcess
from tests.app.test_feishu_e2e import final_text
from tests.conftest import IMAGES

KEY = "test-encrypt-key-0123"
VERIFY = "test-verification-token"
PHOTO = base64.b64encode((IMAGES / "coffee.jpg").read_bytes()).decode("ascii")
LIMIT_S = 120.0


@pytest.fixture(params=["static", "continuous"])
def batching(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bridge_args(fake: FakeFeishu, db: Path, batching: str) -> list[str]:
    return [
        "--store", f"sqlite:///{db}",
        "--token", "tok-hostile",
        "--token", "tok-neighbour",
        "--token-submit-rate", "0",
        "--max-new-tokens", "8",
        "--max-batch", "4",
        "--batch-wait-ms", "10000",
        "--batching", batching,
        "--device", "cpu",
        "--feishu-mode", "webhook",
        "--feishu-app-id", APP_ID,
        "--feishu-app-secret", APP_SECRET,
        "--feishu-verification-token", VERIFY,
        "--feishu-encrypt-key", KEY,
        "--feishu-base-url", fake.base_url,
    ]  # fmt: skip


class Client:
    """A ``/ws`` client whose reader answers pings and queues every other frame."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def hello(cls, bridge: BridgeProcess, token: str) -> Client:
        ws = await websockets.connect(bridge.ws_url, max_size=2**24)
        await ws.send(json.dumps({"type": "hello", "token": token}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        return cls(ws)

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame.get("type") == "ping":
                await self.ws.send(json.dumps({"type": "pong", "ts": frame.get("ts")}))
            else:
                self.frames.put_nowait(frame)

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


def submit(job_id: str, prompt_json: str) -> str:
    """A submit frame with ``prompt_json`` spliced in raw, so ``\\ud800`` reaches the server."""
    return (
        '{"type":"submit","id":"' + job_id + '","image":"' + PHOTO + '","prompt":'
        + prompt_json + ',"max_tokens":8}'
    )  # fmt: skip


async def outcomes(client: Client, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The terminal event (or error frame) of each job in ``ids``."""
    ended: dict[str, dict[str, Any]] = {}
    while set(ended) != ids:
        frame = await asyncio.wait_for(client.frames.get(), LIMIT_S)
        if frame.get("type") == "error" or frame.get("kind") in ("done", "error"):
            ended[frame["id"]] = frame
    return ended


async def neighbours(client: Client, round_: str) -> set[str]:
    ids = {f"{round_}-n{i}" for i in range(3)}
    for job_id in sorted(ids):
        await client.send(submit(job_id, json.dumps(f"Describe the image. {job_id}")))
    return ids


def signed_post(message_id: str, text_json: str) -> tuple[bytes, dict[str, str]]:
    """An encrypted, signed ``post`` event: the sample photo and ``text_json`` (raw JSON)."""
    content = (
        '{"content":[[{"tag":"img","image_key":"img_v3_sample_coffee"},'
        '{"tag":"text","text":' + text_json + "}]]}"
    )
    event = {
        "schema": "2.0",
        "header": {
            "event_id": f"ev_{message_id}",
            "event_type": "im.message.receive_v1",
            "token": VERIFY,
            "app_id": APP_ID,
        },
        "event": {
            "sender": {"sender_id": {"open_id": "ou_hostile"}, "sender_type": "user"},
            "message": {
                "message_id": message_id,
                "chat_id": "oc_hostile_chat",
                "chat_type": "p2p",
                "message_type": "post",
                "content": content,
            },
        },
    }
    plain = json.dumps(event).encode()
    body = json.dumps({"encrypt": AESCipher(KEY).encrypt(plain, os.urandom(16))}).encode()
    ts, nonce = str(int(time.time())), "n0nce"
    headers = {
        "Content-Type": "application/json",
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, KEY, body),
    }
    return body, headers


async def feishu_answer(fake: FakeFeishu, message_id: str) -> str:
    """The final (green) card text of the reply to ``message_id``."""
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        replies = [r for r in fake.replies if r.parent_id == message_id]
        if replies and (text := final_text(fake, replies[0].message_id)) is not None:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to {message_id}: {fake.replies} {fake.patches[-3:]}")


def sample(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def test_hostile_prompts_never_fail_their_neighbours(
    feishu: FakeFeishu, tmp_path: Path, batching: str
) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log", *bridge_args(feishu, tmp_path / "b.db", batching)
    ).start()
    try:
        await bridge.wait_ready()
        hostile = await Client.hello(bridge, "tok-hostile")
        other = await Client.hello(bridge, "tok-neighbour")
        async with aiohttp.ClientSession() as http:
            # /ws: a lone surrogate is refused at the edge, <image> is answered as text.
            await hostile.send(submit("ws-surrogate", r'"what is \ud800 this"'))
            await hostile.send(submit("ws-image", '"<image> what is in this picture"'))
            ids = await neighbours(other, "ws")
            refused = await outcomes(hostile, {"ws-surrogate", "ws-image"})
            assert refused["ws-surrogate"]["type"] == "error"
            assert refused["ws-surrogate"]["code"] == "bad_frame"
            assert refused["ws-image"]["kind"] == "done", refused["ws-image"]
            assert all(f["kind"] == "done" for f in (await outcomes(other, ids)).values())

            # Feishu: signed posts with the photo and each hostile text, beside three jobs.
            for name, text_json in (("image", '"<image> what is this"'), ("sur", r'"\ud800 hi"')):
                message_id = f"om_hostile_{name}"
                body, headers = signed_post(message_id, text_json)
                async with http.post(
                    bridge.base + "/webhooks/feishu", data=body, headers=headers
                ) as resp:
                    assert resp.status == 200, await resp.text()
                ids = await neighbours(other, f"fs-{name}")
                assert all(f["kind"] == "done" for f in (await outcomes(other, ids)).values())
                await feishu_answer(feishu, message_id)

            async with http.get(bridge.base + "/metrics") as resp:
                metrics = await resp.text()
        await hostile.close()
        await other.close()
        # Each of the three rounds ran as one batch of 4: the hostile job beside its neighbours.
        batches = sample(metrics, "bridge_engine_batch_size_count")
        small = sample(metrics, 'bridge_engine_batch_size_bucket{le="3.0"}')
        assert batches - small >= 3, metrics
        assert sample(metrics, 'bridge_engine_requests_total{outcome="done"}') == 12
        assert sample(metrics, 'bridge_engine_requests_total{outcome="internal"}') == 0
        assert "engine.generate_failed" not in bridge.log()
        assert "engine.prefill_failed" not in bridge.log()
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()

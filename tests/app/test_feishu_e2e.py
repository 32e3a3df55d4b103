"""Feishu end to end: real bridge processes, a fake Feishu on loopback, kill -9 and restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu
from tests.app.procs import BridgeProcess
from tests.app.wsclient import recv_frame
from tests.conftest import DATA

SAMPLE = json.loads((DATA / "feishu" / "image_message_plain.json").read_text())
MESSAGE_ID = "om_sample_image_1"
CHAT_TOPIC = "chat:feishu:oc_sample_chat_1"


def bridge_args(fake: FakeFeishu, db: Path, *extra: str) -> list[str]:
    return [
        "--store", f"sqlite:///{db}",
        "--token", "client-token",
        "--topic-grant", "client-token=chat:feishu:*",
        "--max-new-tokens", "24",
        "--feishu-mode", "webhook",
        "--feishu-app-id", APP_ID,
        "--feishu-app-secret", APP_SECRET,
        "--feishu-verification-token", "test-verification-token",
        "--feishu-base-url", fake.base_url,
        *extra,
    ]  # fmt: skip


async def deliver(bridge: BridgeProcess, body: str = SAMPLE["body"]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            bridge.base + "/webhooks/feishu", data=body.encode(), headers=SAMPLE["headers"]
        ) as resp,
    ):
        return resp.status


def answers(fake: FakeFeishu, parent: str = MESSAGE_ID) -> list[Any]:
    return [r for r in fake.replies if r.parent_id == parent]


def final_text(fake: FakeFeishu, reply_id: str) -> str | None:
    """The text of the last 'done' card PATCHed onto the reply, if any."""
    for _ts, mid, content in reversed(fake.patches):
        card = json.loads(content)
        if mid == reply_id and card["header"]["template"] == "green":
            return str(card["elements"][0]["text"]["content"])
    return None


async def wait_final(fake: FakeFeishu, limit_s: float = 60.0) -> str:
    for _ in range(int(limit_s * 20)):
        replies = answers(fake)
        if replies and (text := final_text(fake, replies[0].message_id)) is not None:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"no final answer; replies={fake.replies} patches={fake.patches[-3:]}")


async def test_redelivered_four_times_one_answer_also_streamed_to_a_subscriber(
    feishu: FakeFeishu, tmp_path: Path
) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", *bridge_args(feishu, tmp_path / "b.db")).start()
    try:
        await bridge.wait_ready()
        async with websockets.connect(bridge.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "client-token"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "topic": CHAT_TOPIC}))
            assert await recv_frame(ws) == {"type": "subscribed", "topic": CHAT_TOPIC}
            statuses = [await deliver(bridge) for _ in range(4)]
            assert statuses == [200, 200, 200, 200]
            streamed, done = "", None
            while done is None:
                frame = await recv_frame(ws, 60)
                if frame.get("type") != "event":
                    continue
                assert frame["topic"] == CHAT_TOPIC and frame["id"] == f"feishu:{MESSAGE_ID}"
                if frame["kind"] == "delta":
                    streamed += frame["text"]
                if frame["kind"] in ("done", "error"):
                    done = frame
        assert done["kind"] == "done" and done["text"] == streamed
        text = await wait_final(feishu)
        assert text == (done["text"] or " ")
        assert len(answers(feishu)) == 1 and feishu.reply_posts == 1
        downloads = [p for route, p in feishu.requests if route == "resource"]
        assert len(downloads) == 1
        async with aiohttp.ClientSession() as http, http.get(bridge.base + "/metrics") as resp:
            metrics = await resp.text()
        assert 'bridge_feishu_events_total{outcome="accepted"} 1.0' in metrics
        assert 'bridge_feishu_events_total{outcome="duplicate"} 3.0' in metrics
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()


async def test_kill_9_after_the_ack_then_restart_gives_exactly_one_answer(
    feishu: FakeFeishu, tmp_path: Path
) -> None:
    args = bridge_args(feishu, tmp_path / "b.db")
    first = BridgeProcess(tmp_path / "first.log", *args).start()
    second = BridgeProcess(tmp_path / "second.log", *args)
    try:
        await first.wait_ready()
        assert await deliver(first) == 200
        first.kill9()  # acknowledged, then the process dies at once
        second.start()
        await second.wait_ready()
        assert await deliver(second) == 200  # Feishu re-delivers: a duplicate now
        await wait_final(feishu)
        assert len(answers(feishu)) == 1
        assert "relay_recovered" in second.log() or "im_duplicate" in second.log()
        assert await second.terminate() == 0
    finally:
        first.ensure_dead()
        second.ensure_dead()


async def test_bad_signature_is_refused_and_nothing_is_downloaded(
    feishu: FakeFeishu, tmp_path: Path
) -> None:
    bad = json.loads((DATA / "feishu" / "image_message_bad_signature.json").read_text())
    args = bridge_args(feishu, tmp_path / "b.db", "--feishu-encrypt-key", "test-encrypt-key-0123")
    bridge = BridgeProcess(tmp_path / "b.log", *args).start()
    try:
        await bridge.wait_ready()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                bridge.base + "/webhooks/feishu", data=bad["body"].encode(), headers=bad["headers"]
            ) as resp,
        ):
            assert resp.status in (401, 403)
        await asyncio.sleep(0.2)
        assert feishu.requests == [] and feishu.replies == []
        assert "test-encrypt-key-0123" not in bridge.log()
        assert APP_SECRET not in bridge.log()
    finally:
        await bridge.terminate()
        bridge.ensure_dead()

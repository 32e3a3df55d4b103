"""Slack end to end: a real ``bridge serve --slack-mode socket`` against the fake Slack."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from bridge.relay import TEXT_ONLY_REPLY
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, message_envelope
from tests.app.procs import BridgeProcess
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES

CHANNEL = "C0E2ECHAN"
TS = "1700000555.000100"
TOPIC = f"chat:slack:{CHANNEL}"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.stop()


def bridge_args(fake: FakeSlack, db: Path) -> list[str]:
    return [
        "--store", f"sqlite:///{db}",
        "--token", "client-token",
        "--topic-grant", "client-token=chat:slack:*",
        "--max-new-tokens", "24",
        "--slack-mode", "socket",
        "--slack-app-token", APP_TOKEN,
        "--slack-bot-token", BOT_TOKEN,
        "--slack-base-url", fake.api_url,
    ]  # fmt: skip


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()


async def until(cond: Any, what: str, limit_s: float = 60.0) -> None:
    for _ in range(int(limit_s * 20)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_image_redelivered_four_times_is_answered_once_in_its_thread(
    slack: FakeSlack, tmp_path: Path
) -> None:
    photo = slack.add_file(
        "F0E2E", "coffee.jpg", "image/jpeg", (IMAGES / "coffee.jpg").read_bytes()
    )
    bridge = BridgeProcess(tmp_path / "b.log", *bridge_args(slack, tmp_path / "b.db")).start()
    try:
        await bridge.wait_ready()
        link = await slack.wait_links(1, limit_s=30)
        for _ in range(200):  # /readyz shows the link once Slack said hello
            ready = await get_json(bridge.base + "/readyz")
            if ready["components"]["slack"]["state"] == "connected":
                break
            await asyncio.sleep(0.05)
        assert ready["components"]["slack"]["mode"] == "socket"
        assert ready["components"]["slack"]["state"] == "connected"
        async with websockets.connect(bridge.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "client-token"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "topic": TOPIC}))
            assert await recv_frame(ws) == {"type": "subscribed", "topic": TOPIC}
            for n in range(4):  # Slack re-delivers an unacked event with new envelope ids
                env = message_envelope(
                    f"env-{n}",
                    event_id="EvE2E1",
                    channel=CHANNEL,
                    ts=TS,
                    text="what is this?",
                    files=[photo],
                    retry_attempt=n,
                )
                await slack.send(link, env)
            await slack.wait_acks(4, limit_s=30)
            done = None
            while done is None:
                frame = await recv_frame(ws, 60)
                if frame.get("type") == "event" and frame["kind"] in ("done", "error"):
                    done = frame
        assert done["kind"] == "done"
        final = done["text"] or "…"
        await until(lambda: any(p["text"] == final for p in slack.posted.values()), "final text")
        replies = [p for p in slack.posted.values() if p["thread_ts"] == TS]
        assert len(replies) == 1 and len(slack.posted) == 1
        assert replies[0]["channel"] == CHANNEL
        assert slack.updates, "the answer is streamed into the reply with chat.update"
        times = [u.at for u in slack.updates]
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))
        assert len([r for r in slack.file_requests if "F0E2E" in r[0]]) == 1
        ready = await get_json(bridge.base + "/readyz")
        status = ready["components"]["slack"]
        assert status["state"] == "connected" and status["healthy"] is True
        assert status["events"] == {"accepted": 1, "duplicate": 3, "rejected": 0}
        async with aiohttp.ClientSession() as http, http.get(bridge.base + "/metrics") as resp:
            metrics = await resp.text()
        assert 'bridge_im_events_total{outcome="accepted",platform="slack"} 1.0' in metrics
        assert await bridge.terminate() == 0
        log = bridge.log()
        for secret in (APP_TOKEN, BOT_TOKEN, "fakebottoken", "fakeapptoken"):
            assert secret not in log
    finally:
        bridge.ensure_dead()


async def test_text_only_message_gets_the_short_help_in_its_thread(
    slack: FakeSlack, tmp_path: Path
) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", *bridge_args(slack, tmp_path / "b.db")).start()
    try:
        await bridge.wait_ready()
        link = await slack.wait_links(1, limit_s=30)
        await slack.send(link, message_envelope("env-t", event_id="EvT", channel=CHANNEL, ts=TS,
                                                text="hello bot"))  # fmt: skip
        await slack.wait_acks(1, limit_s=30)
        await until(lambda: bool(slack.posted), "help reply")
        (posted,) = slack.posted.values()
        assert posted == {"channel": CHANNEL, "thread_ts": TS, "text": TEXT_ONLY_REPLY}
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()


async def test_kill_9_after_the_ack_then_restart_gives_exactly_one_answer(
    slack: FakeSlack, tmp_path: Path
) -> None:
    photo = slack.add_file("F0K9", "coffee.jpg", "image/jpeg", (IMAGES / "coffee.jpg").read_bytes())
    args = bridge_args(slack, tmp_path / "b.db")
    first = BridgeProcess(tmp_path / "first.log", *args).start()
    second = BridgeProcess(tmp_path / "second.log", *args)

    def envelope(n: int) -> dict[str, Any]:
        return message_envelope(
            f"env-k{n}", event_id="EvK9", channel=CHANNEL, ts=TS, files=[photo], retry_attempt=n
        )

    try:
        await first.wait_ready()
        await slack.send(await slack.wait_links(1, limit_s=30), envelope(0))
        await slack.wait_acks(1, limit_s=30)
        first.kill9()  # acknowledged, then the process dies at once
        second.start()
        await second.wait_ready()
        await slack.send(await slack.wait_links(2, limit_s=30), envelope(1))  # a re-delivery
        await slack.wait_acks(2, limit_s=30)

        def answered() -> bool:
            logs = first.log() + second.log()
            return "relay_answered" in logs and bool(slack.updates)

        await until(answered, "an answer")
        assert len(slack.posted) == 1
        assert "relay_recovered" in second.log() or "im_duplicate" in second.log()
        assert await second.terminate() == 0
    finally:
        first.ensure_dead()
        second.ensure_dead()

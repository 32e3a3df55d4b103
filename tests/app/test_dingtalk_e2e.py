"""DingTalk Stream mode end to end: a real bridge process, the fake DingTalk, one answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.adapters.dingtalk.fake_dingtalk import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeDingTalk,
    Sent,
    bot_message,
)
from tests.app.procs import BridgeProcess
from tests.conftest import IMAGES, UNIT


@pytest.fixture
async def dingtalk() -> AsyncIterator[FakeDingTalk]:
    """A started fake DingTalk serving the coffee photo under ``dlcode-coffee``."""
    fake = FakeDingTalk()
    fake.files["dlcode-coffee"] = (IMAGES / "coffee.jpg").read_bytes()
    await fake.start()
    yield fake
    await fake.stop()


async def wait_sent(fake: FakeDingTalk, n: int = 1, limit_s: float = 60.0) -> list[Sent]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s * UNIT
    while len(fake.sent) < n:
        assert loop.time() < deadline, f"no answer; sent={fake.sent}"
        await asyncio.sleep(0.05)
    return fake.sent


async def readyz(bridge: BridgeProcess) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(bridge.base + "/readyz") as resp:
        body: dict[str, object] = await resp.json()
    return body


async def test_picture_delivered_four_times_gets_one_answer_in_the_conversation(
    dingtalk: FakeDingTalk, tmp_path: Path
) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log",
        "--store", f"sqlite:///{tmp_path}/b.db",
        "--max-new-tokens", "16",
        "--dingtalk-mode", "stream",
        "--dingtalk-client-id", CLIENT_ID,
        "--dingtalk-client-secret", CLIENT_SECRET,
        "--dingtalk-base-url", dingtalk.base_url,
    ).start()  # fmt: skip
    try:
        await bridge.wait_ready()
        await dingtalk.wait_connections(1, limit_s=60 * UNIT)
        body = await readyz(bridge)
        component = body["components"]["dingtalk"]  # type: ignore[index]
        assert component["mode"] == "stream" and component["state"] == "connected"
        assert CLIENT_SECRET not in json.dumps(body)

        data = bot_message(dingtalk, msg_id="msgE2E==", conversation_id="cidE2E==")
        first = await dingtalk.push_callback(data)
        await dingtalk.wait_ack(first, limit_s=30 * UNIT)
        [sent] = await wait_sent(dingtalk)
        assert sent.via == "webhook" and sent.body["msgtype"] == "markdown"
        assert sent.body["markdown"]["text"].strip()
        # DingTalk re-delivers the same message three more times (one on a fresh link).
        for _ in range(2):
            await dingtalk.wait_ack(await dingtalk.push_callback(data), limit_s=30 * UNIT)
        again = await dingtalk.push_callback(data)
        await dingtalk.send_system("disconnect")
        await dingtalk.wait_connections(2, limit_s=60 * UNIT)
        await dingtalk.wait_ack(again, limit_s=30 * UNIT)
        await asyncio.sleep(0.5)  # room for a wrong second answer to show up
        assert len(dingtalk.sent) == 1
        log = bridge.log()
        assert "im_duplicate" in log and "relay_answered" in log  # the photo was fetched
        assert CLIENT_SECRET not in log and "SECRETTOKEN" not in log and "session=" not in log
        body = await readyz(bridge)
        assert body["components"]["dingtalk"]["state"] == "connected"  # type: ignore[index]
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()


async def test_with_a_card_template_the_answer_streams_into_one_finished_card(
    dingtalk: FakeDingTalk, tmp_path: Path
) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log",
        "--store", f"sqlite:///{tmp_path}/b.db",
        "--max-new-tokens", "24",
        "--dingtalk-mode", "stream",
        "--dingtalk-client-id", CLIENT_ID,
        "--dingtalk-client-secret", CLIENT_SECRET,
        "--dingtalk-base-url", dingtalk.base_url,
        "--dingtalk-card-template-id", "tmpl-ai.schema",
    ).start()  # fmt: skip
    try:
        await bridge.wait_ready()
        await dingtalk.wait_connections(1, limit_s=60 * UNIT)
        data = bot_message(dingtalk, msg_id="msgCARD==", conversation_type="1")
        await dingtalk.wait_ack(await dingtalk.push_callback(data), limit_s=30 * UNIT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60 * UNIT
        while not any(c.flow_status == "3" for c in dingtalk.cards.values()):
            assert loop.time() < deadline, f"no finished card: {dingtalk.cards}"
            await asyncio.sleep(0.05)
        [card] = dingtalk.cards.values()
        assert card.create["openSpaceId"] == "dtv1.card//IM_ROBOT.staff001"
        assert card.streams[-1]["isFinalize"] is True and card.streams[-1]["content"].strip()
        assert dingtalk.card_creates == 1 and dingtalk.sent == []
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()

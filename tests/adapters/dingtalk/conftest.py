"""Fixtures of the DingTalk adapter tests: the loopback fake DingTalk and a recording sink."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.base import InboundMessage
from adapters.dingtalk import DingTalkAdapter
from adapters.dingtalk.frames import Frame
from adapters.dingtalk.protocol import CallbackDelivery
from tests.adapters.dingtalk.fake_dingtalk import BOT_TOPIC, FakeDingTalk
from tests.conftest import IMAGES


class Sink:
    """Records messages and dedupes on message id like the bridge; can fail or stall."""

    def __init__(self) -> None:
        self.seen: list[InboundMessage] = []
        self.known: set[str] = set()
        self.failures = 0  # how many calls to fail before recording
        self.stall: asyncio.Event | None = None
        self.entered = 0

    async def __call__(self, msg: InboundMessage) -> bool:
        self.entered += 1
        if self.stall is not None:
            await self.stall.wait()
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("store down")
        self.seen.append(msg)
        if msg.message_id in self.known:
            return False
        self.known.add(msg.message_id)
        return True


@pytest.fixture
async def fake() -> AsyncIterator[FakeDingTalk]:
    """A running fake DingTalk that serves one photo under ``dlcode-coffee``."""
    service = FakeDingTalk()
    service.files["dlcode-coffee"] = (IMAGES / "coffee.jpg").read_bytes()
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def sink() -> Sink:
    return Sink()


async def deliver(adapter: DingTalkAdapter, data: dict[str, Any]) -> InboundMessage:
    """Feed one bot-message callback through the adapter's handler; the message it recorded."""
    sink = Sink()
    adapter._sink = sink
    frame = Frame(
        type="CALLBACK", headers={"messageId": "d1", "topic": BOT_TOPIC}, data=json.dumps(data)
    )
    assert await adapter._on_callback(CallbackDelivery(frame)) is True
    return sink.seen[-1]

"""The asyncio long-connection client against a real loopback gateway speaking pbbp2 frames.

Times are multiples of ``MS`` so a slow machine can stretch them (BRIDGE_TEST_TIME_SCALE).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable

import pytest

from adapters.base import InboundMessage
from adapters.feishu import FeishuAdapter, FeishuConfig
from adapters.http import AiohttpClient
from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu

MS = 0.001 * float(os.environ.get("BRIDGE_TEST_TIME_SCALE", "1"))


def event(i: int, *, event_type: str = "im.message.receive_v1") -> bytes:
    return json.dumps(
        {
            "schema": "2.0",
            "header": {"event_id": f"ev_{i}", "event_type": event_type, "token": "vt"},
            "event": {
                "sender": {"sender_id": {"open_id": "ou_1"}},
                "message": {
                    "message_id": f"om_{i}",
                    "chat_id": "oc_1",
                    "message_type": "image",
                    "content": json.dumps({"image_key": f"img_{i}"}),
                },
            },
        }
    ).encode()


class Sink:
    """Records messages, answers like the bridge's dedupe, can fail or stall on demand."""

    def __init__(self) -> None:
        self.seen: list[InboundMessage] = []
        self.known: set[str] = set()
        self.fail_ids: set[str] = set()
        self.stall: asyncio.Event | None = None

    async def __call__(self, msg: InboundMessage) -> bool:
        if msg.message_id in self.fail_ids:
            self.fail_ids.discard(msg.message_id)
            raise RuntimeError("store down")
        if self.stall is not None:
            await self.stall.wait()
        self.seen.append(msg)
        if msg.message_id in self.known:
            return False
        self.known.add(msg.message_id)
        return True


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll ``predicate`` with a generous limit (never assumes a fast machine)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event to wait on
            await asyncio.sleep(2 * MS)


@pytest.fixture
async def running(fake: FakeFeishu) -> AsyncIterator[tuple[FeishuAdapter, Sink]]:
    fake.client_config = {
        "PingInterval": 200 * MS,
        "ReconnectCount": -1,
        "ReconnectInterval": 50 * MS,
        "ReconnectNonce": 10 * MS,
    }
    cfg = FeishuConfig(
        mode="longconn",
        app_id=APP_ID,
        app_secret=APP_SECRET,
        base_url=fake.base_url,
        pong_timeout_s=150 * MS,
        reconnect_base_s=10 * MS,
        api_backoff_base_s=10 * MS,
    )
    http = AiohttpClient()
    adapter = FeishuAdapter(cfg, http=http)
    sink = Sink()
    await adapter.start(sink)
    try:
        await fake.gateway.wait_connections(1)
        await until(lambda: adapter.status().state == "connected")
        yield adapter, sink
    finally:
        await adapter.stop()
        await http.close()


async def test_events_are_delivered_and_acked_with_200(
    fake: FakeFeishu, running: tuple[FeishuAdapter, Sink]
) -> None:
    adapter, sink = running
    for i in range(5):
        await fake.gateway.push(f"d{i}", event(i))
    await fake.gateway.push("d9", event(9), fragments=4)
    await fake.gateway.push("card", b"{}")  # a card callback: acked, not a message
    await until(lambda: len(fake.gateway.acks) == 7)
    assert sorted(fake.gateway.acks) == sorted(
        [(f"d{i}", 200) for i in (0, 1, 2, 3, 4, 9)] + [("card", 200)]
    )
    assert [m.message_id for m in sink.seen] == ["om_0", "om_1", "om_2", "om_3", "om_4", "om_9"]
    assert sink.seen[-1].event_id == "ev_9" and sink.seen[-1].images[0].key == "img_9"
    status = adapter.status()
    assert status.state == "connected" and status.healthy and status.last_event_at is not None
    assert status.events["accepted"] == 6
    assert fake.gateway.pending == {}


async def test_ignored_and_malformed_events_are_acked_not_redelivered(
    fake: FakeFeishu, running: tuple[FeishuAdapter, Sink]
) -> None:
    adapter, sink = running
    await fake.gateway.push("x1", event(1, event_type="im.chat.updated_v1"))
    await fake.gateway.push("x2", b"not json")
    await fake.gateway.push(
        "x3",
        b'{"schema":"2.0","header":{"event_type":"im.message.receive_v1","event_id":"e"},"event":{}}',
    )
    await until(lambda: len(fake.gateway.acks) == 3)
    assert {code for _, code in fake.gateway.acks} == {200}
    assert sink.seen == [] and adapter.status().events["rejected"] == 2


async def test_pong_loss_is_detected_and_the_client_reconnects(
    fake: FakeFeishu, running: tuple[FeishuAdapter, Sink]
) -> None:
    adapter, _ = running
    await until(lambda: fake.gateway.pings >= 1)
    loop = asyncio.get_running_loop()
    fake.gateway.drop_pongs = True
    started = loop.time()
    await until(lambda: adapter.status().attempts >= 1 or fake.gateway.connections >= 2)
    detected = loop.time() - started
    # Detection is bounded by one ping interval plus the pong deadline (plus scheduling slack).
    assert detected <= (200 + 150) * MS + 1.0
    fake.gateway.drop_pongs = False
    await fake.gateway.wait_connections(2)
    await until(lambda: adapter.status().state == "connected")
    assert adapter.status().last_error == "pong_timeout"
    assert adapter.status().attempts == 0


async def test_nothing_is_lost_across_an_abrupt_close(
    fake: FakeFeishu, running: tuple[FeishuAdapter, Sink]
) -> None:
    adapter, sink = running
    for i in range(3):
        await fake.gateway.push(f"a{i}", event(i))
    await until(lambda: len(fake.gateway.acks) == 3)
    sink.stall = asyncio.Event()
    await fake.gateway.push("a3", event(3))  # received, but the ack will not make it
    await asyncio.sleep(20 * MS)
    fake.gateway.abort()
    for i in range(4, 8):  # pushed while the link is down
        await fake.gateway.push(f"a{i}", event(i))
    sink.stall.set()
    await fake.gateway.wait_connections(2)
    await until(lambda: not fake.gateway.pending)
    assert sink.known == {f"om_{i}" for i in range(8)}
    assert adapter.status().events["accepted"] == 8
    # om_3 reached the sink before the link died, was re-delivered, and was seen as a duplicate.
    assert [m.message_id for m in sink.seen].count("om_3") == 2
    assert adapter.status().events["duplicate"] == 1


async def test_sink_failure_is_not_acked_200_and_comes_back(
    fake: FakeFeishu, running: tuple[FeishuAdapter, Sink]
) -> None:
    _, sink = running
    sink.fail_ids.add("om_1")
    await fake.gateway.push("f1", event(1))
    await until(lambda: len(fake.gateway.acks) == 1)
    assert fake.gateway.acks == [("f1", 500)] and "f1" in fake.gateway.pending
    fake.gateway.abort()  # Feishu re-delivers unacked events on the next connection
    await until(lambda: not fake.gateway.pending)
    assert fake.gateway.acks[-1] == ("f1", 200)
    assert [m.message_id for m in sink.seen] == ["om_1"]


async def test_refused_endpoint_backs_off_and_gives_up_honestly(fake: FakeFeishu) -> None:
    fake.client_config = {
        "PingInterval": 1,
        "ReconnectCount": -1,
        "ReconnectInterval": 0.05,
        "ReconnectNonce": 0.01,
    }
    cfg = FeishuConfig(
        mode="longconn",
        app_id=APP_ID,
        app_secret="wrong-secret-123",
        base_url=fake.base_url,
        reconnect_base_s=10 * MS,
        reconnect_max_s=50 * MS,  # before any ClientConfig arrives, ours caps the waits
        max_reconnect_attempts=2,
    )
    http = AiohttpClient()
    adapter = FeishuAdapter(cfg, http=http)
    try:
        await adapter.start(Sink())
        await until(lambda: adapter.status().state == "failed")
        status = adapter.status()
        assert status.attempts == 3 and not status.healthy
        assert status.last_error is not None and "514" in status.last_error
        assert "wrong-secret-123" not in repr(status.to_dict())
        assert [r for r, _ in fake.requests].count("endpoint") == 3
    finally:
        await adapter.stop()
        await http.close()
    assert adapter.status().state == "stopped"


async def test_unreachable_gateway_is_reported(fake: FakeFeishu) -> None:
    cfg = FeishuConfig(
        mode="longconn",
        app_id=APP_ID,
        app_secret=APP_SECRET,
        base_url=fake.base_url,
        max_reconnect_attempts=0,
        api_timeout_s=2.0,
    )
    fake.gateway.port = 1  # nothing listens there: connection refused
    http = AiohttpClient()
    adapter = FeishuAdapter(cfg, http=http)
    try:
        await adapter.start(Sink())
        await until(lambda: adapter.status().state == "failed")
        assert adapter.status().last_error
    finally:
        await adapter.stop()
        await http.close()

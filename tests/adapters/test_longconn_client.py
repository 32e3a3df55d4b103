"""The asyncio long-connection client against a real loopback gateway speaking pbbp2 frames.

Times are multiples of ``MS`` so a slow machine can stretch them (BRIDGE_TEST_TIME_SCALE).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from adapters.base import InboundMessage
from adapters.feishu import FeishuAdapter, FeishuConfig
from adapters.feishu.longconn.client import LongConnClient
from adapters.feishu.longconn.protocol import EventDelivery
from adapters.feishu.openapi import OpenApiClient
from adapters.http import AiohttpClient
from adapters.status import StatusTracker
from tests.adapters import fake_feishu
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
    with structlog.testing.capture_logs() as logs:
        # A card callback gets what Feishu's SDKs send it: nothing (no ack, no handling).
        await fake.gateway.push("card", b'{"action":{}}', kind="card")
        await fake.gateway.push("d9", event(9), fragments=4)
        await until(lambda: len(fake.gateway.acks) == 6)
    assert sorted(fake.gateway.acks) == sorted([(f"d{i}", 200) for i in (0, 1, 2, 3, 4, 9)])
    # The ack payload is the SDKs' own: exactly {"code":200}, no headers or data fields.
    assert set(fake.gateway.ack_payloads) == {b'{"code":200}'}
    ignored = [e for e in logs if e["event"] == "feishu.longconn_frame_ignored"]
    assert [(e["kind"], e["message_id"]) for e in ignored] == [("card", "card")]
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
    assert fake.gateway.ack_payloads == [b'{"code":500}']
    fake.gateway.abort()  # Feishu re-delivers unacked events on the next connection
    await until(lambda: not fake.gateway.pending)
    assert fake.gateway.acks[-1] == ("f1", 200)
    assert [m.message_id for m in sink.seen] == ["om_1"]


async def test_wrong_credentials_fail_at_once_and_give_up_at_the_limit(fake: FakeFeishu) -> None:
    cfg = FeishuConfig(
        mode="longconn",
        app_id=APP_ID,
        app_secret="wrong-secret-123",
        base_url=fake.base_url,
        refused_retry_s=20 * MS,
        max_reconnect_attempts=2,
    )
    http = AiohttpClient()
    adapter = FeishuAdapter(cfg, http=http)
    try:
        with structlog.testing.capture_logs() as logs:
            await adapter.start(Sink())
            await until(lambda: adapter.status().state == "failed")
            # Code 514 is "failed" with its reason from the first refusal, not "reconnecting".
            status = adapter.status()
            assert status.last_error is not None and "514" in status.last_error
            await until(lambda: any(e["event"] == "feishu.longconn_gave_up" for e in logs))
        status = adapter.status()
        assert status.state == "failed" and status.attempts == 3 and not status.healthy
        assert "wrong-secret-123" not in repr(status.to_dict())
        assert [r for r, _ in fake.requests].count("endpoint") == 3  # the first try + 2 retries
        assert [e["event"] for e in logs].count("feishu.longconn_refused") == 2
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


class States(StatusTracker):
    """A status tracker that also remembers every state it entered, in order."""

    def __init__(self) -> None:
        super().__init__("longconn", time.time)
        self.history: list[str] = []

    def set_state(self, state: str, *, attempts: int | None = None) -> None:
        if state != self.state:
            self.history.append(state)
        super().set_state(state, attempts=attempts)


class Sleeps:
    """Records every backoff wait instead of sleeping; ``gate`` (when set) holds the next one."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)


class Harness:
    """A bare LongConnClient on the fake: recorded waits, a seeded rng, a shiftable clock."""

    def __init__(self, fake: FakeFeishu, **settings: Any) -> None:
        options: dict[str, Any] = {
            "mode": "longconn",
            "app_id": APP_ID,
            "app_secret": APP_SECRET,
            "base_url": fake.base_url,
            "api_max_attempts": 1,
            "pong_timeout_s": 2.0,
            "reconnect_base_s": 1.0,
            "reconnect_max_s": 8.0,
            **settings,
        }
        self.cfg = FeishuConfig(**options)
        self.http = AiohttpClient()
        self.status = States()
        self.sleeps = Sleeps()
        self.offset = 0.0
        self.client = LongConnClient(
            self.cfg,
            OpenApiClient(self.cfg, self.http),
            self._handle,
            self.status,
            monotonic=lambda: time.monotonic() + self.offset,
            rng=random.Random(7),
            sleep=self.sleeps,
        )

    async def _handle(self, _delivery: EventDelivery) -> int:
        return 200

    async def close(self) -> None:
        await self.client.stop()
        await self.http.close()


@pytest.fixture
async def harness(fake: FakeFeishu) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**settings: Any) -> Harness:
        made.append(Harness(fake, **settings))
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            await h.close()


async def test_reconnect_count_limits_failed_tries_in_a_row_not_drops(
    fake: FakeFeishu, harness: Callable[..., Harness]
) -> None:
    # Feishu allows 2 reconnect tries; its interval (4 s) is the base of the waits.
    fake.client_config = {
        "PingInterval": 60,
        "ReconnectCount": 2,
        "ReconnectInterval": 4,
        "ReconnectNonce": 1,
    }
    h = harness()
    h.client.start()
    await fake.gateway.wait_connections(1)
    await until(lambda: h.status.state == "connected")

    def up_again(n: int) -> Callable[[], bool]:
        return lambda: h.client.connections == n and h.status.state == "connected"

    # Two quick drops and a third close: every retry brought the link up, so none counts.
    for n, drop in ((2, "abort"), (3, "abort"), (4, "close")):
        if drop == "abort":
            fake.gateway.abort()
        else:
            assert fake.gateway.conn is not None
            await fake.gateway.conn.close(1000, "bye")
        await fake.gateway.wait_connections(n)
        await until(up_again(n))
    assert "failed" not in h.status.history and h.status.attempts == 0
    # The first retry waits a part of ReconnectNonce; a link that keeps dropping backs off from
    # ReconnectInterval (doubling, capped at reconnect_max_s, never below the interval).
    first, second, third = h.sleeps.delays
    assert 0.0 <= first <= 1.0
    assert 4.0 <= second <= 4.0 * 1.2
    assert 8.0 <= third <= 8.0 * 1.2
    # A link that stayed up stable_after_s resets the backoff: the next retry is nonce-short.
    h.offset += h.cfg.stable_after_s
    fake.gateway.abort()
    await fake.gateway.wait_connections(5)
    await until(lambda: h.client.connections == 5)
    assert 0.0 <= h.sleeps.delays[3] <= 1.0
    # Now the gateway is gone: two failed tries in a row after the drop, and it gives up.
    fake.fail_next("endpoint", status=503)
    fake.fail_next("endpoint", status=503)
    fake.fail_next("endpoint", status=503)
    before = [r for r, _ in fake.requests].count("endpoint")
    with structlog.testing.capture_logs() as logs:
        fake.gateway.abort()
        await until(lambda: h.status.state == "failed")
    assert [r for r, _ in fake.requests].count("endpoint") - before == 2
    [gave_up] = [e for e in logs if e["event"] == "feishu.longconn_gave_up"]
    assert gave_up["failed_tries"] == 2 and gave_up["retries"] == 2
    assert h.status.attempts == 2 and h.status.history[-2:] == ["reconnecting", "failed"]


async def test_refused_app_is_failed_and_retried_slowly_until_it_works(
    fake: FakeFeishu, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_feishu, "APP_SECRET", "the-right-secret")  # ours is now wrong
    h = harness(refused_retry_s=600.0)
    h.sleeps.gate = asyncio.Event()
    h.client.start()
    await until(lambda: len(h.sleeps.delays) == 1)
    assert h.status.history == ["connecting", "failed"]  # never "reconnecting"
    assert h.status.last_error is not None and "code 514" in h.status.last_error
    assert 600.0 <= h.sleeps.delays[0] <= 720.0  # slowly, not the normal backoff
    monkeypatch.setattr(fake_feishu, "APP_SECRET", APP_SECRET)  # the operator fixed the app
    h.sleeps.gate.set()
    await fake.gateway.wait_connections(1)
    await until(lambda: h.status.state == "connected")
    assert h.status.history == ["connecting", "failed", "connected"]


async def test_refusal_stops_for_good_when_slow_retries_are_off(
    fake: FakeFeishu, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_feishu, "APP_SECRET", "the-right-secret")
    h = harness(refused_retry_s=0.0)
    with structlog.testing.capture_logs() as logs:
        h.client.start()
        await until(lambda: any(e["event"] == "feishu.longconn_gave_up" for e in logs))
    assert h.status.state == "failed" and h.sleeps.delays == []
    assert [r for r, _ in fake.requests].count("endpoint") == 1


@pytest.mark.parametrize(
    ("status", "autherr", "refused"),
    [(403, 0, True), (514, 1000040350, True), (514, 1, False), (500, 0, False)],
)
async def test_handshake_refusals_are_judged_like_the_sdk(
    fake: FakeFeishu,
    harness: Callable[..., Harness],
    status: int,
    autherr: int,
    refused: bool,
) -> None:
    fake.gateway.refuse_handshake = (status, autherr)
    h = harness(refused_retry_s=600.0)
    h.sleeps.gate = asyncio.Event()
    h.client.start()
    await until(lambda: len(h.sleeps.delays) == 1)
    assert fake.gateway.refused == 1
    assert h.status.last_error is not None and f"status={status}" in h.status.last_error
    if refused:  # a ban or the connection limit: failed, retried slowly
        assert h.status.state == "failed" and h.sleeps.delays[0] >= 600.0
    else:  # the gateway's trouble: the normal backoff (first retry: part of the nonce, 30 s)
        assert h.status.state == "reconnecting" and h.sleeps.delays[0] <= 30.0

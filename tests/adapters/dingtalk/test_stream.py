"""The stream client and adapter against the loopback fake DingTalk: acks, pings, reconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from adapters.dingtalk import DingTalkAdapter, DingTalkConfig
from tests.adapters.dingtalk.conftest import Sink
from tests.adapters.dingtalk.fake_dingtalk import (
    BOT_TOPIC,
    CLIENT_ID,
    CLIENT_SECRET,
    FakeDingTalk,
    bot_message,
)
from tests.conftest import UNIT


async def until(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll ``cond`` with a deadline (scaled for slow machines)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s * UNIT
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def running(fake: FakeDingTalk, sink: Sink) -> AsyncIterator[DingTalkAdapter]:
    adapter = make(fake)
    await adapter.start(sink)
    await fake.wait_connections(1)
    await until(lambda: adapter.status().state == "connected")
    yield adapter
    await adapter.stop()


def make(fake: FakeDingTalk, **overrides: Any) -> DingTalkAdapter:
    params: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "base_url": fake.base_url,
        "reconnect_base_s": 0.01,
        "reconnect_max_s": 0.05,
    }
    params.update(overrides)
    return DingTalkAdapter(DingTalkConfig(**params))


async def test_open_connection_sends_the_documented_body(
    running: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    body = fake.opens[0]
    assert body["clientId"] == CLIENT_ID and body["clientSecret"] == CLIENT_SECRET
    assert {"type": "CALLBACK", "topic": BOT_TOPIC} in body["subscriptions"]
    assert isinstance(body["ua"], str) and "localIp" in body
    status = running.status().to_dict()
    assert status["platform"] == "dingtalk" and status["mode"] == "stream"
    assert status["state"] == "connected" and status["healthy"] is True
    assert CLIENT_SECRET not in json.dumps(status) and CLIENT_SECRET not in repr(running)


async def test_callback_is_acked_only_after_the_sink_recorded_it(
    running: DingTalkAdapter, fake: FakeDingTalk, sink: Sink
) -> None:
    sink.stall = asyncio.Event()
    mid = await fake.push_callback(bot_message(fake, msg_id="m-stall"))
    await until(lambda: sink.entered == 1)
    assert fake.acks_for(mid) == []  # the sink has not returned: no ack yet
    sink.stall.set()
    ack = await fake.wait_ack(mid)
    assert ack["code"] == 200 and ack["message"] == "OK"
    assert ack["headers"] == {"contentType": "application/json", "messageId": mid}
    assert json.loads(ack["data"]) == {"response": None}
    assert [m.message_id for m in sink.seen] == ["m-stall"]
    msg = sink.seen[0]
    assert msg.platform == "dingtalk" and msg.chat_id == "cidGROUP1=="
    assert msg.topic == "chat:dingtalk:cidGROUP1==" and msg.chat_type == "group"
    assert msg.images[0].key == "dlcode-coffee"


async def test_a_failing_sink_leaves_the_callback_unacked_until_redelivered(
    running: DingTalkAdapter, fake: FakeDingTalk, sink: Sink
) -> None:
    sink.failures = 1
    mid = await fake.push_callback(bot_message(fake, msg_id="m-fail"))
    await until(lambda: sink.entered == 1)
    await asyncio.sleep(0.05)
    assert fake.acks_for(mid) == [] and mid in fake.pending
    await fake.abort()  # the next connection gets it again
    await fake.wait_ack(mid)
    assert fake.connections == 2 and mid not in fake.pending
    assert [m.message_id for m in sink.seen] == ["m-fail"]


async def test_ping_is_answered_with_the_same_id_and_data(
    running: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    mid = await fake.send_system("ping", {"opaque": "abc-123"})
    ack = await fake.wait_ack(mid)
    assert ack["code"] == 200 and json.loads(ack["data"]) == {"opaque": "abc-123"}


async def test_disconnect_moves_to_a_new_connection_without_losing_a_callback(
    running: DingTalkAdapter, fake: FakeDingTalk, sink: Sink
) -> None:
    sink.stall = asyncio.Event()
    first = await fake.push_callback(bot_message(fake, msg_id="m-before"))
    await until(lambda: sink.entered == 1)
    await fake.send_system("disconnect", {"reason": "server upgrade"})
    late = await fake.push_callback(bot_message(fake, msg_id="m-late"))  # ignored by the old link
    await fake.wait_connections(2)
    sink.stall.set()
    await fake.wait_ack(late)
    await until(lambda: not fake.pending)
    assert {m.message_id for m in sink.seen} == {"m-before", "m-late"}
    assert sink.known == {"m-before", "m-late"}
    assert fake.acks_for(first)
    assert running.status().state == "connected"


async def test_a_silent_socket_is_dropped_on_our_deadline_and_reconnected(
    fake: FakeDingTalk, sink: Sink
) -> None:
    adapter = make(fake, silent_timeout_s=0.3 * UNIT)
    await adapter.start(sink)
    try:
        await fake.wait_connections(1)
        fake.silent = True  # a half-open socket: nothing arrives, not even pings
        await until(lambda: fake.connections >= 2 or adapter.status().last_error == "silent")
        fake.silent = False
        await fake.wait_connections(2)
        assert adapter.status().last_error == "silent"
        await until(lambda: adapter.status().state == "connected")
        mid = await fake.push_callback(bot_message(fake, msg_id="m-after"))
        await fake.wait_ack(mid)
    finally:
        await adapter.stop()
    assert adapter.status().state == "stopped"


async def test_dingtalk_pings_keep_a_quiet_link_alive(fake: FakeDingTalk, sink: Sink) -> None:
    fake.ping_every_s = 0.05 * UNIT
    adapter = make(fake, silent_timeout_s=0.5 * UNIT)
    await adapter.start(sink)
    try:
        await fake.wait_connections(1)
        await until(lambda: len(fake.ping_ids) >= 20)  # two deadlines' worth of pings
        await until(lambda: all(fake.acks_for(mid) for mid in fake.ping_ids[:20]))
        assert fake.connections == 1 and adapter.status().state == "connected"
    finally:
        await adapter.stop()


async def test_same_message_delivered_four_times_is_accepted_once(
    running: DingTalkAdapter, fake: FakeDingTalk, sink: Sink
) -> None:
    data = bot_message(fake, msg_id="m-dup")
    mids = [await fake.push_callback(data) for _ in range(4)]
    for mid in mids:
        await fake.wait_ack(mid)
    assert sink.known == {"m-dup"} and len(sink.seen) == 4
    events = running.status().events
    assert events["accepted"] == 1 and events["duplicate"] == 3


async def test_hostile_frames_and_messages_are_survived(
    running: DingTalkAdapter, fake: FakeDingTalk, sink: Sink
) -> None:
    await fake.send_raw("{not json")
    await fake.send_raw(json.dumps({"type": "CALLBACK", "headers": {"messageId": 5}}))
    bad = await fake.push_callback({"msgtype": "text", "text": "no ids"})
    await fake.wait_ack(bad)  # acked: a re-delivery would bring the same unusable message
    good = await fake.push_callback(bot_message(fake, msg_id="m-ok", msgtype="text"))
    await fake.wait_ack(good)
    assert [m.message_id for m in sink.seen] == ["m-ok"]
    assert running.status().events["rejected"] == 1


async def test_wrong_credentials_show_failed_and_never_log_the_secret(
    fake: FakeDingTalk, sink: Sink
) -> None:
    wrong = "wrong-secret-DO-NOT-LOG"
    adapter = make(fake, client_secret=wrong)
    with structlog.testing.capture_logs() as logs:
        await adapter.start(sink)
        try:
            await until(lambda: adapter.status().state == "failed")
        finally:
            await adapter.stop()
    status = adapter.status()
    assert status.last_error is not None and "401" in status.last_error
    assert wrong not in json.dumps(status.to_dict()) and wrong not in str(logs)
    assert fake.connections == 0


async def test_status_goes_connecting_reconnecting_connected_honestly(
    fake: FakeDingTalk, sink: Sink
) -> None:
    for _ in range(3):
        fake.fail_next("open", 503, {"code": "ServiceUnavailable"})
    adapter = make(fake, api_max_attempts=1)
    states: list[tuple[str, int]] = []
    tracker = adapter._status
    original = tracker.set_state

    def record(state: str, *, attempts: int | None = None) -> None:
        original(state, attempts=attempts)
        states.append((tracker.state, tracker.attempts))

    tracker.set_state = record  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        await adapter.start(sink)
        try:
            await until(lambda: adapter.status().state == "connected")
            assert adapter.status().attempts == 0 and adapter.status().healthy
        finally:
            await adapter.stop()
    assert states[0] == ("connecting", 0)
    assert ("reconnecting", 3) in states
    up = states.index(("connected", 0))
    assert {s for s, _ in states[:up]} == {"connecting", "reconnecting"}
    assert {s for s, _ in states[up + 1 :]} == {"stopped"}
    lost = [e for e in logs if e["event"] == "dingtalk.stream_lost"]
    assert [e["failed_tries"] for e in lost] == [1, 2, 3]
    assert all(e["retry_in_s"] > 0 for e in lost) and "503" in lost[0]["reason"]

"""The Socket Mode link against the fake Slack: acks after the sink, refresh, deadline, refusals."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from adapters.base import InboundMessage
from adapters.slack import SlackAdapter, SlackConfig
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, message_envelope


def config(fake: FakeSlack, **kw: Any) -> SlackConfig:
    base = SlackConfig(
        app_token=APP_TOKEN,
        bot_token=BOT_TOKEN,
        base_url=fake.api_url,
        reconnect_base_s=0.05,
        reconnect_max_s=0.2,
        update_interval_s=0.1,
    )
    return dataclasses.replace(base, **kw)


class Sink:
    """Records messages; dedupes on the keys; can be held or made to fail."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.keys: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, msg: InboundMessage) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("store down")
        self.messages.append(msg)
        new = not (set(msg.dedupe_keys) & self.keys)
        self.keys.update(msg.dedupe_keys)
        return new


async def until(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s * 100)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def running(slack: FakeSlack) -> AsyncIterator[tuple[SlackAdapter, Sink]]:
    adapter = SlackAdapter(config(slack))
    sink = Sink()
    await adapter.start(sink)
    await until(lambda: adapter.status().state == "connected")
    try:
        yield adapter, sink
    finally:
        await adapter.stop()


async def test_connects_after_hello_and_acks_only_after_the_sink_recorded(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, sink = running
    status = adapter.status()
    assert status.platform == "slack" and status.mode == "socket" and status.healthy
    link = await slack.wait_links(1)
    sink.gate = asyncio.Event()
    await slack.send(link, message_envelope("env-1", text="hello"))
    await until(lambda: adapter.socket is not None and bool(adapter.socket._links))
    await asyncio.sleep(0.05)  # the envelope is waiting in the held sink
    assert slack.acks == [] and sink.messages == []
    sink.gate.set()
    await slack.wait_acks(1)
    assert slack.acks == [(1, "env-1")] and len(sink.messages) == 1
    assert adapter.status().events["accepted"] == 1


async def test_a_failing_sink_leaves_the_envelope_unacked_until_redelivered(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, sink = running
    link = await slack.wait_links(1)
    sink.fail = True
    await slack.send(link, message_envelope("env-1", text="x"))
    await slack.send(link, message_envelope("env-ignored", text="x", bot_id="B1"))
    await slack.wait_acks(1)
    assert slack.acks == [(1, "env-ignored")]  # ignored events are acked at once
    sink.fail = False
    for n in range(2, 5):  # Slack re-delivers with new envelope ids and retry_attempt
        await slack.send(link, message_envelope(f"env-{n}", text="x", retry_attempt=n - 1))
    await slack.wait_acks(4)
    assert adapter.status().events == {"accepted": 1, "duplicate": 2, "rejected": 0}


async def test_refresh_opens_the_next_link_before_dropping_the_old_and_loses_nothing(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, sink = running
    first = await slack.wait_links(1)
    sink.gate = asyncio.Event()
    await slack.send(first, message_envelope("env-a", event_id="EvA", ts="1.1", text="a"))
    await slack.send(first, {"type": "disconnect", "reason": "refresh_requested",
                             "debug_info": {"host": "fake-slack"}})  # fmt: skip
    second = await slack.wait_links(2)
    # The old link is still open while its envelope is in the sink, and still delivers.
    assert not first.ws.closed
    await slack.send(first, message_envelope("env-b", event_id="EvB", ts="1.2", text="b"))
    sink.gate.set()
    await slack.wait_acks(2)
    assert sorted(slack.acks) == [(1, "env-a"), (1, "env-b")]
    await until(lambda: first.closed.is_set())
    await slack.send(second, message_envelope("env-c", event_id="EvC", ts="1.3", text="c"))
    await slack.wait_acks(3)
    assert slack.acks[-1] == (2, "env-c")
    assert [m.text for m in sink.messages] == ["a", "b", "c"]
    assert adapter.status().state == "connected" and slack.opens == 2
    assert adapter.socket is not None and adapter.socket.refreshes == 1


async def test_a_silent_socket_is_dropped_and_the_client_reconnects(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack, ping_interval_s=0.1, receive_deadline_s=0.4))
    sink = Sink()
    seen: list[str] = []
    await adapter.start(sink)
    try:
        first = await slack.wait_links(1)
        await until(lambda: adapter.status().state == "connected")
        first.silent.set()  # the fake stops reading: our pings get no pong, nothing arrives
        while len(slack.links) < 2:
            seen.append(adapter.status().state)
            await asyncio.sleep(0.01)
        await until(lambda: adapter.status().state == "connected")
        assert "reconnecting" in seen
        assert "silent" in (adapter.status().last_error or "")
        second = slack.links[1]
        await slack.send(second, message_envelope("env-1", text="after"))
        await slack.wait_acks(1)
        assert slack.acks == [(2, "env-1")]
    finally:
        await adapter.stop()
    assert adapter.status().state == "stopped"


async def test_too_many_websockets_reconnects_with_backoff(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, _ = running
    first = await slack.wait_links(1)
    with structlog.testing.capture_logs() as logs:
        await slack.send(first, {"type": "disconnect", "reason": "too_many_websockets"})
        await slack.wait_links(2)
    (lost,) = [e for e in logs if e["event"] == "slack.socket_lost"]
    assert lost["retry_in_s"] >= 0.2  # starts at the capped step, not at reconnect_base_s
    await until(lambda: adapter.status().state == "connected")
    assert "too_many_websockets" in (adapter.status().last_error or "")


async def test_link_disabled_is_failed_and_stops_trying(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack))
    await adapter.start(Sink())
    try:
        first = await slack.wait_links(1)
        await until(lambda: adapter.status().state == "connected")
        await slack.send(first, {"type": "disconnect", "reason": "link_disabled"})
        await until(lambda: adapter.status().state == "failed")
        status = adapter.status()
        assert not status.healthy and "link_disabled" in (status.last_error or "")
        await asyncio.sleep(0.3)  # several backoff periods: no new link is asked for
        assert slack.opens == 1
    finally:
        await adapter.stop()


async def test_a_refused_app_token_is_failed_without_leaking_it(slack: FakeSlack) -> None:
    wrong = "xapp-1-WRONG-999-wrongtokenSECRET"
    with structlog.testing.capture_logs() as logs:
        adapter = SlackAdapter(config(slack, app_token=wrong))
        await adapter.start(Sink())
        try:
            await until(lambda: adapter.status().state == "failed")
            status = adapter.status()
        finally:
            await adapter.stop()
    assert "invalid_auth" in (status.last_error or "") and slack.opens == 0
    text = repr(logs) + repr(status.to_dict()) + repr(adapter) + repr(adapter.config)
    for secret in (wrong, BOT_TOKEN, "WRONG-999", "fakebottoken"):
        assert secret not in text


async def test_no_hello_in_time_is_retried(slack: FakeSlack) -> None:
    slack.hello = False
    adapter = SlackAdapter(config(slack, hello_timeout_s=0.2))
    await adapter.start(Sink())
    try:
        await slack.wait_links(2)
        assert adapter.status().state in ("reconnecting", "connecting")
        assert adapter.status().attempts >= 1
        slack.hello = True
        await until(lambda: adapter.status().state == "connected")
        assert adapter.status().attempts == 0
    finally:
        await adapter.stop()


async def test_bad_frames_and_unknown_envelopes_do_not_break_the_link(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, sink = running
    link = await slack.wait_links(1)
    await link.ws.send_str("not json {")
    await link.ws.send_bytes(b"\x00\x01")
    await slack.send(link, {"envelope_id": "env-slash", "type": "slash_commands", "payload": {}})
    bad = message_envelope("env-bad")
    bad["payload"]["event"]["ts"] = 17
    await slack.send(link, bad)
    await slack.send(link, message_envelope("env-ok", text="fine"))
    await slack.wait_acks(3)
    assert sorted(e for _, e in slack.acks) == ["env-bad", "env-ok", "env-slash"]
    assert [m.text for m in sink.messages] == ["fine"]
    assert adapter.status().events["rejected"] == 1 and adapter.status().state == "connected"


async def test_an_outage_is_reconnecting_then_connected_and_loses_nothing_sent_meanwhile(
    slack: FakeSlack, running: tuple[SlackAdapter, Sink]
) -> None:
    adapter, sink = running
    opens = slack.opens
    await slack.take_down()  # sockets closed; apps.connections.open answers HTTP 503
    await until(lambda: sum(1 for c in slack.calls if c.method == "apps.connections.open") > opens)
    await until(lambda: adapter.status().state == "reconnecting")
    assert not adapter.status().healthy
    await slack.push(message_envelope("env-out", event_id="EvOut", text="still there?"))
    assert slack.pending and not slack.acks  # Slack holds it while the app has no socket
    slack.bring_up()
    await until(lambda: adapter.status().state == "connected")
    await slack.wait_acks(1)
    assert slack.acks[-1][1] == "env-out" and not slack.pending
    assert [m.text for m in sink.messages] == ["still there?"]

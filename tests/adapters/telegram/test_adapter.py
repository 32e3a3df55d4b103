"""The Telegram adapter against the loopback fake Bot API: polling with a durable offset, the
webhook secret, 429s, edits, file download, and the token kept out of every log and error."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapters.base import ImageFetchError, InboundMessage, ReplyError
from adapters.telegram import TelegramAdapter, TelegramConfig
from adapters.telegram.reply import fit_text
from bridge.store.backoff import Backoff
from tests.adapters.telegram.fake_telegram import (
    TOKEN,
    FakeTelegram,
    mention,
    message,
    photo_sizes,
)

SECRET = "webhook-secret-Abc_123"


class MemoryOffsets:
    """An offset store that outlives adapters (a restart in one test)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.saves: list[int] = []

    async def load(self) -> int | None:
        return self.value

    async def save(self, offset: int) -> None:
        self.value = offset
        self.saves.append(offset)


class Sink:
    """Records messages; dedupes on the message id; can be told to fail."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.seen: set[str] = set()
        self.fail = 0

    async def __call__(self, msg: InboundMessage) -> bool:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store down")
        if msg.message_id in self.seen:
            return False
        self.seen.add(msg.message_id)
        self.messages.append(msg)
        return True


def fast_delays() -> Backoff:
    return Backoff(0.01, 0.05)


def make(tg: FakeTelegram, offsets: MemoryOffsets | None = None, **kw: Any) -> TelegramAdapter:
    cfg = TelegramConfig(
        mode=kw.pop("mode", "polling"),
        token=TOKEN,
        base_url=tg.base_url,
        webhook_secret=SECRET,
        poll_timeout_s=kw.pop("poll_timeout_s", 2),
        edit_interval_s=kw.pop("edit_interval_s", 0.0),
        **kw,
    )
    return TelegramAdapter(cfg, offsets=offsets or MemoryOffsets(), delays=fast_delays)


async def until(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def webhook(tg: FakeTelegram) -> AsyncIterator[tuple[TelegramAdapter, Sink]]:
    adapter = make(tg, mode="webhook")
    sink = Sink()
    await adapter.start(sink)
    await until(lambda: adapter.status().state == "listening")
    yield adapter, sink
    await adapter.stop()


def photo_update(uid: int, mid: int = 11, **kw: Any) -> dict[str, Any]:
    return {"update_id": uid, "message": message(mid, photo=photo_sizes("p"), **kw)}


async def test_polling_records_in_order_and_saves_the_offset_after_the_sink(
    tg: FakeTelegram,
) -> None:
    offsets, sink = MemoryOffsets(), Sink()
    adapter = make(tg, offsets)
    assert adapter.status().state == "off"
    await adapter.start(sink)
    try:
        first = await tg.push({"message": message(11, text="a")})
        second = await tg.push({"message": message(12, caption="b", photo=photo_sizes("q"))})
        await until(lambda: offsets.value == second["update_id"] + 1)
        assert [m.message_id for m in sink.messages] == ["42:11", "42:12"]
        assert offsets.saves == [first["update_id"] + 1, second["update_id"] + 1]
        assert adapter.status().state == "connected" and adapter.status().healthy
        polls = [p for m, p in tg.calls if m == "getUpdates"]
        assert polls[0]["timeout"] == 0 and polls[1]["timeout"] == 2
        assert all(p["allowed_updates"] == ["message"] for p in polls)
        assert adapter.status().events["accepted"] == 2
    finally:
        await adapter.stop()
    assert adapter.status().state == "stopped"


async def test_a_failing_sink_does_not_advance_the_offset_and_the_update_comes_again(
    tg: FakeTelegram,
) -> None:
    offsets, sink = MemoryOffsets(), Sink()
    sink.fail = 2
    adapter = make(tg, offsets)
    await adapter.start(sink)
    try:
        upd = await tg.push({"message": message(21, text="x")})
        await until(lambda: len(sink.messages) == 1)
        assert offsets.saves == [upd["update_id"] + 1]
        assert adapter.status().last_error is not None
        await until(lambda: adapter.status().state == "connected")
    finally:
        await adapter.stop()


async def test_a_restart_resumes_from_the_saved_offset_without_redelivery(
    tg: FakeTelegram,
) -> None:
    offsets, sink = MemoryOffsets(), Sink()
    first = make(tg, offsets)
    await first.start(sink)
    a = await tg.push({"message": message(31, text="a")})
    await until(lambda: offsets.value == a["update_id"] + 1)
    await first.stop()
    if not tg.updates:  # the next poll confirmed it; a crash before that poll leaves it held
        tg.updates.append(a)
    b = await tg.push({"message": message(32, text="b")})
    fresh_sink = Sink()
    second = make(tg, offsets)
    await second.start(fresh_sink)
    try:
        await until(lambda: offsets.value == b["update_id"] + 1)
        assert [m.message_id for m in fresh_sink.messages] == ["42:32"]
        sent = [p.get("offset") for m, p in tg.calls if m == "getUpdates"]
        assert a["update_id"] + 1 in sent
    finally:
        await second.stop()


async def test_poll_errors_back_off_and_show_reconnecting(tg: FakeTelegram) -> None:
    adapter = make(tg)
    for _ in range(3):
        tg.fail_next("getUpdates", status=502)
    adapter.api._cfg = dataclasses.replace(adapter.config, api_max_attempts=1)
    with capture_logs() as logs:
        await adapter.start(Sink())
        try:
            await until(lambda: adapter.status().state == "reconnecting")
            assert adapter.status().attempts >= 1 and not adapter.status().healthy
            await until(lambda: adapter.status().state == "connected", 10)
        finally:
            await adapter.stop()
    assert any(e["event"] == "telegram.poll_failed" for e in logs)


async def test_webhook_secret_is_checked_before_anything_is_parsed(
    tg: FakeTelegram, webhook: tuple[TelegramAdapter, Sink]
) -> None:
    adapter, sink = webhook
    body = b'{"update_id": 5, "message": {"message_id": 1}}'
    for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"},
                    {"X-Telegram-Bot-Api-Secret-Token": SECRET + "x"}):  # fmt: skip
        result = await adapter.handle_webhook(headers, b"not json at all")
        assert result.status == 401
    assert sink.messages == [] and adapter.status().events["rejected"] == 3
    good = {"x-telegram-bot-api-secret-token": SECRET}
    assert (await adapter.handle_webhook(good, b"{not json")).status == 400
    assert (await adapter.handle_webhook(good, b"[1]")).status == 400
    assert (await adapter.handle_webhook(good, body)).status == 400  # no chat: malformed
    assert (await adapter.handle_webhook(good, b"x" * 2_000_000)).status == 400
    ok = await adapter.handle_webhook(good, _json(photo_update(6)))
    assert ok.status == 200 and "method" not in ok.body and len(sink.messages) == 1
    again = await adapter.handle_webhook(good, _json(photo_update(6)))
    assert again.status == 200 and adapter.status().events["duplicate"] == 1
    sink.fail = 1
    assert (await adapter.handle_webhook(good, _json(photo_update(7, 12)))).status == 500


async def test_group_messages_without_a_mention_are_acknowledged_and_ignored(
    tg: FakeTelegram, webhook: tuple[TelegramAdapter, Sink]
) -> None:
    adapter, sink = webhook
    good = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
    plain = {"update_id": 1, "message": message(1, chat_id=-7, chat_type="group", text="hi all")}
    assert (await adapter.handle_webhook(good, _json(plain))).status == 200
    text = "@vision_test_bot hi"
    asked = {"update_id": 2, "message": message(2, chat_id=-7, chat_type="group", text=text,
                                                 entities=mention(text))}  # fmt: skip
    assert (await adapter.handle_webhook(good, _json(asked))).status == 200
    assert [m.message_id for m in sink.messages] == ["-7:2"] and sink.messages[0].text == "hi"


async def test_429_on_send_waits_retry_after_and_posts_exactly_once(
    tg: FakeTelegram, webhook: tuple[TelegramAdapter, Sink]
) -> None:
    adapter, _ = webhook
    waits: list[float] = []

    async def fake_sleep(s: float) -> None:
        waits.append(s)

    adapter.api._sleep = fake_sleep
    tg.fail_next("sendMessage", status=429, retry_after=3)
    msg = _inbound(11)
    stream = await adapter.open_reply(msg)
    assert waits == [3.0] and len(tg.sent) == 1
    assert adapter.pacer._next["42"] >= asyncio.get_running_loop().time() + 2.5  # chat held
    sent = tg.sent[0]
    assert (
        sent.reply_to == 11
        and sent.chat_id == 42
        and stream.reply_message_id == str(sent.message_id)
    )
    req = [p for m, p in tg.calls if m == "sendMessage"][-1]
    assert req["reply_parameters"]["message_id"] == 11
    tg.fail_next("editMessageText", status=429, retry_after=2)
    await stream.update("hello")
    await stream.finish("hello")  # same text as the last edit: "not modified" is success
    assert sent.text == "hello" and waits == [3.0, 2.0]
    assert ("editMessageText", 400) in tg.rejected_calls or len(sent.edits) == 1


async def test_resumed_reply_edits_instead_of_posting_and_long_text_is_cut(
    tg: FakeTelegram, webhook: tuple[TelegramAdapter, Sink]
) -> None:
    adapter, _ = webhook
    first = await adapter.open_reply(_inbound(11))
    resumed = await adapter.open_reply(_inbound(11), existing_reply_id=first.reply_message_id)
    await resumed.finish("x" * 5000)
    assert len(tg.sent) == 1
    text = tg.sent[0].text
    assert len(text) == 4096 and text.endswith("…")
    assert (
        fit_text("😀" * 3000).endswith("…")
        and len(fit_text("😀" * 3000).encode("utf-16-le")) // 2 <= 4096
    )
    assert fit_text("  ") == "…"
    tg.fail_next("editMessageText", status=400)
    bad = await adapter.open_reply(_inbound(12))
    with pytest.raises(ReplyError):
        await bad.finish("final")


async def test_edits_in_one_chat_are_spaced_by_the_interval(tg: FakeTelegram) -> None:
    adapter = make(tg, mode="webhook", edit_interval_s=0.2)
    await adapter.start(Sink())
    try:
        stream = await adapter.open_reply(_inbound(11))
        for i in range(30):
            await stream.update("word " * (i + 1))
            await asyncio.sleep(0.01)
        await stream.finish("the end")
        times = [t for t, chat in tg.edit_times if chat == 42]
        assert 2 <= len(times) < 10  # 30 updates coalesced
        assert all(b - a >= 0.19 for a, b in itertools.pairwise(times))
        assert tg.sent[0].text == "the end"
    finally:
        await adapter.stop()


async def test_a_retried_post_after_a_429_keeps_the_interval_before_the_first_edit(
    tg: FakeTelegram,
) -> None:
    """The post retried when the 429's wait ends takes that slot: the first edit in the chat
    comes one interval later, not together with it."""
    adapter = make(tg, mode="webhook", edit_interval_s=0.3)
    await adapter.start(Sink())
    try:
        tg.fail_next("sendMessage", status=429, retry_after=1)
        stream = await adapter.open_reply(_inbound(11))
        await stream.update("hello")
        await stream.finish("hello there")
        sent = tg.sent[0]
        assert [t for t, _ in sent.edits], sent
        assert sent.edits[0][0] - sent.posted_at >= 0.29, (sent.posted_at, sent.edits)
    finally:
        await adapter.stop()


async def test_fetch_image_uses_getfile_and_the_size_limit(
    tg: FakeTelegram, webhook: tuple[TelegramAdapter, Sink]
) -> None:
    adapter, _ = webhook
    msg = _inbound(11)
    key = msg.images[0].key
    tg.add_file(key, b"\xff\xd8jpeg-bytes")
    assert await adapter.fetch_image(msg, msg.images[0]) == b"\xff\xd8jpeg-bytes"
    assert tg.downloads == [f"photos/{key}.jpg"]
    tg.add_file(key, b"x" * 3000)
    small = make(tg, mode="webhook", max_image_bytes=1000)
    try:
        with pytest.raises(ImageFetchError):
            await small.fetch_image(msg, msg.images[0])
    finally:
        await small.stop()
    with pytest.raises(ImageFetchError):
        await adapter.fetch_image(msg, dataclasses.replace(msg.images[0], key="missing"))


async def test_the_token_never_reaches_logs_errors_or_status(tg: FakeTelegram) -> None:
    cfg = TelegramConfig(token=TOKEN, base_url="http://127.0.0.1:9", api_max_attempts=2)
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg)
    with capture_logs() as logs:
        adapter = TelegramAdapter(cfg, offsets=MemoryOffsets(), delays=fast_delays)
        assert TOKEN not in repr(adapter) and TOKEN not in repr(adapter.api)
        await adapter.start(Sink())
        await until(lambda: adapter.status().last_error is not None)
        error = adapter.status().last_error or ""
        with pytest.raises(ReplyError) as info:
            await adapter.send_text_reply(_inbound(11), "hi")
        await adapter.stop()
    everything = repr(logs) + error + str(info.value) + repr(adapter.status().to_dict())
    assert "getMe" in everything and "transport" in everything
    assert TOKEN not in everything and TOKEN.split(":")[1] not in everything


def _inbound(mid: int) -> InboundMessage:
    from adapters.telegram.updates import BotIdentity, parse_update

    parsed = parse_update(
        photo_update(mid, mid),
        BotIdentity(1, "b"),
        group_mode="mention",
        max_image_bytes=10**7,
        received_at=0.0,
    )
    assert parsed.message is not None
    return parsed.message


def _json(data: Any) -> bytes:
    import json

    return json.dumps(data).encode()


async def test_a_refused_token_shows_failed_with_telegram_s_description(tg: FakeTelegram) -> None:
    tg.token = "999:someone-else"
    adapter = make(tg)
    await adapter.start(Sink())
    try:
        await until(lambda: adapter.status().state == "failed")
        st = adapter.status()
        assert not st.healthy and "401" in (st.last_error or "") and st.attempts == 1
        assert "getUpdates" not in tg.methods()  # no polling without knowing the bot
    finally:
        await adapter.stop()

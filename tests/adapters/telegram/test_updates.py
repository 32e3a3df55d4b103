"""The update parser: photos and image documents, the group rule, hostile input never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.telegram.updates import BotIdentity, parse_update, telegram_message_id
from tests.adapters.telegram.fake_telegram import (
    BOT_ID,
    BOT_USERNAME,
    mention,
    message,
    photo_sizes,
)

BOT = BotIdentity(BOT_ID, BOT_USERNAME)


def parse(update: Any, *, group_mode: str = "mention", limit: int = 50_000) -> Any:
    return parse_update(update, BOT, group_mode=group_mode, max_image_bytes=limit, received_at=1.0)  # type: ignore[arg-type]


def test_photo_message_takes_the_largest_size_that_fits_the_limit() -> None:
    update = {"update_id": 7, "message": message(11, caption="what is it?", photo=photo_sizes("p"))}
    parsed = parse(update, limit=50_000)
    assert parsed.kind == "message" and parsed.update_id == 7
    msg = parsed.message
    assert msg.images[0].key == "p-1" and msg.images[0].kind == "photo"  # 30000 fits, 90000 not
    assert msg.text == "what is it?" and msg.chat_id == "42" and msg.topic == "chat:telegram:42"
    assert msg.message_id == "42:11" and msg.event_id == "7" and telegram_message_id(msg) == 11
    assert msg.dedupe_keys == ("telegram:msg:42:11", "telegram:evt:7")
    assert parse(update, limit=10**9).message.images[0].key == "p-2"
    assert (
        parse(update, limit=10).message.images[0].key == "p-0"
    )  # none fits: smallest, fails later


def test_image_document_is_an_image_and_other_documents_are_text_only() -> None:
    doc = {"file_id": "d1", "file_unique_id": "u", "mime_type": "image/png", "file_size": 10}
    parsed = parse({"update_id": 1, "message": message(3, document=doc)})
    assert parsed.message.images[0].key == "d1" and parsed.message.images[0].kind == "document"
    pdf = {**doc, "mime_type": "application/pdf"}
    assert parse({"update_id": 2, "message": message(4, document=pdf)}).message.images == ()


def test_text_only_private_message_is_a_message_without_images() -> None:
    parsed = parse({"update_id": 2, "message": message(5, text="hello")})
    assert parsed.kind == "message" and parsed.message.images == ()
    assert parsed.message.chat_type == "p2p"


def test_group_messages_need_a_mention_or_a_reply_to_the_bot() -> None:
    plain = message(8, chat_id=-100, chat_type="supergroup", caption="hi", photo=photo_sizes("g"))
    assert parse({"update_id": 1, "message": plain}).kind == "ignored"
    assert parse({"update_id": 1, "message": plain}, group_mode="all").kind == "message"
    text = f"😀 look @{BOT_USERNAME} what is this"  # an emoji shifts UTF-16 offsets
    addressed = {**plain, "caption": text, "caption_entities": mention(text)}
    parsed = parse({"update_id": 2, "message": addressed})
    assert parsed.kind == "message" and parsed.message.chat_type == "group"
    assert parsed.message.text == "😀 look what is this" and parsed.message.chat_id == "-100"
    other = {
        **plain,
        "caption": "@someone_else",
        "caption_entities": mention("@someone_else", "@someone_else"),
    }
    assert parse({"update_id": 3, "message": other}).kind == "ignored"
    fake = {**plain, "caption": f"@{BOT_USERNAME}"}  # the text alone, no entity: not a mention
    assert parse({"update_id": 4, "message": fake}).kind == "ignored"
    reply = {**plain, "reply_to_message": {"message_id": 1, "from": {"id": BOT_ID, "is_bot": True}}}
    assert parse({"update_id": 5, "message": reply}).kind == "message"


def test_bots_channels_and_other_update_kinds_are_ignored_with_their_update_id() -> None:
    bot_msg = message(1, text="x")
    bot_msg["from"] = {"id": 9, "is_bot": True, "first_name": "b"}
    assert parse({"update_id": 1, "message": bot_msg}).kind == "ignored"
    assert parse({"update_id": 2, "edited_message": message(1, text="x")}).update_id == 2
    assert parse({"update_id": 2, "edited_message": {}}).kind == "ignored"
    chan = message(1, text="x", chat_type="channel")
    assert parse({"update_id": 3, "message": chan}).kind == "ignored"


def test_malformed_updates_are_rejected() -> None:
    assert parse({"message": message(1, text="x")}).kind == "rejected"
    assert parse({"update_id": True, "message": {}}).kind == "rejected"
    assert parse({"update_id": 1, "message": []}).kind == "rejected"
    assert parse({"update_id": 1, "message": {"chat": {"id": "x"}, "message_id": 1}}).kind == (
        "rejected"
    )
    assert parse([1, 2]).kind == "rejected"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)
keys = st.sampled_from(
    ["message_id", "chat", "from", "text", "caption", "photo", "document", "entities",
     "caption_entities", "reply_to_message", "id", "type", "file_id", "file_size", "mime_type",
     "offset", "length", "user", "is_bot", "width", "height", "username"]
)  # fmt: skip
shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(keys, inner, max_size=8) | st.lists(inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(msg=shaped, uid=st.one_of(st.integers(), json_values))
def test_hostile_updates_never_raise_and_messages_are_well_formed(msg: Any, uid: Any) -> None:
    for mode in ("mention", "all"):
        parsed = parse({"update_id": uid, "message": msg}, group_mode=mode)
        assert parsed.kind in ("message", "ignored", "rejected")
        if parsed.message is not None:
            m = parsed.message
            assert m.platform == "telegram" and m.message_id.startswith(m.chat_id + ":")
            assert len(m.text) <= 8192 and len(m.images) <= 1
            json.loads(m.to_json())


@settings(max_examples=100)
@given(text=st.text(max_size=40), offset=json_values, length=json_values)
def test_hostile_entities_never_raise(text: str, offset: Any, length: Any) -> None:
    msg = message(1, chat_type="group", chat_id=-5, text=text)
    msg["entities"] = [{"type": "mention", "offset": offset, "length": length}]
    assert parse({"update_id": 1, "message": msg}).kind in ("message", "ignored")


def _webhook_adapter() -> Any:
    from adapters.http import HttpResponse, MockTransport
    from adapters.telegram import TelegramAdapter, TelegramConfig
    from bridge.store.backoff import Backoff

    class NoOffsets:
        async def load(self) -> int | None:
            return None

        async def save(self, offset: int) -> None:
            raise AssertionError("webhook mode keeps no offset")

    cfg = TelegramConfig(mode="webhook", token="1:x", webhook_secret="s")
    http = MockTransport(lambda r: HttpResponse.of_json({"ok": False, "error_code": 500}))
    adapter = TelegramAdapter(
        cfg, offsets=NoOffsets(), delays=lambda: Backoff(0.01, 0.01), http=http
    )
    adapter.bot = BOT
    return adapter


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=300)
    | shaped.map(lambda v: json.dumps({"update_id": 1, "message": v}).encode())
)
def test_hostile_webhook_bodies_get_2xx_or_4xx_and_only_messages_reach_the_sink(
    body: bytes,
) -> None:
    import asyncio

    adapter = _webhook_adapter()
    seen: list[Any] = []

    async def sink(msg: Any) -> bool:
        seen.append(msg)
        return True

    adapter._sink = sink
    result = asyncio.run(adapter.handle_webhook({"X-Telegram-Bot-Api-Secret-Token": "s"}, body))
    assert result.status in (200, 400)
    assert len(seen) <= 1 and all(m.platform == "telegram" for m in seen)
    refused = asyncio.run(adapter.handle_webhook({"X-Telegram-Bot-Api-Secret-Token": "t"}, body))
    assert refused.status == 401 and len(seen) <= 1

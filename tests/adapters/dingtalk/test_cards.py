"""Streamed answers in an AI card against the fake DingTalk: one card, paced updates, resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from adapters.base import ReplyError
from adapters.dingtalk import DingTalkAdapter, DingTalkConfig
from adapters.dingtalk.cards import DingTalkCardReply, out_track_id
from tests.adapters.dingtalk.conftest import deliver
from tests.adapters.dingtalk.fake_dingtalk import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeDingTalk,
    bot_message,
)

INTERVAL = 0.05


@pytest.fixture
async def adapter(fake: FakeDingTalk) -> AsyncIterator[DingTalkAdapter]:
    cfg = DingTalkConfig(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, base_url=fake.base_url,
        card_template_id="tmpl-ai-card.schema", card_content_key="answer",
        card_interval_s=INTERVAL,
    )  # fmt: skip
    a = DingTalkAdapter(cfg)
    yield a
    await a.stop()


async def test_answer_streams_into_one_card_paced_and_finished(
    adapter: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    msg = await deliver(adapter, bot_message(fake))
    reply = await adapter.open_reply(msg)
    assert isinstance(reply, DingTalkCardReply)
    assert reply.reply_message_id == out_track_id(msg.message_id)
    loop = asyncio.get_running_loop()
    started = loop.time()
    text = ""
    for word in ["A", " cup", " of", " coffee", " on", " a", " table", "."] * 5:
        text += word
        await reply.update(text)
        await asyncio.sleep(INTERVAL / 5)
    await reply.finish(text)
    elapsed = loop.time() - started
    [card] = fake.cards.values()
    assert card.create["openSpaceId"] == "dtv1.card//IM_GROUP.cidGROUP1=="
    assert card.create["cardTemplateId"] == "tmpl-ai-card.schema"
    assert card.create["imGroupOpenDeliverModel"]["robotCode"] == CLIENT_ID
    assert 2 <= len(card.streams) < 40  # coalesced, but it did stream
    assert all(s["key"] == "answer" and s["isFull"] for s in card.streams)
    assert card.streams[-1]["content"] == text and card.streams[-1]["isFinalize"] is True
    assert len(card.streams) <= elapsed / INTERVAL + 1  # never more than one per interval
    assert card.flow_status == "3"
    assert card.updates[-1]["cardData"]["cardParamMap"]["answer"] == text
    assert fake.sent == []


async def test_resumed_reply_streams_into_the_same_card(
    adapter: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    msg = await deliver(adapter, bot_message(fake, conversation_type="1"))
    first = await adapter.open_reply(msg)
    assert fake.cards[first.reply_message_id].create["openSpaceId"] == (
        "dtv1.card//IM_ROBOT.staff001"
    )
    again = await adapter.open_reply(msg, existing_reply_id=first.reply_message_id)
    await again.fail("Sorry, I could not read that picture.")
    assert fake.card_creates == 1
    card = fake.cards[first.reply_message_id]
    assert card.flow_status == "5" and card.streams[-1]["isError"] is True
    # A run that died before recording the card id creates it again: DingTalk refuses the
    # duplicate outTrackId and the adapter resumes the card it finds.
    third = await adapter.open_reply(msg)
    assert third.reply_message_id == first.reply_message_id and fake.card_creates == 1


async def test_a_card_that_cannot_be_created_raises_reply_error(
    adapter: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    msg = await deliver(adapter, bot_message(fake))
    fake.fail_next("card_create", 403, {"code": "Forbidden.AccessDenied", "message": "no"})
    with pytest.raises(ReplyError, match="403"):
        await adapter.open_reply(msg)
    assert fake.cards == {}


async def test_rate_limited_stream_updates_do_not_lose_the_final_text(
    adapter: DingTalkAdapter, fake: FakeDingTalk
) -> None:
    msg = await deliver(adapter, bot_message(fake))
    reply = await adapter.open_reply(msg)
    waits: list[float] = []

    async def no_sleep(s: float) -> None:
        waits.append(s)

    adapter.api._sleep = no_sleep
    fake.fail_next("card_stream", 403, {"code": "Forbidden.AccessDenied.QpsLimitForApi"})
    await reply.update("partial")
    await reply.finish("the whole answer")
    [card] = fake.cards.values()
    assert card.streams[-1]["content"] == "the whole answer" and waits

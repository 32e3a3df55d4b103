"""Images, tokens, replies and rate limits against the loopback fake DingTalk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapters.base import ImageFetchError, InboundMessage, ReplyError
from adapters.dingtalk import DingTalkAdapter, DingTalkConfig
from adapters.http import AiohttpClient
from tests.adapters.dingtalk.conftest import deliver
from tests.adapters.dingtalk.fake_dingtalk import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeDingTalk,
    bot_message,
)
from tests.conftest import IMAGES


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def parts(fake: FakeDingTalk) -> AsyncIterator[tuple[DingTalkAdapter, Clock, list[float]]]:
    clock = Clock()
    http = AiohttpClient()
    cfg = DingTalkConfig(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, base_url=fake.base_url,
        max_image_bytes=2_000_000,
    )  # fmt: skip
    adapter = DingTalkAdapter(cfg, http=http, monotonic=clock)
    waits: list[float] = []

    async def fake_sleep(s: float) -> None:
        waits.append(s)

    adapter.api._sleep = fake_sleep
    yield adapter, clock, waits
    await http.close()


async def test_picture_is_downloaded_with_a_cached_token(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, clock, _ = parts
    msg = await deliver(adapter, bot_message(fake))
    data = await adapter.fetch_image(msg, msg.images[0])
    assert data == (IMAGES / "coffee.jpg").read_bytes()
    await adapter.fetch_image(msg, msg.images[0])
    assert fake.tokens_issued == 1
    clock.t += 7200 - 300  # inside the refresh margin: a new token
    await adapter.fetch_image(msg, msg.images[0])
    assert fake.tokens_issued == 2


async def test_a_revoked_token_is_refreshed_once(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    msg = await deliver(adapter, bot_message(fake))
    await adapter.fetch_image(msg, msg.images[0])
    fake.valid_tokens.clear()
    await adapter.fetch_image(msg, msg.images[0])
    assert fake.tokens_issued == 2


async def test_missing_or_oversized_pictures_raise_image_fetch_error(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    fake.files["dl-big"] = b"\xff" * 2_000_001
    big = await deliver(adapter, bot_message(fake, msg_id="m-big", download_code="dl-big"))
    with pytest.raises(ImageFetchError, match="too large"):
        await adapter.fetch_image(big, big.images[0])
    gone = await deliver(adapter, bot_message(fake, msg_id="m-gone", download_code="dl-none"))
    with pytest.raises(ImageFetchError, match="404"):
        await adapter.fetch_image(gone, gone.images[0])


async def test_reply_goes_to_the_valid_session_webhook_once(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    msg = await deliver(adapter, bot_message(fake))
    reply = await adapter.open_reply(msg)
    await reply.update("A cup")
    assert fake.sent == []  # DingTalk cannot edit: nothing before the end
    await reply.finish("A cup of coffee.")
    again = await adapter.open_reply(msg, existing_reply_id=reply.reply_message_id)
    await again.finish("A cup of coffee.")
    assert len(fake.sent) == 1
    sent = fake.sent[0]
    assert sent.via == "webhook" and sent.body["msgtype"] == "markdown"
    assert sent.body["markdown"]["text"] == "A cup of coffee."
    assert reply.reply_message_id == "dingtalk:msgABC123=="


async def test_expired_webhook_falls_back_to_the_group_send_api(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    msg = await deliver(adapter, bot_message(fake, webhook_ttl_s=-10))
    await adapter.send_text_reply(msg, "Please send a picture.")
    [sent] = fake.sent
    assert sent.via == "group" and sent.body["openConversationId"] == "cidGROUP1=="
    assert sent.body["msgKey"] == "sampleText"
    assert json.loads(sent.body["msgParam"]) == {"content": "Please send a picture."}


async def test_after_a_restart_a_single_chat_is_answered_by_batch_send(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    msg = InboundMessage(
        platform="dingtalk",
        chat_id="cidSINGLE",
        message_id="m-old",
        event_id="",
        sender_id="staff001",
        text="",
        images=(),
        message_type="picture",
        received_at=time.time(),
        chat_type="p2p",
    )  # fmt: skip  (no sessionWebhook remembered: it came before the restart)
    reply = await adapter.open_reply(msg, existing_reply_id="dingtalk:m-old")
    await reply.finish("**done**")
    [sent] = fake.sent
    assert sent.via == "single" and sent.body["userIds"] == ["staff001"]
    assert sent.body["msgKey"] == "sampleMarkdown"
    assert json.loads(sent.body["msgParam"])["text"] == "**done**"


@pytest.mark.parametrize(
    ("route", "status", "body"),
    [
        ("group", 429, {"code": "Throttling", "message": "too many"}),
        ("group", 403, {"code": "Forbidden.AccessDenied.QpsLimitForApi", "message": "qps"}),
        ("webhook", 200, {"errcode": 130101, "errmsg": "send too fast"}),
    ],
)
async def test_rate_limits_are_retried_with_backoff(
    parts: tuple[DingTalkAdapter, Clock, list[float]],
    fake: FakeDingTalk,
    route: str,
    status: int,
    body: dict[str, Any],
) -> None:
    adapter, _, waits = parts
    ttl = 3600 if route == "webhook" else -10
    msg = await deliver(adapter, bot_message(fake, webhook_ttl_s=ttl))
    fake.fail_next(route, status, body)
    fake.fail_next(route, status, body)
    await adapter.send_text_reply(msg, "hello")
    assert len(fake.sent) == 1 and fake.sent[0].via == route
    assert len(waits) == 2 and all(w > 0 for w in waits)


async def test_permanent_failure_raises_reply_error(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    msg = await deliver(adapter, bot_message(fake, webhook_ttl_s=-10))
    fake.fail_next("group", 400, {"code": "invalidParameter", "message": "bad"})
    with pytest.raises(ReplyError, match="400"):
        await adapter.send_text_reply(msg, "hello")
    assert adapter.status().api_errors == 1


async def test_secrets_and_tokens_never_reach_logs(
    parts: tuple[DingTalkAdapter, Clock, list[float]], fake: FakeDingTalk
) -> None:
    adapter, _, _ = parts
    with capture_logs() as logs:
        msg = await deliver(adapter, bot_message(fake, webhook_ttl_s=-10))
        await adapter.fetch_image(msg, msg.images[0])
        fake.fail_next("group", 500, {"code": "SystemError"})
        await adapter.send_text_reply(msg, "hi")
        fake.fail_next("token", 500, {})
        fake.valid_tokens.clear()
        await adapter.send_text_reply(
            await deliver(adapter, bot_message(fake, msg_id="m2", webhook_ttl_s=-10)), "x"
        )
        fake.fail_next("download", 403, {"code": "Forbidden", "message": "no permission"})
        with pytest.raises(ImageFetchError) as err:
            await adapter.fetch_image(msg, msg.images[0])
    shown = str(logs) + str(err.value) + json.dumps(adapter.status().to_dict())
    assert any(e["event"] == "dingtalk.api_retry" for e in logs)
    assert CLIENT_SECRET not in shown and "SECRETTOKEN" not in shown
    assert "session=" not in shown  # webhook URLs carry a session credential

"""Replies and files against the fake Slack: threads, paced updates, 429, downloads, secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

import pytest
import structlog

from adapters.base import ImageFetchError, ImageRef, InboundMessage, ReplyError
from adapters.http import AiohttpClient
from adapters.slack import SlackAdapter, SlackConfig
from adapters.slack.protocol import to_inbound
from adapters.slack.reply import ELLIPSIS
from adapters.slack.webapi import SlackApiError, SlackWebApi
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, message_envelope
from tests.conftest import IMAGES


def config(fake: FakeSlack, **kw: Any) -> SlackConfig:
    base = SlackConfig(app_token=APP_TOKEN, bot_token=BOT_TOKEN, base_url=fake.api_url,
                       update_interval_s=0.2)  # fmt: skip
    return dataclasses.replace(base, **kw)


def inbound(fake: FakeSlack, files: list[dict[str, Any]] | None = None) -> InboundMessage:
    env = message_envelope("e1", channel="C0CHAN", ts="1700000000.000100", files=files)
    msg = to_inbound(env["payload"], received_at=0).message
    assert msg is not None
    return msg


async def test_reply_is_posted_in_the_thread_and_updates_are_paced(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack))
    try:
        msg = inbound(slack)
        stream = await adapter.open_reply(msg)
        posted = slack.posted[stream.reply_message_id]
        assert posted["channel"] == "C0CHAN" and posted["thread_ts"] == "1700000000.000100"
        text = ""
        for word in ["a "] * 40:
            text += word
            await stream.update(text)
            await asyncio.sleep(0.01)
        await stream.finish(text + "end")
        assert slack.posted[stream.reply_message_id]["text"] == text + "end"
        times = [c.at for c in slack.updates]
        assert 2 <= len(times) < 40  # coalesced
        assert all(b - a >= 0.2 * 0.95 for a, b in itertools.pairwise(times))
        assert all(c.body["ts"] == stream.reply_message_id for c in slack.updates)
    finally:
        await adapter.stop()


async def test_open_reply_with_an_existing_ts_edits_it_instead_of_posting(
    slack: FakeSlack,
) -> None:
    adapter = SlackAdapter(config(slack))
    try:
        msg = inbound(slack)
        first = await adapter.open_reply(msg)
        again = await adapter.open_reply(msg, existing_reply_id=first.reply_message_id)
        await again.finish("resumed answer")
        assert len(slack.posted) == 1
        assert slack.posted[first.reply_message_id]["text"] == "resumed answer"
    finally:
        await adapter.stop()


async def test_long_answers_are_cut_with_an_ellipsis(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack, max_text_chars=1000))
    try:
        stream = await adapter.open_reply(inbound(slack))
        await stream.finish("y" * 5000)
        text = slack.posted[stream.reply_message_id]["text"]
        assert len(text) == 1000 and text.endswith(ELLIPSIS)
    finally:
        await adapter.stop()


@pytest.mark.parametrize(
    ("status", "error"), [(429, "ratelimited"), (200, "ratelimited"), (503, "")]
)
async def test_rate_limits_are_waited_out_and_the_message_is_posted_once(
    slack: FakeSlack, status: int, error: str
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    http = AiohttpClient()
    api = SlackWebApi(config(slack), http, sleep=sleep)
    try:
        slack.fail_next("chat.postMessage", status=status, error=error, **{"Retry-After": "7"})
        ts = await api.post_message("C0CHAN", "hi", "1.0")
    finally:
        await http.close()
    assert len(slack.posted) == 1 and ts in slack.posted
    assert [c.method for c in slack.calls] == ["chat.postMessage", "chat.postMessage"]
    if error == "ratelimited":
        assert waits == [7.0] and api.rate_limited == 1
    else:
        assert len(waits) == 1 and 0.5 <= waits[0] <= 0.6


async def test_a_permanent_error_is_a_reply_error_and_retries_are_bounded(
    slack: FakeSlack,
) -> None:
    adapter = SlackAdapter(config(slack, api_max_attempts=2, api_backoff_base_s=0.01))
    try:
        slack.fail_next("chat.postMessage", error="channel_not_found")
        with pytest.raises(ReplyError, match="channel_not_found"):
            await adapter.open_reply(inbound(slack))
        for _ in range(2):
            slack.fail_next("chat.postMessage", status=500)
        with pytest.raises(ReplyError, match="after 2 tries"):
            await adapter.send_text_reply(inbound(slack), "help")
        assert adapter.status().api_errors == 2
    finally:
        await adapter.stop()


async def test_text_reply_goes_to_the_thread(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack))
    try:
        await adapter.send_text_reply(inbound(slack), "Send me an image.")
        (posted,) = slack.posted.values()
        assert posted == {"channel": "C0CHAN", "thread_ts": "1700000000.000100",
                          "text": "Send me an image."}  # fmt: skip
    finally:
        await adapter.stop()


async def test_fetch_image_sends_the_bot_token_and_caps_the_size(slack: FakeSlack) -> None:
    photo = (IMAGES / "coffee.jpg").read_bytes()
    entry = slack.add_file("F1", "coffee.jpg", "image/jpeg", photo)
    adapter = SlackAdapter(config(slack))
    small = SlackAdapter(config(slack, max_image_bytes=1000))
    try:
        msg = inbound(slack, files=[entry])
        assert await adapter.fetch_image(msg, msg.images[0]) == photo
        assert slack.file_requests[-1][1] == f"Bearer {BOT_TOKEN}"
        with pytest.raises(ImageFetchError, match="exceeds"):
            await small.fetch_image(msg, msg.images[0])
        gone = ImageRef(key=f"{slack.base}/files-pri/T0FAKE-F9/missing.png", kind="image/png")
        with pytest.raises(ImageFetchError, match="http 404"):
            await adapter.fetch_image(msg, gone)
    finally:
        await adapter.stop()
        await small.stop()


async def test_the_bot_token_is_never_sent_to_another_host(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack))
    try:
        msg = inbound(slack)
        for url in ("https://evil.example/steal.png", "http://localhost:1/x.png"):
            with pytest.raises(ImageFetchError, match="not a Slack file host"):
                await adapter.fetch_image(msg, ImageRef(key=url, kind="image/png"))
        assert slack.file_requests == []
    finally:
        await adapter.stop()
    real = SlackConfig(app_token=APP_TOKEN, bot_token=BOT_TOKEN)
    assert real.allowed_file_hosts == frozenset({"files.slack.com"})


async def test_an_html_login_page_is_a_clear_error(slack: FakeSlack) -> None:
    entry = slack.add_file("F1", "a.png", "image/png", b"\x89PNG....")
    adapter = SlackAdapter(config(slack, bot_token="xoxb-other-token-without-files-read"))
    try:
        msg = inbound(slack, files=[entry])
        with pytest.raises(ImageFetchError, match="files:read"):
            await adapter.fetch_image(msg, msg.images[0])
    finally:
        await adapter.stop()


async def test_tokens_never_reach_logs_errors_or_reprs(slack: FakeSlack) -> None:
    with structlog.testing.capture_logs() as logs:
        adapter = SlackAdapter(config(slack, api_max_attempts=2, api_backoff_base_s=0.01))
        try:
            slack.fail_next(
                "chat.postMessage", status=429, error="ratelimited", **{"Retry-After": "0"}
            )
            slack.fail_next("chat.update", error="invalid_auth")
            stream = await adapter.open_reply(inbound(slack))
            errors: list[str] = []
            try:
                await stream.finish("x")
            except ReplyError as exc:
                errors.append(str(exc))
            try:
                await adapter.api.call("auth.test", {}, token=BOT_TOKEN)
            except SlackApiError as exc:
                errors.append(repr(exc))
        finally:
            await adapter.stop()
    text = repr(logs) + repr(errors) + repr(adapter) + str(adapter.config) + repr(adapter.api)
    text += repr(adapter.status().to_dict())
    assert errors and "invalid_auth" in text
    for secret in (APP_TOKEN, BOT_TOKEN, "fakebottoken", "fakeapptoken"):
        assert secret not in text


async def test_a_reply_posted_before_a_crash_is_found_by_its_tag_and_resumed(
    slack: FakeSlack,
) -> None:
    """The window between posting and the relay's store write: a new process finds the reply."""
    first = SlackAdapter(config(slack))
    second = SlackAdapter(config(slack))
    try:
        msg = inbound(slack)
        posted = await first.open_reply(msg)  # ... and the process dies before storing the ts
        resumed = await second.open_reply(msg)
        assert resumed.reply_message_id == posted.reply_message_id and len(slack.posted) == 1
        await resumed.finish("the answer")
        assert slack.posted[posted.reply_message_id]["text"] == "the answer"
        await second.send_text_reply(msg, "hint")
        await second.send_text_reply(msg, "hint")
        assert len(slack.posted) == 2  # one answer, one text reply: each tagged on its own
        lookups = [c for c in slack.calls if c.method == "conversations.replies"]
        assert len(lookups) == 4  # every post is preceded by one lookup
    finally:
        await first.stop()
        await second.stop()


async def test_a_failed_lookup_is_tried_once_and_the_reply_is_posted(slack: FakeSlack) -> None:
    adapter = SlackAdapter(config(slack))
    try:
        slack.fail_next("conversations.replies", status=429, error="ratelimited",
                        **{"Retry-After": "30"})  # fmt: skip
        stream = await adapter.open_reply(inbound(slack))
        assert list(slack.posted) == [stream.reply_message_id]
        assert [c.method for c in slack.calls] == ["conversations.replies", "chat.postMessage"]
    finally:
        await adapter.stop()

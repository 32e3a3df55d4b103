"""The WeCom API side: access token cache and refresh, media/get, message/send, replies."""

from __future__ import annotations

import json

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from adapters.base import ImageFetchError, ImageRef, InboundMessage, ReplyError
from adapters.http import HttpResponse, MockTransport
from adapters.wecom import WeComAdapter
from adapters.wecom.api import WeComApi, WeComApiError
from adapters.wecom.reply import MAX_TEXT_BYTES, split_text
from tests.adapters.wecom.conftest import make_config
from tests.adapters.wecom.fake_wecom import AES_KEY, SECRET, TOKEN, FakeWeCom

MSG = InboundMessage(
    platform="wecom",
    chat_id="zhangsan",
    message_id="42",
    event_id="",
    sender_id="zhangsan",
    text="",
    images=(ImageRef("media-coffee"),),
    message_type="image",
    received_at=0.0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_token_is_cached_until_expiry_minus_margin(wecom: FakeWeCom) -> None:
    clock = Clock()
    adapter = WeComAdapter(make_config(wecom.base_url), monotonic=clock)
    try:
        await adapter.fetch_image(MSG, MSG.images[0])
        await adapter.fetch_image(MSG, MSG.images[0])
        assert wecom.tokens_issued == 1
        clock.now += 7200 - 300 - 1
        await adapter.fetch_image(MSG, MSG.images[0])
        assert wecom.tokens_issued == 1
        clock.now += 2
        assert await adapter.fetch_image(MSG, MSG.images[0]) == wecom.media["media-coffee"][0]
        assert wecom.tokens_issued == 2
    finally:
        await adapter.stop()


async def test_expired_token_42001_is_refreshed_and_retried_once(
    adapter: WeComAdapter, wecom: FakeWeCom
) -> None:
    await adapter.api.send_text("zhangsan", "one")
    wecom.expire_tokens()
    await adapter.api.send_text("zhangsan", "two")
    assert wecom.tokens_issued == 2
    assert [s.content for s in wecom.sent] == ["one", "two"]
    assert wecom.requests == ["gettoken", "send", "send", "gettoken", "send"]


async def test_a_token_refused_twice_is_a_permanent_error() -> None:
    def handler(request: object) -> HttpResponse:
        url = getattr(request, "url", "")
        if "/gettoken" in url:
            return HttpResponse.of_json({"errcode": 0, "access_token": "T", "expires_in": 7200})
        return HttpResponse.of_json({"errcode": 40014, "errmsg": "invalid access_token"})

    transport = MockTransport(handler)
    api = WeComApi(make_config("http://fake"), transport)
    with pytest.raises(WeComApiError, match="refused twice"):
        await api.send_text("u", "x")
    assert sum("/gettoken" in r.url for r in transport.requests) == 2


async def test_rate_limit_45009_backs_off_and_retries(
    adapter: WeComAdapter, wecom: FakeWeCom
) -> None:
    wecom.rate_limit_sends = 2
    await adapter.api.send_text("zhangsan", "after the limit")
    assert [s.content for s in wecom.sent] == ["after the limit"]
    assert wecom.requests.count("send") == 3


async def test_rate_limit_that_never_ends_gives_up(adapter: WeComAdapter, wecom: FakeWeCom) -> None:
    wecom.rate_limit_sends = 99
    with pytest.raises(ReplyError, match="gave up: rate limited"):
        await adapter.send_text_reply(MSG, "x")
    assert wecom.requests.count("send") == adapter.config.api_max_attempts


async def test_http_429_is_retried() -> None:
    answers = [HttpResponse(status=429), HttpResponse.of_json({"errcode": 0, "msgid": "m1"})]

    def handler(request: object) -> HttpResponse:
        if "/gettoken" in getattr(request, "url", ""):
            return HttpResponse.of_json({"errcode": 0, "access_token": "T", "expires_in": 7200})
        return answers.pop(0)

    api = WeComApi(make_config("http://fake", api_backoff_base_s=0.0), MockTransport(handler))
    assert await api.send_text("u", "x") == "m1"


async def test_media_json_error_is_an_image_fetch_error(adapter: WeComAdapter) -> None:
    with pytest.raises(ImageFetchError, match="40007"):
        await adapter.fetch_image(MSG, ImageRef("no-such-media"))


async def test_media_larger_than_the_limit_is_refused(wecom: FakeWeCom) -> None:
    wecom.media["big"] = (b"\xff" * 5000, "image/jpeg")
    adapter = WeComAdapter(make_config(wecom.base_url, max_image_bytes=4000))
    try:
        with pytest.raises(ImageFetchError, match="larger than 4000"):
            await adapter.fetch_image(MSG, ImageRef("big"))
    finally:
        await adapter.stop()


async def test_wrong_secret_is_reported_without_the_secret(wecom: FakeWeCom) -> None:
    adapter = WeComAdapter(make_config(wecom.base_url, secret="wrong-secret-123"))
    try:
        with pytest.raises(ImageFetchError) as info:
            await adapter.fetch_image(MSG, MSG.images[0])
        assert "40001" in str(info.value) and "wrong-secret-123" not in str(info.value)
        assert adapter.status().api_errors >= 1
    finally:
        await adapter.stop()


async def test_placeholder_then_one_final_answer(adapter: WeComAdapter, wecom: FakeWeCom) -> None:
    stream = await adapter.open_reply(MSG)
    assert [s.content for s in wecom.sent] == ["Looking at your photo…"]
    assert stream.reply_message_id == wecom.sent[0].msgid
    await stream.update("A cup")
    await stream.update("A cup of coffee")
    assert len(wecom.sent) == 1  # a sent text cannot be edited: updates send nothing
    await stream.finish("A cup of coffee.")
    await stream.finish("A cup of coffee.")  # idempotent
    assert [s.content for s in wecom.sent] == ["Looking at your photo…", "A cup of coffee."]
    assert {s.touser for s in wecom.sent} == {"zhangsan"}


async def test_resumed_reply_sends_no_second_placeholder(
    adapter: WeComAdapter, wecom: FakeWeCom
) -> None:
    stream = await adapter.open_reply(MSG, existing_reply_id="msgid_earlier")
    assert stream.reply_message_id == "msgid_earlier" and wecom.sent == []
    await stream.fail("Sorry, I could not read that image.")
    assert [s.content for s in wecom.sent] == ["Sorry, I could not read that image."]


async def test_long_answer_goes_out_in_parts_within_2048_bytes(
    adapter: WeComAdapter, wecom: FakeWeCom
) -> None:
    stream = await adapter.open_reply(MSG, existing_reply_id="p")
    await stream.finish("咖啡很好喝。" * 2000)  # 36 000 bytes
    parts = [s.content for s in wecom.sent]
    assert len(parts) == adapter.config.max_parts
    assert all(len(p.encode()) <= MAX_TEXT_BYTES for p in parts)
    assert parts[-1].endswith("…")


@given(st.text(max_size=6000), st.integers(min_value=1, max_value=5))
def test_split_text_bounds(text: str, max_parts: int) -> None:
    parts = split_text(text, max_parts)
    assert 1 <= len(parts) <= max_parts
    assert all(0 < len(p.encode()) <= MAX_TEXT_BYTES for p in parts)
    if len(text.encode()) <= MAX_TEXT_BYTES and text.strip():
        assert parts == [text]
    if not parts[-1].endswith("…") and text.strip():
        assert "".join(parts) == text


async def test_no_secret_or_access_token_reaches_the_logs(wecom: FakeWeCom) -> None:
    adapter = WeComAdapter(make_config(wecom.base_url, api_backoff_base_s=0.0))
    try:
        with structlog.testing.capture_logs() as logs:
            await adapter.fetch_image(MSG, MSG.images[0])
            wecom.expire_tokens()
            wecom.rate_limit_sends = 1
            await adapter.send_text_reply(MSG, "hello")
            with pytest.raises(ImageFetchError) as info:
                await adapter.fetch_image(MSG, ImageRef("missing"))
            await wecom.stop()  # transport errors name the path, not the URL
            with pytest.raises(ReplyError) as info2:
                await adapter.send_text_reply(MSG, "x")
    finally:
        await adapter.stop()
    text = json.dumps(logs, default=str) + str(info.value) + str(info2.value)
    assert wecom.tokens_issued == 2 and any(e["event"] == "wecom.api_retry" for e in logs)
    for issued in ["fake-token-", "access_token=", SECRET, TOKEN, AES_KEY]:
        assert issued not in text, issued


async def test_a_late_refusal_of_the_old_token_keeps_the_new_one() -> None:
    import asyncio

    from adapters.http import HttpRequest

    issued: list[str] = []
    t2_issued = asyncio.Event()
    refusals = 0

    async def handler(request: HttpRequest) -> HttpResponse:
        nonlocal refusals
        if "/gettoken" in request.url:
            issued.append(f"T{len(issued) + 1}")
            if len(issued) == 2:
                t2_issued.set()
            return HttpResponse.of_json(
                {"errcode": 0, "access_token": issued[-1], "expires_in": 7200}
            )
        if "access_token=T1" in request.url and len(issued) >= 1 and refusals < 2:
            refusals += 1
            if refusals == 2:  # the second call's refusal arrives after T2 was fetched
                await t2_issued.wait()
            return HttpResponse.of_json({"errcode": 42001, "errmsg": "access_token expired"})
        return HttpResponse.of_json({"errcode": 0, "msgid": "m"})

    api = WeComApi(make_config("http://fake"), MockTransport(handler))
    await api.access_token()
    await asyncio.gather(api.send_text("a", "1"), api.send_text("b", "2"))
    assert issued == ["T1", "T2"]

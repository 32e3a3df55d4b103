"""The OpenAPI client and replies against the loopback fake Feishu (real HTTP, injected faults)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapters.base import ImageFetchError, ImageRef, InboundMessage, ReplyError
from adapters.feishu import FeishuAdapter, FeishuConfig
from adapters.feishu.openapi import FeishuApiError, OpenApiClient, idempotency_uuid
from adapters.http import AiohttpClient, HttpError, HttpRequest, MockTransport
from tests.adapters.conftest import IMAGES
from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu

MSG = InboundMessage(
    platform="feishu",
    chat_id="oc_1",
    message_id="om_sample_image_1",
    event_id="ev_1",
    sender_id="ou_1",
    text="",
    images=(ImageRef("img_v3_sample_coffee"),),
    message_type="image",
    received_at=0.0,
)


def config(fake: FakeFeishu, **kw: Any) -> FeishuConfig:
    base: dict[str, Any] = {
        "mode": "webhook",
        "app_id": APP_ID,
        "app_secret": APP_SECRET,
        "verification_token": "vt",
        "base_url": fake.base_url,
        "api_backoff_base_s": 0.01,
        "api_backoff_max_s": 0.05,
        "patch_interval_s": 0.05,
    }
    base.update(kw)
    return FeishuConfig(**base)


class Sleeps:
    """An injected sleep that records what the retry policy asked for (and does not wait)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def http() -> AsyncIterator[AiohttpClient]:
    client = AiohttpClient()
    try:
        yield client
    finally:
        await client.close()


async def test_token_is_cached_and_refreshed_on_99991663(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    api = OpenApiClient(config(fake), http)
    await api.reply("om_1", "text", '{"text":"a"}', "u-1")
    await api.reply("om_2", "text", '{"text":"b"}', "u-2")
    assert fake.tokens_issued == 1
    fake.expire_tokens()
    await api.reply("om_3", "text", '{"text":"c"}', "u-3")
    assert fake.tokens_issued == 2
    assert len(fake.replies) == 3


async def test_token_is_refreshed_within_the_margin_before_expiry(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    now = [1000.0]
    fake.token_expire_s = 7200
    api = OpenApiClient(config(fake), http, monotonic=lambda: now[0])
    await api.tenant_token()
    now[0] += 7200 - 601  # still more than 10 minutes left
    await api.tenant_token()
    assert fake.tokens_issued == 1
    now[0] += 2  # inside the 10-minute margin
    await api.tenant_token()
    assert fake.tokens_issued == 2


async def test_rate_limited_reply_is_retried_once_and_posted_once(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    sleeps = Sleeps()
    api = OpenApiClient(config(fake), http, sleep=sleeps)
    fake.fail_next("reply", status=429, code=99991400, x_ogw_ratelimit_reset="3")
    reply_id = await api.reply("om_1", "text", '{"text":"a"}', "u-1")
    assert [r for r, _ in fake.requests].count("reply") == 2
    assert len(fake.replies) == 1 and fake.replies[0].message_id == reply_id
    assert sleeps.waits == [3.0]  # the reset header, not the backoff


async def test_code_99991400_with_http_200_is_retried_too(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    sleeps = Sleeps()
    api = OpenApiClient(config(fake), http, sleep=sleeps)
    fake.fail_next("reply", status=200, code=99991400, x_ogw_ratelimit_reset="1")
    await api.reply("om_1", "text", '{"text":"a"}', "u-1")
    assert len(fake.replies) == 1 and sleeps.waits == [1.0]


async def test_rate_limit_wait_is_never_shortened(fake: FakeFeishu, http: AiohttpClient) -> None:
    # A stated wait over the allowed maximum fails the call instead of retrying too early.
    sleeps = Sleeps()
    api = OpenApiClient(config(fake, rate_limit_max_wait_s=2.0), http, sleep=sleeps)
    reply_id = await api.reply("om_1", "interactive", "{}", "u-1")
    fake.fail_next("patch", status=429, x_ogw_ratelimit_reset="3600")
    with pytest.raises(FeishuApiError, match="3600"):
        await api.patch(reply_id, "{}")
    assert sleeps.waits == []
    fake.fail_next("patch", status=429, x_ogw_ratelimit_reset="2")
    fake.fail_next("patch", status=429, x_ogw_ratelimit_reset="garbage")
    await api.patch(reply_id, "{}")
    assert sleeps.waits == [2.0, 0.01]


async def test_5xx_is_retried_with_growing_backoff(fake: FakeFeishu, http: AiohttpClient) -> None:
    sleeps = Sleeps()
    api = OpenApiClient(
        config(fake, api_backoff_base_s=1.0, api_backoff_max_s=10.0), http, sleep=sleeps
    )
    for _ in range(3):
        fake.fail_next("reply", status=503)
    await api.reply("om_1", "text", "{}", "u-1")
    assert len(sleeps.waits) == 3
    for attempt, wait in enumerate(sleeps.waits):
        assert 0.5 * 2**attempt <= wait <= 2**attempt
    assert len(fake.replies) == 1


async def test_retries_are_bounded_and_permanent_errors_counted(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    sleeps = Sleeps()
    api = OpenApiClient(config(fake, api_max_attempts=3), http, sleep=sleeps)
    for _ in range(5):
        fake.fail_next("reply", status=500)
    with pytest.raises(FeishuApiError, match="gave up"):
        await api.reply("om_1", "text", "{}", "u-1")
    assert len(sleeps.waits) == 2 and api.permanent_errors == 1
    fake.faults.clear()
    fake.fail_next("reply", status=400, code=230002)  # bot not in chat: permanent
    with pytest.raises(FeishuApiError) as info:
        await api.reply("om_1", "text", "{}", "u-1")
    assert info.value.code == 230002 and api.permanent_errors == 2
    assert len(sleeps.waits) == 2  # no retry of a permanent error


async def test_transport_errors_are_retried() -> None:
    calls = 0

    def handler(request: HttpRequest) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise HttpError("connection reset")
        from adapters.http import HttpResponse

        if request.url.endswith("/internal"):
            return HttpResponse.of_json({"code": 0, "tenant_access_token": "t", "expire": 7200})
        return HttpResponse.of_json({"code": 0, "data": {"message_id": "om_r"}})

    cfg = FeishuConfig(app_id="a", app_secret="b", verification_token="v", base_url="http://x")
    api = OpenApiClient(cfg, MockTransport(handler), sleep=Sleeps())
    assert await api.reply("om_1", "text", "{}", "u") == "om_r"


async def test_image_download_and_failures(fake: FakeFeishu, http: AiohttpClient) -> None:
    photo = (IMAGES / "coffee.jpg").read_bytes()
    fake.images["img_v3_sample_coffee"] = photo
    adapter = FeishuAdapter(config(fake, max_image_bytes=len(photo)), http=http)
    assert await adapter.fetch_image(MSG, MSG.images[0]) == photo
    with pytest.raises(ImageFetchError, match="234003"):
        await adapter.fetch_image(MSG, ImageRef("img_missing"))
    fake.images["img_big"] = photo + b"x"
    with pytest.raises(ImageFetchError, match="too large"):
        await adapter.fetch_image(MSG, ImageRef("img_big"))
    fake.images["img_empty"] = b""
    with pytest.raises(ImageFetchError):
        await adapter.fetch_image(MSG, ImageRef("img_empty"))
    assert adapter.status().api_errors == 3


async def test_hostile_keys_stay_inside_the_path(fake: FakeFeishu, http: AiohttpClient) -> None:
    adapter = FeishuAdapter(config(fake), http=http)
    with pytest.raises(ImageFetchError):
        await adapter.fetch_image(MSG, ImageRef("../../reply?x=1"))
    assert fake.requests[-1][0] == "resource"


async def test_open_reply_is_idempotent_per_message(fake: FakeFeishu, http: AiohttpClient) -> None:
    adapter = FeishuAdapter(config(fake), http=http)
    first = await adapter.open_reply(MSG)
    fake.fail_next("reply", status=502)
    second = await adapter.open_reply(MSG)  # a retry, or the same job after a restart
    assert first.reply_message_id == second.reply_message_id
    assert len(fake.replies) == 1
    assert fake.replies[0].uuid == idempotency_uuid(MSG.message_id, "answer")
    assert len(fake.replies[0].uuid) <= 50
    assert json.loads(fake.replies[0].content)["config"]["update_multi"] is True
    await adapter.send_text_reply(MSG, "Send me a photo and I will describe it.")
    await adapter.send_text_reply(MSG, "Send me a photo and I will describe it.")
    assert len(fake.replies) == 2 and fake.replies[1].msg_type == "text"


async def test_open_reply_resumes_a_card_without_posting_after_feishu_forgot_the_uuid(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    adapter = FeishuAdapter(config(fake), http=http)
    card_id = (await adapter.open_reply(MSG)).reply_message_id
    fake.forget_uuids()  # more than an hour later: Feishu no longer knows the uuid
    posts = fake.reply_posts
    stream = await adapter.open_reply(MSG, existing_reply_id=card_id)
    assert stream.reply_message_id == card_id
    assert fake.reply_posts == posts and len(fake.replies) == 1  # nothing posted
    await stream.finish("a cat on a sofa")
    assert [mid for _, mid, _ in fake.patches] == [card_id]
    assert json.loads(fake.patches[-1][2])["elements"][0]["text"]["content"] == "a cat on a sofa"
    again = await adapter.open_reply(MSG)  # without the id, a forgotten uuid posts a second card
    assert again.reply_message_id != card_id and len(fake.replies) == 2


async def test_stream_updates_are_coalesced_under_five_per_second(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    adapter = FeishuAdapter(config(fake, patch_interval_s=0.05), http=http)
    stream = await adapter.open_reply(MSG)
    text = ""
    for i in range(200):
        text += f"w{i} "
        await stream.update(text)
        if i % 20 == 0:
            await asyncio.sleep(0.02)
    await stream.finish(text + "end")
    times = [t for t, _, _ in fake.patches]
    assert 2 <= len(times) < 60
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(times))
    final = json.loads(fake.patches[-1][2])
    assert final["elements"][0]["text"]["content"] == text + "end"
    assert final["header"]["template"] == "green"
    await stream.update("late")  # ignored after finish
    await asyncio.sleep(0.1)
    assert len(fake.patches) == len(times)


async def test_stream_fail_shows_the_apology(fake: FakeFeishu, http: AiohttpClient) -> None:
    adapter = FeishuAdapter(config(fake), http=http)
    stream = await adapter.open_reply(MSG)
    await stream.fail("Sorry, I could not read that image.")
    card = json.loads(fake.patches[-1][2])
    assert card["elements"][0]["text"]["content"] == "Sorry, I could not read that image."


async def test_failed_final_update_raises_reply_error(
    fake: FakeFeishu, http: AiohttpClient
) -> None:
    adapter = FeishuAdapter(config(fake), http=http)
    stream = await adapter.open_reply(MSG)
    fake.fail_next("patch", status=400, code=230020)
    with pytest.raises(ReplyError):
        await stream.finish("done")
    fake.fail_next("reply", status=400, code=230002)
    with pytest.raises(ReplyError):
        await adapter.open_reply(
            InboundMessage("feishu", "oc", "om_other", "", "", "", (), "image", 0.0)
        )


async def test_secrets_never_reach_logs(fake: FakeFeishu, http: AiohttpClient) -> None:
    api = OpenApiClient(config(fake, api_max_attempts=2), http, sleep=Sleeps())
    with capture_logs() as logs:
        await api.tenant_token()
        fake.fail_next("reply", status=500)
        fake.fail_next("reply", status=500)
        with pytest.raises(FeishuApiError) as info:
            await api.reply("om_1", "text", "{}", "u")
    shown = repr(logs) + str(info.value) + repr(api)
    assert APP_SECRET not in shown and "t-fake-1" not in shown
    assert any(e["event"] == "feishu.api_error" for e in logs)

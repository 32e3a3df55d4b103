"""Every error status in OpenAI's shape, and hostile inputs, through the official openai client."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import openai
import pytest

from bridge.store.memory import MemoryStore
from tests.http.conftest import OTHER, TOKEN, Served, serve, user_message, wait_ready
from tests.http.fakes import GatedEngine

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def post_raw(base: str, body: bytes, content_type: str = "application/json") -> Any:
    headers = {**AUTH, "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/v1/chat/completions", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


def assert_shape(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


async def test_malformed_json_is_400(gated: tuple[Served, GatedEngine]) -> None:
    served, _ = gated
    for body in (b"{not json", b"\xff\xfe", b"[1,2]", b'"text"', b"[" * 100_000):
        status, err, _ = await post_raw(served.base, body)
        assert status == 400, body[:10]
        assert_shape(err)


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "type"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "text"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, "image_url"),
        ({"role": "user", "content": 12}, "content"),
        ({"role": "wizard", "content": "hi"}, "role"),
        ({"role": "user", "content": "no image at all"}, None),
    ],
)
async def test_wrong_part_types_are_400_naming_the_param(
    gated: tuple[Served, GatedEngine], message: Any, param: str | None
) -> None:
    served, engine = gated
    with pytest.raises(openai.BadRequestError) as err:
        await served.client.chat.completions.create(model="gated", messages=[message])
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict)
    if param is not None:
        assert str(body["param"]).endswith(param)
    assert engine.handles == []


async def test_a_30_mb_data_url_is_413(gated: tuple[Served, GatedEngine]) -> None:
    served, engine = gated
    url = "data:image/png;base64," + "A" * (30 * 2**20)
    with pytest.raises(openai.APIStatusError) as err:
        await served.client.chat.completions.create(model="gated", messages=[user_message(url=url)])
    assert err.value.status_code == 413
    assert served.app.hub.inflight.used == 0 and engine.handles == []


async def test_an_image_over_the_image_limit_is_413(gated: tuple[Served, GatedEngine]) -> None:
    served, _ = gated
    limit = served.app.settings.limits.max_image_bytes  # --max-image-bytes (20 MiB by default)
    big = base64.b64encode(b"\x89PNG" + b"\0" * limit).decode()
    with pytest.raises(openai.APIStatusError) as err:
        await served.client.chat.completions.create(
            model="gated", messages=[user_message(url="data:image/png;base64," + big)]
        )
    assert err.value.status_code == 413 and err.value.code == "too_large"


async def test_invalid_base64_and_non_image_data_urls_are_400(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, _ = gated
    for url in (
        "data:image/png;base64,@@@not-base64",
        "data:text/plain;base64,aGk=",
        "data:image/png,rawbytes",
        "data:image/png;base64,",
    ):
        with pytest.raises(openai.BadRequestError):
            await served.client.chat.completions.create(
                model="gated", messages=[user_message(url=url)]
            )


async def test_a_url_of_a_host_not_allowed_is_400_and_never_fetched(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, _ = gated
    for url in (
        "https://example.com/cat.jpg",
        "http://127.0.0.1:1/x.png",
        "file:///etc/passwd",
        "ftp://example.com/a.png",
    ):
        with pytest.raises(openai.BadRequestError) as err:
            await served.client.chat.completions.create(
                model="gated", messages=[user_message(url=url)]
            )
        assert "data: URL" in err.value.message


async def test_busy_engine_is_429_with_retry_after(gated: tuple[Served, GatedEngine]) -> None:
    served, engine = gated
    engine.busy = True
    raw = served.client.chat.completions.with_raw_response
    with pytest.raises(openai.RateLimitError) as err:
        await raw.create(model="gated", messages=[user_message()])
    assert err.value.code == "busy"
    assert err.value.response.headers["Retry-After"] == "2"
    assert served.app.hub.inflight.used == 0


async def test_the_per_token_submit_rate_is_429_and_other_tokens_go_on() -> None:
    now = [1000.0]
    engine = GatedEngine()
    engine.release(1000)
    app = await serve(engine, MemoryStore(clock=lambda: now[0]), flags={"token-submit-rate": "2"})
    try:
        await wait_ready(app.urls[0])
        served = Served(app, app.urls[0], [])
        client = served.openai(TOKEN)
        for _ in range(2):
            await client.chat.completions.create(model="gated", messages=[user_message()])
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="gated", messages=[user_message()])
        assert err.value.code == "rate_limited"
        assert err.value.response.headers["Retry-After"] == "1"
        other = served.openai(OTHER)
        await other.chat.completions.create(model="gated", messages=[user_message()])
        now[0] += 1.5  # the window passed
        await client.chat.completions.create(model="gated", messages=[user_message()])
        await served.close()
    finally:
        await app.stop(grace_s=1.0)


async def test_not_ready_is_503() -> None:
    from tests.app.fakes import FakeEngine

    engine = FakeEngine()
    app = await serve(engine)
    try:
        served = Served(app, app.urls[0], [])
        with pytest.raises(openai.InternalServerError) as err:
            await served.openai(TOKEN).chat.completions.create(
                model="fake", messages=[user_message()]
            )
        assert err.value.status_code == 503 and err.value.code == "not_ready"
        await served.close()
    finally:
        engine.loaded.set()
        await app.stop(grace_s=1.0)


async def test_the_key_never_reaches_logs_or_errors(
    gated: tuple[Served, GatedEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    served, engine = gated
    engine.release(10)
    await served.client.chat.completions.create(model="gated", messages=[user_message()])
    with pytest.raises(openai.AuthenticationError) as err:
        await served.openai("sk-leaky-secret").models.list()
    await asyncio.sleep(0)
    out = capsys.readouterr()
    for secret in (TOKEN, "sk-leaky-secret"):
        assert secret not in out.out + out.err
        assert secret not in str(err.value.body)


async def test_a_full_inflight_budget_is_429_busy_and_frees_nothing_it_did_not_take(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, engine = gated
    budget = served.app.hub.inflight
    budget.force_reserve(budget.limit)  # /ws frames hold the whole budget now
    try:
        with pytest.raises(openai.RateLimitError) as err:
            await served.client.chat.completions.create(model="gated", messages=[user_message()])
        assert err.value.code == "busy" and err.value.response.headers["Retry-After"] == "1"
        assert budget.used == budget.limit and engine.handles == []
    finally:
        budget.release(budget.limit)
    engine.release(100)
    await served.client.chat.completions.create(model="gated", messages=[user_message()])
    assert budget.used == 0


async def test_an_engine_that_raises_unexpectedly_is_a_500_in_the_error_shape(
    gated: tuple[Served, GatedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, engine = gated

    def broken(_request: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "submit", broken)
    with pytest.raises(openai.InternalServerError) as err:
        await served.client.chat.completions.create(model="gated", messages=[user_message()])
    assert err.value.status_code == 500 and err.value.code == "internal"
    assert "boom" not in err.value.message
    assert served.app.hub.inflight.used == 0

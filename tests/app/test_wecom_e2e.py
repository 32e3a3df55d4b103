"""WeCom end to end: a real ``bridge serve --wecom-mode webhook`` against a fake WeCom."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.adapters.wecom.fake_wecom import (
    AES_KEY,
    AGENT_ID,
    CORP_ID,
    SECRET,
    TOKEN,
    CallbackSender,
    FakeWeCom,
    image_message,
    sent_json,
)
from tests.app.procs import BridgeProcess
from tests.conftest import IMAGES

PLACEHOLDER = "Looking at your photo…"


@pytest.fixture
async def wecom() -> AsyncIterator[FakeWeCom]:
    fake = FakeWeCom()
    fake.media["media-coffee"] = ((IMAGES / "coffee.jpg").read_bytes(), "image/jpeg")
    await fake.start()
    yield fake
    await fake.stop()


def wecom_args(fake: FakeWeCom, db: Path, *extra: str) -> list[str]:
    """``bridge serve`` flags for the fake's app (the secrets through flags, as in the docs)."""
    return [
        "--store", f"sqlite:///{db}",
        "--max-new-tokens", "24",
        "--wecom-mode", "webhook",
        "--wecom-corp-id", CORP_ID,
        "--wecom-agent-id", AGENT_ID,
        "--wecom-secret", SECRET,
        "--wecom-token", TOKEN,
        "--wecom-aes-key", AES_KEY,
        "--wecom-base-url", fake.base_url,
        *extra,
    ]  # fmt: skip


async def wait_sent(fake: FakeWeCom, count: int, limit_s: float = 60.0) -> None:
    for _ in range(int(limit_s * 20)):
        if len(fake.sent) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} texts, got {sent_json(fake)}")


async def test_image_retried_three_times_gets_placeholder_and_one_answer(
    wecom: FakeWeCom, tmp_path: Path
) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", *wecom_args(wecom, tmp_path / "b.db")).start()
    sender = CallbackSender()
    try:
        await bridge.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.base + "/readyz") as resp:
                ready = await resp.json()
            link = ready["components"]["wecom"]
            assert link["state"] == "listening" and link["healthy"] and link["mode"] == "webhook"
            # The URL check WeCom runs when the callback URL is saved.
            query = sender.url_check_query("5927782489442352469")
            async with http.get(bridge.base + "/webhooks/wecom", params=query) as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                assert await resp.text() == "5927782489442352469"
            fields = image_message(4_000_000_000_123, "media-coffee")
            statuses = [await sender.post(http, bridge.base, fields) for _ in range(4)]
            assert statuses == [(200, "")] * 4  # the first delivery and WeCom's three retries
            await wait_sent(wecom, 2)
            await asyncio.sleep(1.0)  # a second answer would have come by now
            async with http.get(bridge.base + "/metrics") as resp:
                metrics = await resp.text()
        assert wecom.sent[0].content == PLACEHOLDER
        assert len(wecom.sent) == 2, sent_json(wecom)
        answer = wecom.sent[1]
        assert answer.touser == "zhangsan" and answer.agentid == int(AGENT_ID)
        assert answer.content.strip() and answer.content != PLACEHOLDER
        assert wecom.requests.count("media") == 1 and wecom.tokens_issued == 1
        assert 'bridge_im_events_total{outcome="accepted",platform="wecom"} 1.0' in metrics
        assert 'bridge_im_events_total{outcome="duplicate",platform="wecom"} 3.0' in metrics
        assert await bridge.terminate() == 0
        log = bridge.log()
        for secret in (SECRET, TOKEN, AES_KEY, "fake-token-", "access_token="):
            assert secret not in log, secret
    finally:
        bridge.ensure_dead()


async def test_forged_callbacks_are_refused_and_nothing_is_sent(
    wecom: FakeWeCom, tmp_path: Path
) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", *wecom_args(wecom, tmp_path / "b.db")).start()
    try:
        await bridge.wait_ready()
        forged = CallbackSender(token="not-the-token")
        async with aiohttp.ClientSession() as http:
            status, _ = await forged.post(http, bridge.base, image_message(1, "media-coffee"))
            assert status == 403
            query = forged.url_check_query("echo")
            async with http.get(bridge.base + "/webhooks/wecom", params=query) as resp:
                assert resp.status == 403
            big = b"<xml>" + b"a" * (300 * 1024) + b"</xml>"
            req = CallbackSender().sign_message(b"<xml/>")
            async with http.post(
                bridge.base + "/webhooks/wecom", params=req.query, data=big
            ) as resp:
                assert resp.status == 413
        await asyncio.sleep(0.3)
        assert wecom.sent == [] and wecom.requests == []
    finally:
        await bridge.terminate()
        bridge.ensure_dead()


async def test_bad_aes_key_is_a_clear_startup_error(tmp_path: Path) -> None:
    bad_key = "x" * 42
    args = [
        "--wecom-mode", "webhook", "--wecom-corp-id", CORP_ID, "--wecom-agent-id", AGENT_ID,
        "--wecom-secret", SECRET, "--wecom-token", TOKEN, "--wecom-aes-key", bad_key,
    ]  # fmt: skip
    bridge = BridgeProcess(tmp_path / "b.log", "--store", "memory://", *args).start()
    try:
        assert bridge.proc is not None
        code = await asyncio.to_thread(bridge.proc.wait, 60)
        assert code != 0
        log = bridge.log()
        assert "43 characters" in log and bad_key not in log
    finally:
        bridge.ensure_dead()


async def test_rate_limit_and_expired_token_are_survived(wecom: FakeWeCom, tmp_path: Path) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", *wecom_args(wecom, tmp_path / "b.db")).start()
    sender = CallbackSender()
    try:
        await bridge.wait_ready()
        async with aiohttp.ClientSession() as http:
            wecom.rate_limit_sends = 1  # the placeholder meets errcode 45009 once
            assert await sender.post(http, bridge.base, image_message(1, "media-coffee")) == (
                200,
                "",
            )
            await wait_sent(wecom, 2)
            wecom.expire_tokens()  # the next call with the cached token gets 42001
            assert await sender.post(http, bridge.base, image_message(2, "media-coffee")) == (
                200,
                "",
            )
            await wait_sent(wecom, 4)
        contents = [s.content for s in wecom.sent]
        assert contents[0] == PLACEHOLDER and contents[2] == PLACEHOLDER, sent_json(wecom)
        assert len(contents) == 4 and wecom.tokens_issued == 2
        log = bridge.log()
        assert "wecom.api_retry" in log and "wecom.token_rejected" in log
        for secret in (SECRET, TOKEN, AES_KEY, "fake-token-", "access_token="):
            assert secret not in log, secret
    finally:
        await bridge.terminate()
        bridge.ensure_dead()


async def test_kill_9_after_the_ack_then_a_retry_gives_one_answer(
    wecom: FakeWeCom, tmp_path: Path
) -> None:
    args = wecom_args(wecom, tmp_path / "b.db")
    first = BridgeProcess(tmp_path / "first.log", *args).start()
    second = BridgeProcess(tmp_path / "second.log", *args)
    sender = CallbackSender()
    fields = image_message(31337, "media-coffee")
    try:
        await first.wait_ready()
        async with aiohttp.ClientSession() as http:
            assert await sender.post(http, first.base, fields) == (200, "")
            first.kill9()  # acknowledged (so recorded), then the process dies at once
            second.start()
            await second.wait_ready()
            assert await sender.post(http, second.base, fields) == (200, "")  # WeCom's retry
        await wait_sent(wecom, 2)
        await asyncio.sleep(1.0)
        contents = [s.content for s in wecom.sent]
        assert contents.count(PLACEHOLDER) == 1 and len(contents) == 2, sent_json(wecom)
        assert await second.terminate() == 0
    finally:
        first.ensure_dead()
        second.ensure_dead()

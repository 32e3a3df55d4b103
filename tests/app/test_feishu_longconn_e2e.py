"""Long-connection mode end to end: a real bridge process, the fake Feishu gateway, one answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu
from tests.app.procs import BridgeProcess
from tests.app.test_feishu_e2e import MESSAGE_ID, SAMPLE, answers, wait_final


async def test_longconn_event_is_acked_answered_once_and_survives_a_dropped_link(
    feishu: FakeFeishu, tmp_path: Path
) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log",
        "--store", f"sqlite:///{tmp_path}/b.db",
        "--max-new-tokens", "16",
        "--feishu-mode", "longconn",
        "--feishu-app-id", APP_ID,
        "--feishu-app-secret", APP_SECRET,
        "--feishu-base-url", feishu.base_url,
    ).start()  # fmt: skip
    try:
        await bridge.wait_ready()
        await feishu.gateway.wait_connections(1, limit_s=60)
        async with aiohttp.ClientSession() as http, http.get(bridge.base + "/readyz") as resp:
            body = await resp.json()
        assert body["components"]["feishu"]["mode"] == "longconn"
        assert body["components"]["feishu"]["state"] == "connected"
        assert APP_SECRET not in json.dumps(body)
        # The webhook route is not served in long-connection mode.
        async with (
            aiohttp.ClientSession() as http,
            http.post(bridge.base + "/webhooks/feishu", data=b"{}") as resp,
        ):
            assert resp.status in (404, 405)

        await feishu.gateway.push(MESSAGE_ID, SAMPLE["body"].encode(), fragments=2)
        await wait_final(feishu)
        for _ in range(200):
            if MESSAGE_ID not in feishu.gateway.pending:
                break
            await asyncio.sleep(0.05)
        assert (MESSAGE_ID, 200) in feishu.gateway.acks
        # The link drops and Feishu re-sends the same event on the new connection: no new answer.
        await feishu.gateway.push(MESSAGE_ID, SAMPLE["body"].encode())
        feishu.gateway.abort()
        await feishu.gateway.wait_connections(2, limit_s=60)
        for _ in range(200):
            if MESSAGE_ID not in feishu.gateway.pending:
                break
            await asyncio.sleep(0.05)
        assert MESSAGE_ID not in feishu.gateway.pending
        assert len(answers(feishu)) == 1 and feishu.reply_posts == 1
        assert "im_duplicate" in bridge.log()
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()

"""Real ``bridge serve`` processes: topic grants, and RSS under a burst of large submits."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import websockets

from bench.hub_inflight_rss import burst
from tests.app.procs import BridgeProcess

GRANTED = "granted-client-secret"
PLAIN = "plain-client-secret"
ADMIN = "admin-secret-token"


async def test_subscribe_without_and_with_a_grant(tmp_path: Path) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log",
        "--store", "memory://",
        "--token", GRANTED,
        "--token", PLAIN,
        "--admin-token", ADMIN,
        "--topic-grant", f"{GRANTED}=chat:feishu:oc_team*",
    ).start()  # fmt: skip
    try:
        await bridge.wait_ready()
        answers: dict[str, dict[str, object]] = {}
        for token, topic in (
            (PLAIN, "chat:feishu:oc_team1"),
            (GRANTED, "chat:feishu:oc_team1"),
            (GRANTED, "chat:feishu:oc_other"),
        ):
            async with websockets.connect(bridge.ws_url) as ws:
                await ws.send(json.dumps({"type": "hello", "token": token}))
                assert json.loads(await ws.recv())["type"] == "welcome"
                await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
                answer = json.loads(await ws.recv())
                while answer["type"] == "ping":  # a heartbeat may come first on a busy machine
                    answer = json.loads(await ws.recv())
                answers[f"{token[:4]} {topic}"] = answer
        assert answers["plai chat:feishu:oc_team1"]["code"] == "forbidden"
        assert answers["gran chat:feishu:oc_team1"] == {
            "type": "subscribed",
            "topic": "chat:feishu:oc_team1",
        }
        assert answers["gran chat:feishu:oc_other"]["code"] == "forbidden"
        # The dashboard's data shows the grants under the token's label, never the token.
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(bridge.base + "/api/status", headers=headers) as resp,
        ):
            assert resp.status == 200
            body = await resp.text()
        grants = json.loads(body)["grants"]
        assert len(grants) == 1 and grants[0]["patterns"] == ["chat:feishu:oc_team*"]
        assert grants[0]["token"].startswith("tok-")
        for secret in (GRANTED, PLAIN, ADMIN):
            assert secret not in body
            assert secret not in bridge.log()
    finally:
        assert await bridge.terminate() == 0


async def test_a_burst_of_large_submits_stays_within_the_budget(tmp_path: Path) -> None:
    """16 connections send an 8 MiB submit at once into a 32 MiB budget: some are told ``busy``
    and retry, every job ends exactly once, RSS rises far less than 16 frames and comes back.

    Without the budget the same burst raised RSS by about 270 MiB (docs/benchmarks.md).
    """
    result = await burst(
        connections=16,
        image_mib=6.0,
        max_inflight="32MiB",
        env={},
        log_path=tmp_path / "b.log",
        limit_s=120.0,
    )
    assert result["jobs_done"] == 16 and result["ended_twice"] == 0, result
    assert result["other_errors"] == [], result
    assert result["busy_answers"] > 0, result
    assert result["rss_peak_mib"] - result["rss_before_mib"] <= 140, result
    assert result["rss_settled_mib"] - result["rss_before_mib"] <= 48, result
    assert result["inflight_gauge_after"] == "0.0", result

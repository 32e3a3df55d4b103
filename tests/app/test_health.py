"""Health and readiness transitions of the composed app, with a controllable engine."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from tests.app.fakes import FakeEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def parts() -> AsyncIterator[tuple[BridgeApp, FakeEngine, MemoryStore, str]]:
    engine = FakeEngine()
    store = MemoryStore()
    settings = load_settings({"port": str(free_port()), "token": ["t"]}, env={})
    app = BridgeApp(settings, engine=engine, store=store, adapters=[])
    await app.start()
    try:
        yield app, engine, store, app.urls[0]
    finally:
        engine.loaded.set()
        await app.stop(grace_s=1.0)


async def get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def wait_for_status(url: str, status: int) -> dict[str, object]:
    for _ in range(200):
        code, body = await get(url)
        if code == status:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} never answered {status}")


async def test_healthz_at_once_readyz_only_after_the_model_loads(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    _app, engine, _store, base = parts
    assert await get(base + "/healthz") == (200, {"status": "ok"})
    code, body = await get(base + "/readyz")
    assert code == 503 and "loading" in str(body["reason"])
    engine.loaded.set()
    body = await wait_for_status(base + "/readyz", 200)
    assert body["status"] == "ready"


async def test_readyz_says_why_when_the_store_is_down_and_recovers(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    _app, engine, store, base = parts
    engine.loaded.set()
    await wait_for_status(base + "/readyz", 200)
    store.available = False
    body = await wait_for_status(base + "/readyz", 503)
    assert "store unavailable" in str(body["reason"])
    store.available = True
    await wait_for_status(base + "/readyz", 200)


async def test_readyz_reports_a_failed_model_load(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    _app, engine, _store, base = parts
    engine.fail_start = RuntimeError("no such model")
    engine.loaded.set()
    body = await wait_for_status(base + "/readyz", 503)
    for _ in range(100):
        if "failed to load" in str(body["reason"]):
            break
        await asyncio.sleep(0.02)
        _code, body = await get(base + "/readyz")
    assert "model failed to load" in str(body["reason"]) and "no such model" in str(body["reason"])


async def test_metrics_lists_every_spec_metric(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    _app, _engine, _store, base = parts
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    for name in (
        "bridge_ws_connections",
        "bridge_ws_heartbeat_rtt_seconds",
        "bridge_ws_heartbeat_timeouts_total",
        "bridge_engine_queue_depth",
        "bridge_engine_batch_size",
        'bridge_engine_requests_total{outcome="done"}',
        "bridge_engine_generated_tokens_total",
        'bridge_feishu_events_total{outcome="accepted"}',
        'bridge_feishu_events_total{outcome="duplicate"}',
        'bridge_feishu_events_total{outcome="rejected"}',
        "process_resident_memory_bytes",
    ):
        assert name in text, name


async def test_draining_turns_readyz_503_and_refuses_new_websockets(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    app, engine, _store, base = parts
    engine.loaded.set()
    await wait_for_status(base + "/readyz", 200)
    app.draining = True
    body = await wait_for_status(base + "/readyz", 503)
    assert "shutting down" in str(body["reason"])
    async with aiohttp.ClientSession() as http, http.get(base + "/ws") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "shutting_down"
    app.draining = False


async def test_unknown_route_gets_the_json_error_shape(
    parts: tuple[BridgeApp, FakeEngine, MemoryStore, str],
) -> None:
    _app, _engine, _store, base = parts
    code, body = await get(base + "/nope")
    assert code == 404
    assert body == {"error": {"code": "not_found", "message": "Not Found"}}

"""The cluster-wide answer cache end to end: two real ``bridge serve`` processes on one Redis, and
an engine whose Redis goes away."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from bridge.store.redis import RedisStore
from bridge.store.redis_answers import RedisAnswerCache
from engine import Engine, JobRequest
from engine.tiny import ensure_tiny_model
from engine.types import Done
from tests.app.procs import BridgeProcess
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES
from tests.engine.conftest import collect, make_config
from tests.redis_fixtures import (
    RedisServer,
    delete_prefix,
    private_redis,
    redis_base_url,
    redis_store_url,
    unique_prefix,
)

__all__ = ["private_redis", "redis_base_url", "redis_store_url"]
TOKEN = "shared-cache-client-token"


@pytest.fixture
def shared_url(redis_store_url: str) -> Iterator[str]:
    prefix = unique_prefix()
    yield f"{redis_store_url}?prefix={prefix}"
    delete_prefix(redis_store_url, prefix)


async def ask(bridge: BridgeProcess, job_id: str) -> dict[str, Any]:
    """Submit one question over /ws; the terminal event frame."""
    image = base64.b64encode((IMAGES / "coffee.jpg").read_bytes()).decode()
    async with websockets.connect(bridge.ws_url, max_size=2**24) as ws:
        await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
        assert (await recv_frame(ws))["type"] == "welcome"
        submit = {"type": "submit", "id": job_id, "prompt": "What is in the cup?", "image": image}
        await ws.send(json.dumps({**submit, "max_tokens": 12}))
        while True:
            frame = await recv_frame(ws, 90)
            if frame.get("type") == "event" and frame["kind"] in ("done", "error"):
                return frame


async def lookups(bridge: BridgeProcess) -> dict[str, float]:
    """``bridge_engine_answer_cache_lookups_total`` by ``tier/result``."""
    async with aiohttp.ClientSession() as http, http.get(bridge.base + "/metrics") as resp:
        text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("bridge_engine_answer_cache_lookups_total{"):
            labels, value = line.rsplit(" ", 1)
            tier = labels.split('tier="')[1].split('"')[0]
            result = labels.split('result="')[1].split('"')[0]
            found[f"{tier}/{result}"] = float(value)
    return found


async def test_a_question_answered_on_node_a_is_answered_from_cache_on_node_b(
    tmp_path: Path, shared_url: str
) -> None:
    args = ("--store", shared_url, "--token", TOKEN, "--max-new-tokens", "32")
    a = BridgeProcess(tmp_path / "a.log", *args).start()
    b = BridgeProcess(tmp_path / "b.log", *args).start()
    try:
        await a.wait_ready()
        await b.wait_ready()
        first = await ask(a, "q1")
        assert first["kind"] == "done" and first["cached"] is False, first
        # A's write to Redis is asynchronous to the job's end: poll B until it is there.
        for attempt in range(50):
            second = await ask(b, f"q2-{attempt}")
            assert second["kind"] == "done", second
            if second["cached"]:
                break
        assert second["cached"] is True and second["text"] == first["text"], b.log()
        assert second["usage"] == first["usage"]
        seen = await lookups(b)
        assert seen["shared/hit"] == 1 and seen["local/miss"] >= 1, seen
        third = await ask(b, "q3")  # now in B's local LRU
        assert third["cached"] is True
        assert (await lookups(b))["local/hit"] == 1
        assert (await lookups(a))["shared/miss"] == 1
        assert await a.terminate() == 0 and await b.terminate() == 0
    finally:
        a.ensure_dead()
        b.ensure_dead()


async def test_redis_down_still_answers(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url(0), connect_timeout_s=0.5, op_timeout_s=1.0)
    await store.open()
    engine = Engine(
        make_config(ensure_tiny_model(), shared_cache_timeout_s=2.0),
        shared_cache=RedisAnswerCache(store),
    )
    await engine.start()
    try:
        private_redis.stop()
        jpeg = (IMAGES / "rocket.jpg").read_bytes()
        for n in range(3):
            events = await collect(engine.submit(JobRequest(f"j{n}", jpeg, f"q{n}", 6)))
            assert isinstance(events[-1], Done) and not events[-1].cached, events
        assert engine.answers.counts[("shared", False)] == 3
        private_redis.start()  # back: the breaker lets a probe through and sharing resumes
        events = await collect(engine.submit(JobRequest("j-back", jpeg, "q-back", 6)))
        assert isinstance(events[-1], Done)
    finally:
        await engine.stop(grace_s=1.0)
        await store.close()

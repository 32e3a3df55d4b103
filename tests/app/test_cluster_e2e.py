"""Two bridge processes on one Redis: cross-node routing, takeover of a dead node, Redis faults."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import websockets

from tests.adapters.fake_feishu import FakeFeishu
from tests.app.procs import BridgeProcess
from tests.app.test_feishu_e2e import (
    CHAT_TOPIC,
    MESSAGE_ID,
    SAMPLE,
    answers,
    bridge_args,
    deliver,
    final_text,
    wait_final,
)
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES
from tests.redis_fixtures import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def node(
    tmp_path: Path, name: str, fake: FakeFeishu, redis: RedisServer, *extra: str
) -> BridgeProcess:
    args = bridge_args(fake, tmp_path / f"{name}.db", *extra)
    args[args.index("--store") + 1] = redis.url(3)
    return BridgeProcess(tmp_path / f"{name}.log", *args)


async def test_a_chat_job_on_node_b_streams_to_a_subscriber_on_node_a(
    tmp_path: Path, feishu: FakeFeishu, redis_server: RedisServer
) -> None:
    a = node(tmp_path, "a", feishu, redis_server).start()
    b = node(tmp_path, "b", feishu, redis_server).start()
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        async with websockets.connect(a.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "client-token"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "topic": CHAT_TOPIC}))
            assert (await recv_frame(ws))["type"] == "subscribed"
            assert await deliver(b) == 200
            assert await deliver(a) == 200  # the re-delivery lands on the other node
            kinds: list[str] = []
            seqs: list[int] = []
            while not kinds or kinds[-1] not in ("done", "error"):
                frame = await recv_frame(ws, 60)
                if frame.get("type") == "event":
                    kinds.append(frame["kind"])
                    seqs.append(frame["seq"])
        assert kinds[-1] == "done"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        await wait_final(feishu)
        assert len(answers(feishu)) == 1
        assert "im_duplicate" in a.log()
        assert await a.terminate() == 0 and await b.terminate() == 0
    finally:
        a.ensure_dead()
        b.ensure_dead()


async def test_a_node_killed_mid_job_has_its_job_finished_by_the_other(
    tmp_path: Path, feishu: FakeFeishu, redis_server: RedisServer
) -> None:
    # Long answers keep node B busy long enough to die mid-job.
    extra = ("--cluster-lease", "2", "--max-new-tokens", "1500")
    b = node(tmp_path, "b", feishu, redis_server, *extra).start()
    a = node(tmp_path, "a", feishu, redis_server, *extra)
    try:
        await b.wait_ready()
        assert await deliver(b) == 200
        for _ in range(600):
            if answers(feishu):
                break  # B posted the reply card and is streaming into it
            await asyncio.sleep(0.05)
        assert answers(feishu), b.log()
        b.kill9()
        assert "relay_answered" not in b.log()
        a.start()
        await a.wait_ready()
        await wait_final(feishu, limit_s=90)
        assert len(answers(feishu)) == 1  # the same card, finished by A (reply uuid)
        for _ in range(100):  # the log line follows the final card update
            if "relay_answered" in a.log():
                break
            await asyncio.sleep(0.05)
        assert "relay_reclaimed" in a.log() and "relay_answered" in a.log()
        assert await a.terminate() == 0
    finally:
        a.ensure_dead()
        b.ensure_dead()


async def readyz(bridge: BridgeProcess) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(bridge.base + "/readyz") as resp:
        return resp.status, await resp.json()


async def wait_readyz(
    bridge: BridgeProcess, status: int, limit_s: float = 30.0
) -> dict[str, object]:
    for _ in range(int(limit_s * 10)):
        code, body = await readyz(bridge)
        if code == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz never answered {status}")


def variant(i: int) -> str:
    """The sample image message as another message (its own message id and event id)."""
    return SAMPLE["body"].replace(MESSAGE_ID, f"om_load_{i}").replace("ev_sample_1", f"ev_load_{i}")


async def test_redis_stopped_and_started_under_load_loses_no_acknowledged_job(
    tmp_path: Path, feishu: FakeFeishu, redis_server: RedisServer
) -> None:
    a = node(tmp_path, "a", feishu, redis_server, "--max-new-tokens", "200").start()
    try:
        await a.wait_ready()
        # Jobs in flight when Redis goes away.
        statuses = await asyncio.gather(*(deliver(a, variant(i)) for i in range(8)))
        assert statuses == [200] * 8
        redis_server.stop()
        body = await wait_readyz(a, 503)
        assert "store" in str(body["reason"])
        # With Redis down nothing can be recorded, so nothing is acknowledged: Feishu re-delivers.
        refused = await asyncio.gather(*(deliver(a, variant(i)) for i in range(8, 12)))
        assert all(code >= 500 for code in refused)
        async with aiohttp.ClientSession() as http, http.get(a.base + "/healthz") as resp:
            assert resp.status == 200
        redis_server.start()
        await wait_readyz(a, 200)
        # Feishu re-delivers everything: the refused ones are new now, the rest are duplicates.
        again = await asyncio.gather(*(deliver(a, variant(i)) for i in range(12)))
        assert again == [200] * 12
        for _ in range(1200):
            done = {r.parent_id for r in feishu.replies}
            if (
                all(
                    any(final_text(feishu, r.message_id) is not None for r in answers(feishu, pid))
                    for pid in done
                )
                and len(done) == 12
            ):
                break
            await asyncio.sleep(0.1)
        parents = [r.parent_id for r in feishu.replies]
        assert sorted(parents) == sorted(f"om_load_{i}" for i in range(12))  # one card each
        for parent in parents:
            assert final_text(feishu, answers(feishu, parent)[0].message_id) is not None, parent
        assert await a.terminate() == 0
    finally:
        a.ensure_dead()


async def test_a_client_resumes_on_the_other_node_mid_job_with_no_gap(
    tmp_path: Path, feishu: FakeFeishu, redis_server: RedisServer
) -> None:
    extra = ("--max-new-tokens", "400")
    a = node(tmp_path, "a", feishu, redis_server, *extra).start()
    b = node(tmp_path, "b", feishu, redis_server, *extra).start()
    image = base64.b64encode((IMAGES / "astronaut.png").read_bytes()).decode()
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        seen: list[dict[str, object]] = []
        async with websockets.connect(a.ws_url, max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "client-token"}))
            session = json.loads(await ws.recv())["session"]
            await ws.send(
                json.dumps({"type": "submit", "id": "long", "prompt": "Describe", "image": image})
            )
            while len([f for f in seen if f["kind"] == "delta"]) < 5:
                frame = await recv_frame(ws, 60)
                if frame.get("type") == "event":
                    seen.append(frame)
        # The client drops mid-job and comes back on the other node.
        last = int(seen[-1]["seq"])  # type: ignore[call-overload]
        async with websockets.connect(b.ws_url, max_size=2**24) as ws:
            hello = {"type": "hello", "token": "client-token", "session": session, "last_seq": last}
            await ws.send(json.dumps(hello))
            welcome = json.loads(await ws.recv())
            assert welcome["resumed"] is True and welcome["session"] == session
            while seen[-1]["kind"] not in ("done", "error"):
                frame = await recv_frame(ws, 120)
                if frame.get("type") == "event":
                    seen.append(frame)
        seqs = [int(f["seq"]) for f in seen]  # type: ignore[call-overload]
        assert seqs == list(range(1, len(seqs) + 1))
        assert seen[-1]["kind"] == "done"
        deltas = "".join(str(f["text"]) for f in seen if f["kind"] == "delta")
        assert deltas == seen[-1]["text"]
        assert await a.terminate() == 0 and await b.terminate() == 0
    finally:
        a.ensure_dead()
        b.ensure_dead()

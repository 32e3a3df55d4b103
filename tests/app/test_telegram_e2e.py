"""Telegram end to end: real ``bridge serve`` processes against the fake Bot API on loopback,
long polling with the offset in an SQLite store across ``kill -9``, and the webhook."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from tests.adapters.telegram.fake_telegram import TOKEN, FakeTelegram, message, photo_sizes
from tests.app.procs import BridgeProcess
from tests.app.wsclient import recv_frame
from tests.conftest import IMAGES, UNIT

SECRET = "e2e-webhook-secret_42"


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram()
    await fake.start()
    yield fake
    await fake.stop()


def bridge_args(fake: FakeTelegram, db: Path, mode: str = "polling") -> list[str]:
    return [
        "--store", f"sqlite:///{db}",
        "--max-new-tokens", "16",
        "--telegram-mode", mode,
        "--telegram-token", TOKEN,
        "--telegram-base-url", fake.base_url,
        "--telegram-webhook-secret", SECRET,
        "--token", "client-token",
        "--topic-grant", "client-token=chat:telegram:*",
    ]  # fmt: skip


def photo(fake: FakeTelegram, mid: int, name: str) -> dict[str, Any]:
    """A photo message whose largest size the fake serves."""
    sizes = photo_sizes(name)
    fake.add_file(sizes[-1]["file_id"], (IMAGES / "coffee.jpg").read_bytes())
    return message(mid, caption="what is this?", photo=sizes)


def closed(bridge: BridgeProcess, message_id: str) -> bool:
    """Whether the bridge logged the final edit of its answer to ``message_id``."""
    for line in bridge.log().splitlines():
        if '"telegram.reply_closed"' in line and json.loads(line).get("message_id") == message_id:
            return True
    return False


def handled(bridge: BridgeProcess) -> list[int]:
    """The update ids the bridge handed to its sink."""
    out = []
    for line in bridge.log().splitlines():
        if '"telegram.update"' in line:
            out.append(json.loads(line)["update_id"])
    return out


async def wait_for(cond: Any, what: str, bridge: BridgeProcess, limit_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s * UNIT
    while not cond():
        assert loop.time() < deadline, f"{what} did not happen:\n{bridge.log()[-3000:]}"
        await asyncio.sleep(0.05)


async def readyz(bridge: BridgeProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(bridge.base + "/readyz") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def until_state(bridge: BridgeProcess, state: str) -> None:
    """Poll ``/readyz`` until the Telegram adapter shows ``state``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20 * UNIT
    while (await readyz(bridge))["components"]["telegram"]["state"] != state:
        assert loop.time() < deadline, bridge.log()[-3000:]
        await asyncio.sleep(0.05)


async def test_offset_survives_kill_9_between_deliveries_one_answer_each(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    args = bridge_args(tg, tmp_path / "b.db")
    first = BridgeProcess(tmp_path / "first.log", *args).start()
    second = BridgeProcess(tmp_path / "second.log", *args)
    try:
        await first.wait_ready()
        await until_state(first, "connected")
        state = (await readyz(first))["components"]["telegram"]
        assert state["mode"] == "polling" and state["healthy"] and TOKEN not in json.dumps(state)
        a = await tg.push({"message": photo(tg, 11, "a")})
        await wait_for(lambda: closed(first, "42:11"), "answer to a", first)
        first.kill9()
        # A crash before the confirming getUpdates leaves a with Telegram: it would come again.
        if all(u["update_id"] != a["update_id"] for u in tg.updates):
            tg.updates.insert(0, a)
        await tg.push({"message": photo(tg, 12, "b")})
        second.start()
        await second.wait_ready()
        await wait_for(lambda: closed(second, "42:12"), "answer to b", second)
        assert len(tg.replies_to(42, 11)) == 1 and len(tg.replies_to(42, 12)) == 1
        sent_offsets = [p.get("offset") for m, p in tg.calls if m == "getUpdates"]
        assert a["update_id"] + 1 in sent_offsets  # the second process started past a
        assert a["update_id"] not in handled(second)  # a was neither re-fetched nor re-answered
        assert TOKEN not in first.log() + second.log()
        assert await second.terminate() == 0
    finally:
        first.ensure_dead()
        second.ensure_dead()


async def test_kill_9_after_recording_before_answering_is_answered_once_after_restart(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    args = bridge_args(tg, tmp_path / "b.db")
    first = BridgeProcess(tmp_path / "first.log", *args, "--max-new-tokens", "64").start()
    second = BridgeProcess(tmp_path / "second.log", *args)
    try:
        await first.wait_ready()
        tg.gates["sendMessage"] = gate = asyncio.Event()  # the reply is held: not yet posted
        await tg.push({"message": photo(tg, 21, "c")})
        await wait_for(lambda: "sendMessage" in tg.methods(), "the reply attempt", first)
        first.kill9()
        del tg.gates["sendMessage"]
        gate.set()
        second.start()
        await second.wait_ready()
        await wait_for(lambda: closed(second, "42:21"), "recovered answer", second)
        assert len(tg.replies_to(42, 21)) == 1
        assert TOKEN not in first.log() + second.log()
        assert await second.terminate() == 0
    finally:
        first.ensure_dead()
        second.ensure_dead()


async def test_webhook_checks_the_secret_and_answers_an_addressed_message(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    bridge = BridgeProcess(
        tmp_path / "b.log", *bridge_args(tg, tmp_path / "b.db", mode="webhook")
    ).start()
    try:
        await bridge.wait_ready()
        url = bridge.base + "/webhooks/telegram"
        await until_state(bridge, "listening")
        state = (await readyz(bridge))["components"]["telegram"]
        assert state["mode"] == "webhook" and state["healthy"]
        update = {"update_id": 900, "message": photo(tg, 31, "w")}
        assert (await tg.post_webhook(url, update, None))[0] == 401
        assert (await tg.post_webhook(url, update, "wrong"))[0] == 401
        assert (await tg.post_webhook(url, update, SECRET, raw=b"{oops"))[0] == 400
        assert tg.sent == [] and "getFile" not in tg.methods()
        group = {"update_id": 901, "message": message(1, chat_id=-9, chat_type="group", text="x")}
        assert (await tg.post_webhook(url, group, SECRET))[0] == 200
        async with websockets.connect(bridge.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "client-token"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "topic": "chat:telegram:42"}))
            assert (await recv_frame(ws))["type"] == "subscribed"
            for _ in range(3):  # Telegram re-delivers: answered once
                status, body = await tg.post_webhook(url, update, SECRET)
                assert status == 200 and body == {"ok": True}
            done: dict[str, Any] = {}
            while done.get("kind") not in ("done", "error"):
                done = await recv_frame(ws, 60 * UNIT)
            assert done["kind"] == "done" and done["id"] == "telegram:42:31"
        await wait_for(lambda: closed(bridge, "42:31"), "answer", bridge)
        shown = tg.replies_to(42, 31)[0].text
        assert shown == (done["text"] if done["text"].strip() else "…")
        assert len(tg.replies_to(42, 31)) == 1 and tg.replies_to(-9, 1) == []
        async with aiohttp.ClientSession() as http, http.get(bridge.base + "/metrics") as resp:
            metrics = await resp.text()
        assert 'bridge_im_events_total{outcome="accepted",platform="telegram"} 1.0' in metrics
        assert 'bridge_im_events_total{outcome="duplicate",platform="telegram"} 2.0' in metrics
        assert TOKEN not in bridge.log() and SECRET not in bridge.log()
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()

"""Chat topics are granted per client token: ``forbidden`` and nothing of the topic without one."""

from __future__ import annotations

import json

from engine.types import Delta
from tests.hub.conftest import ADMIN, TOKEN, StartHub, recv

OTHER = "token-2"


async def test_subscribe_needs_a_matching_grant(start_hub: StartHub) -> None:
    run = await start_hub(
        tokens=frozenset({TOKEN, OTHER}), topic_grants=((TOKEN, "chat:feishu:oc_a*"),)
    )
    granted, _ = await run.hello()
    other, _ = await run.hello(token=OTHER)
    admin, _ = await run.hello(token=ADMIN)
    for ws, topic, answer in (
        (granted, "chat:feishu:oc_abc", "subscribed"),
        (granted, "chat:feishu:oc_b", "error"),
        (other, "chat:feishu:oc_abc", "error"),
        (admin, "chat:feishu:oc_abc", "subscribed"),
    ):
        await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
        frame = await recv(ws, "subscribed", "error")
        assert frame["type"] == answer, (topic, frame)
        if answer == "error":
            assert frame["code"] == "forbidden"
            assert TOKEN not in frame["message"] and OTHER not in frame["message"]
    await run.hub.publish("chat:feishu:oc_b", "j1", Delta("secret b"))
    await run.hub.publish("chat:feishu:oc_abc", "j2", Delta("for a"))
    assert (await recv(granted, "event"))["text"] == "for a"
    assert (await recv(admin, "event"))["text"] == "for a"
    # The refused session got nothing of either topic: its next frame is the answer to a ping.
    await other.send(json.dumps({"type": "ping"}))
    assert (await recv(other))["type"] == "pong"
    assert run.hub._registry.members("chat:feishu:oc_b") is None


async def test_a_restored_session_loses_topics_no_longer_granted(start_hub: StartHub) -> None:
    first = await start_hub(topic_grants=((TOKEN, "chat:*"),))
    ws, welcome = await first.hello()
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:oc_1"}))
    await recv(ws, "subscribed")
    await ws.close()
    await first.hub.shutdown(grace_s=0.1)
    second = await start_hub(store=first.store, topic_grants=((TOKEN, "chat:slack:*"),))
    ws2, again = await second.hello(session=welcome["session"], last_seq=0)
    assert again["resumed"] is True
    await second.hub.publish("chat:feishu:oc_1", "j", Delta("revoked"))
    await ws2.send(json.dumps({"type": "ping"}))
    assert (await recv(ws2))["type"] == "pong"

"""The first heartbeat goes out right after ``welcome``: RTT and last pong are known at once.

With the default 45 s heartbeat the dashboard used to read "never" for a connection's first
45 s; here the interval is a minute, so only the ping sent right after the welcome can fill them.
"""

from __future__ import annotations

import json

from bridge.dashboard.source import connection_row
from tests.hub.conftest import StartHub, eventually, recv


async def test_rtt_and_last_pong_are_known_one_round_trip_after_welcome(
    start_hub: StartHub,
) -> None:
    run = await start_hub(heartbeat_s=60.0, heartbeat_timeout_s=30.0)
    ws, welcome = await run.hello()  # the welcome comes first, the ping right after it
    assert welcome["heartbeat"] == 60.0
    [info] = run.hub.connections()
    assert info.rtt_ms is None and info.last_pong_at is None
    ping = await recv(ws, "ping", within=10.0)  # a whole interval early
    await ws.send(json.dumps({"type": "pong", "ts": ping["ts"]}))
    await eventually(lambda: run.hub.connections()[0].rtt_ms is not None, within=10.0)
    row = connection_row(run.hub.connections()[0])
    assert row["last_pong_at"] is not None and 0 <= row["rtt_ms"] < 10_000
    registry = run.metrics.registry
    assert registry.get_sample_value("bridge_ws_heartbeat_rtt_seconds_count") == 1


async def test_a_resumed_session_gets_its_first_ping_after_the_replay(start_hub: StartHub) -> None:
    run = await start_hub(heartbeat_s=60.0, heartbeat_timeout_s=30.0)
    ws, welcome = await run.hello()
    ping = await recv(ws, "ping", within=10.0)
    await ws.send(json.dumps({"type": "pong", "ts": ping["ts"]}))
    await ws.close()
    again, resumed = await run.hello(session=welcome["session"], last_seq=0)
    assert resumed["resumed"] is True
    frame = await recv(again, "ping", "event", within=10.0)  # nothing missed: the ping is next
    assert frame["type"] == "ping"

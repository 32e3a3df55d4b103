"""The reference client drops a second terminal event for a job (after a crash window)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import websockets

from bridge.client import HubClient


def event(seq: int, job: str, kind: str, **extra: Any) -> str:
    return json.dumps({"type": "event", "seq": seq, "id": job, "kind": kind, **extra})


async def test_a_second_terminal_event_for_an_ended_job_is_dropped() -> None:
    """A job ended just before its node died may be ended again on resume: the first one stands.

    A scripted server: ``done`` for job-1, then (as after a crash whose store had not seen that
    end) an ``internal`` error for job-1, then job-2's events. The application sees job-1's
    ``done`` once, nothing of the second terminal, and job-2 in order; seqs still advance.
    """

    async def script(ws: Any) -> None:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        await ws.send(json.dumps({"type": "welcome", "session": "s1", "resumed": False}))
        await ws.send(event(1, "job-1", "delta", text="a"))
        await ws.send(event(2, "job-1", "done", text="a", cached=False))
        await ws.send(event(3, "job-1", "error", code="internal", message="node stopped"))
        await ws.send(event(4, "job-2", "delta", text="b"))
        await ws.send(event(5, "job-2", "error", code="cancelled", message="cancelled"))
        await ws.wait_closed()

    async with websockets.serve(script, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = HubClient(f"ws://127.0.0.1:{port}", "t", rng=random.Random(1))
        async with client:
            seen: list[tuple[int, str, str]] = []
            async with asyncio.timeout(10):
                async for frame in client.frames():
                    seen.append((frame["seq"], frame["id"], frame["kind"]))
                    if frame["id"] == "job-2" and frame["kind"] == "error":
                        break
            assert seen == [
                (1, "job-1", "delta"),
                (2, "job-1", "done"),
                (4, "job-2", "delta"),
                (5, "job-2", "error"),
            ]
            assert client.second_terminals == 1 and client.last_seq == 5

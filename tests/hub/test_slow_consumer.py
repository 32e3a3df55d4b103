"""A client that never reads is closed with 4003 by the byte rule, whatever the kernel absorbs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.hub import protocol as p
from engine.types import Delta, Done, EngineStatus, JobEvent, JobRequest, Queued, Started, Usage
from tests.hub.conftest import TOKEN, StartHub, eventually
from tests.hub.rawws import RawClient

DELTA_CHARS = 256 * 1024


def kernel_buffer_max() -> int:
    """The most bytes the two ends' socket buffers can hold on loopback (send + receive)."""
    total = 0
    for name in ("ipv4/tcp_wmem", "ipv4/tcp_rmem"):
        total += int(Path(f"/proc/sys/net/{name}").read_text().split()[2])
    for name in ("core/wmem_max", "core/rmem_max"):
        total += int(Path(f"/proc/sys/net/{name}").read_text())
    return total


@dataclass
class FloodHandle:
    job_id: str
    deltas: int
    cancelled: bool = False

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(position=0)
        yield Started()
        for _ in range(self.deltas):
            if self.cancelled:
                return
            yield Delta("x" * DELTA_CHARS)
            await asyncio.sleep(0)
        yield Done(text="x", usage=Usage(prompt_tokens=1, completion_tokens=self.deltas))

    def cancel(self) -> None:
        self.cancelled = True


class FloodEngine:
    """Each job streams ``deltas`` deltas of 256 KiB."""

    def __init__(self, deltas: int) -> None:
        self.deltas = deltas

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        return None

    def submit(self, request: JobRequest) -> FloodHandle:
        return FloodHandle(request.job_id, self.deltas)

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=True, model="flood", dtype="none", workers=(), queue_depth=0, queue_capacity=8
        )


def port(run: Any) -> int:
    assert run.server.port is not None
    return int(run.server.port)


async def test_a_client_that_never_reads_is_closed_with_4003(start_hub: StartHub) -> None:
    limit = 1 * 2**20
    output = 2 * kernel_buffer_max() + 8 * limit  # more than every buffer on the way can hold
    deltas = output // DELTA_CHARS + 1
    run = await start_hub(
        engine=FloodEngine(deltas),
        send_buffer_max_bytes=limit,
        # Neither the heartbeat nor the stalled-write timer may be what closes it.
        heartbeat_s=3600.0,
        heartbeat_timeout_s=3600.0,
        send_timeout_s=3600.0,
        replay_max_bytes=2 * 2**20,
    )
    client = await RawClient.connect("127.0.0.1", port(run), rcvbuf=64 * 1024)
    await client.send_json({"type": "hello", "token": TOKEN})
    await client.recv_json("welcome")
    await client.send_json({"type": "submit", "id": "big", "prompt": "p", "image": "AAAA"})
    # From here on the client reads nothing until the server has decided.
    conn = next(iter(run.hub._conns.values()))
    await eventually(lambda: conn.core.close_code is not None, within=60.0)
    assert conn.core.close_code == p.CLOSE_SLOW_CONSUMER
    # What the process still holds for it is bounded by the rule, not by the job's output.
    assert conn.pending_bytes() <= limit + DELTA_CHARS + 64 * 1024
    code, read = await asyncio.wait_for(client.read_until_close(), 60.0)
    assert code == p.CLOSE_SLOW_CONSUMER
    assert read < output / 2, (read, output)
    await eventually(lambda: not run.hub.connections())
    assert run.metrics.ws_closes.labels(code="4003")._value.get() == 1
    client.close()


async def test_a_reading_client_gets_the_same_output_whole(start_hub: StartHub) -> None:
    """The control: the same flood to a client that reads is delivered, not cut off."""
    limit = 1 * 2**20
    deltas = (4 * limit) // DELTA_CHARS
    run = await start_hub(engine=FloodEngine(deltas), send_buffer_max_bytes=limit)
    client = await RawClient.connect("127.0.0.1", port(run))
    await client.send_json({"type": "hello", "token": TOKEN})
    await client.recv_json("welcome")
    await client.send_json({"type": "submit", "id": "big", "prompt": "p", "image": "AAAA"})
    got = 0
    while True:
        event = await asyncio.wait_for(client.recv_json("event"), 30.0)
        if event["kind"] == "delta":
            got += 1
        if event["kind"] == "done":
            break
    assert got == deltas
    client.close()

"""The inbound-bytes budget: the frame gate's parsing (property tests) and the hub's busy answer."""

from __future__ import annotations

import base64
import itertools
import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.hub.frame_gate import SMALL_FRAME_BYTES, FrameGate, Refused
from bridge.hub.inflight import InflightBudget
from tests.hub.conftest import TOKEN, StartHub, eventually
from tests.hub.rawws import CONTINUATION, PING, TEXT, RawClient, frame


class Recorder:
    """Stands in for aiohttp's parser: keeps every byte the gate lets through."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        return None


def feed_split(gate: FrameGate, stream: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        gate.feed_data(stream[a:b])


def submit_text(job_id: str, size: int) -> bytes:
    body = {"type": "submit", "id": job_id, "prompt": "p", "image": "A" * size}
    return json.dumps(body).encode()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 2_000_000), max_size=12),
    limit=st.integers(1, 400_000),
)
def test_gate_passes_exactly_the_admitted_frames(
    sizes: list[int], cuts: list[int], limit: int
) -> None:
    """Whatever the read boundaries, aiohttp gets the admitted frames byte for byte, in order,
    and every other data frame is one refusal carrying its job id."""
    budget = InflightBudget(limit)
    inner = Recorder()
    gate = FrameGate(inner, budget, max_frame_bytes=16 * 2**20)
    refused: list[Refused] = []
    gate.attach(refused.append)
    items: list[tuple[bytes, int, str | None]] = [
        (submit_text(f"j{i}", size), TEXT, f"j{i}") for i, size in enumerate(sizes)
    ]
    items.insert(1, (b"hi", PING, None))  # control frames always pass, never reserved
    frames = [frame(payload, opcode) for payload, opcode, _ in items]
    expected = bytearray()
    expected_refused = []
    used = 0
    for (payload, opcode, job_id), data in zip(items, frames, strict=True):
        declared = len(payload)
        if opcode == PING:
            expected += data
        elif declared <= SMALL_FRAME_BYTES or used + declared <= limit:
            expected += data
            used += declared
        else:
            expected_refused.append(job_id)
    feed_split(gate, b"".join(frames), cuts)
    assert bytes(inner.data) == bytes(expected)
    assert [r.job_id for r in refused] == expected_refused
    assert budget.used == used
    for _ in range(len(gate.reserved)):
        gate.done()
    assert budget.used == 0


def test_a_fragmented_message_cut_over_budget_ends_as_bad_json_and_is_refused() -> None:
    budget = InflightBudget(200_000)
    inner = Recorder()
    gate = FrameGate(inner, budget, max_frame_bytes=16 * 2**20)
    refused: list[Refused] = []
    gate.attach(refused.append)
    text = submit_text("frag", 300_000)
    first = frame(text[:150_000], TEXT, fin=False)
    rest = frame(text[150_000:], CONTINUATION, fin=True)
    gate.feed_data(first + rest)
    # aiohttp got the first fragment and a final one-byte NUL continuation, nothing of the rest.
    assert bytes(inner.data) == first + b"\x80\x81\x00\x00\x00\x00\x00"
    assert refused == [Refused(declared=len(text) - 150_000, job_id=None, kind=None)]
    gate.done()
    assert budget.used == 0


def test_the_id_is_found_after_the_image_too() -> None:
    budget = InflightBudget(100_000)
    gate = FrameGate(Recorder(), budget, max_frame_bytes=16 * 2**20)
    refused: list[Refused] = []
    gate.attach(refused.append)
    body = '{"type":"submit","prompt":"say \\"id\\":\\"no\\"","image":"' + "A" * 200_000
    body += '","id":"late-id"}'
    data = frame(body.encode())
    for i in range(0, len(data), 7_777):
        gate.feed_data(data[i : i + 7_777])
    assert refused == [Refused(declared=len(body), job_id="late-id", kind="submit")]
    assert budget.used == 0 and budget.refused == 1


# --- the hub, on a real socket --------------------------------------------------------------


def image_b64(size: int) -> str:
    return base64.b64encode(random.Random(size).randbytes(size)).decode()


async def hello(run: Any) -> RawClient:
    client = await RawClient.connect("127.0.0.1", run.server.port)
    await client.send_json({"type": "hello", "token": TOKEN})
    await client.recv_json("welcome")
    return client


async def test_over_budget_submit_gets_busy_and_the_retry_succeeds(start_hub: StartHub) -> None:
    """A large submit while the budget is taken (by a frame still arriving: it is reserved at
    its header) is dropped unread and answered ``busy`` with ``retry_after``; the frame in
    progress is unharmed, and the refused submit later runs."""
    run = await start_hub(max_inflight_bytes=2 * 2**20, heartbeat_s=60.0, heartbeat_timeout_s=60.0)
    first, second = await hello(run), await hello(run)
    image = image_b64(900_000)  # 1.2 MB of base64
    body = json.dumps({"type": "submit", "id": "a", "prompt": "p", "image": image}).encode()
    data = frame(body)
    await first.send_raw(data[: len(data) // 2])
    await eventually(lambda: run.hub.inflight.used == len(body))
    await second.send_json({"type": "submit", "id": "b", "prompt": "p", "image": image})
    busy = await second.recv_json("error")
    assert busy["code"] == "busy" and busy["id"] == "b" and busy["retry_after"] > 0
    assert run.engine.requests == []
    assert run.metrics.ws_inflight_refused._value.get() == 1
    await first.send_raw(data[len(data) // 2 :])
    done = await first.recv_json("event")
    while done["kind"] != "done":
        done = await first.recv_json("event")
    assert run.engine.requests[0].image == base64.b64decode(image)
    await eventually(lambda: run.hub.inflight.used == 0)
    await second.send_json({"type": "submit", "id": "b", "prompt": "p", "image": image})
    kinds = [(await second.recv_json("event"))["kind"] for _ in range(2)]
    assert kinds == ["queued", "started"]
    assert run.engine.requests[-1].image == base64.b64decode(image)
    # Small frames are never refused: the connection works as before.
    await second.send_json({"type": "ping"})
    assert (await second.recv_json("pong"))["type"] == "pong"
    first.close()
    second.close()


async def test_bytes_are_released_when_a_connection_drops_mid_frame(start_hub: StartHub) -> None:
    run = await start_hub(max_inflight_bytes=4 * 2**20)
    client = await hello(run)
    data = frame(submit_text("x", 1_000_000))
    await client.send_raw(data[: len(data) // 2])
    await eventually(lambda: run.hub.inflight.used >= 1_000_000)
    client.close()
    await eventually(lambda: run.hub.inflight.used == 0 and not run.hub.connections())

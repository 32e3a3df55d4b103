"""The coalescing helper with a fake clock: newest text wins, one send per interval, in order."""

from __future__ import annotations

import asyncio
import itertools

from adapters.pacing import Coalescer


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
        await asyncio.sleep(0)


async def test_updates_are_coalesced_and_paced() -> None:
    t = FakeTime()
    sent: list[tuple[float, str]] = []

    async def send(text: str) -> None:
        sent.append((t.now, text))

    c = Coalescer(send, interval_s=0.5, name="t", monotonic=t.monotonic, sleep=t.sleep)
    for i in range(1, 6):
        c.offer("x" * i)  # five texts before the task even runs
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    c.offer("x" * 6)
    for _ in range(20):
        await asyncio.sleep(0)
    await c.drain()
    await send("final")  # the caller's final send, after drain's pause
    texts = [s for _, s in sent]
    assert texts == ["x" * 5, "x" * 6, "final"]  # x1..x4 were coalesced away
    times = [at for at, _ in sent]
    assert all(b - a >= 0.5 for a, b in itertools.pairwise(times))


async def test_a_failing_send_is_counted_and_the_stream_goes_on() -> None:
    t = FakeTime()
    calls: list[str] = []

    async def send(text: str) -> None:
        calls.append(text)
        if len(calls) == 1:
            raise RuntimeError("429")

    c = Coalescer(send, interval_s=0.1, name="t", monotonic=t.monotonic, sleep=t.sleep)
    c.offer("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    c.offer("ab")
    for _ in range(20):
        await asyncio.sleep(0)
    await c.drain()
    assert calls == ["a", "ab"] and c.errors == 1 and c.sends == 1
    c.offer("late")  # closed: ignored
    await asyncio.sleep(0)
    assert calls == ["a", "ab"]

"""Pacer and Coalescer on a fake clock: per-key spacing, holds, newest-text-wins, final last."""

from __future__ import annotations

import asyncio
import itertools

from adapters.pacing import Coalescer, Pacer


class FakeClock:
    """Monotonic time that moves only when a sleeper sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_pacer_spaces_each_key_and_keys_are_independent() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock, sleep=clock.sleep)
    starts = []
    for _ in range(3):
        await pacer.wait("a")
        starts.append(clock.now)
    assert starts == [100.0, 101.0, 102.0]
    await pacer.wait("b")  # another chat: no wait
    assert clock.now == 102.0
    pacer.hold("b", 5.0)
    await pacer.wait("b")
    assert clock.now == 107.0


async def test_concurrent_waiters_on_one_key_get_distinct_slots() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock, sleep=clock.sleep)
    await asyncio.gather(*(pacer.wait("c") for _ in range(3)))
    assert len(clock.sleeps) == 2 and clock.now == 102.0  # slots 100, 101, 102


async def test_coalescer_skips_intermediate_texts_and_sends_the_final_last() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock, sleep=clock.sleep)
    sent: list[tuple[float, str]] = []
    gate = asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()
        sent.append((clock.now, text))

    co = Coalescer(send, lambda: pacer.wait("k"), name="t")
    co.offer("a")
    await asyncio.sleep(0)
    for text in ("ab", "abc", "abcd"):
        co.offer(text)
    gate.set()
    for _ in range(100):  # let the flusher catch up with the newest text
        if len(sent) == 2:
            break
        await asyncio.sleep(0)
    await co.close("abcde")
    assert [t for _, t in sent] == ["a", "abcd", "abcde"]
    times = [t for t, _ in sent]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    co.offer("late")  # after close: ignored
    await asyncio.sleep(0)
    assert len(sent) == 3


async def test_a_failed_streaming_send_is_not_retried_but_the_final_is_sent() -> None:
    clock = FakeClock()
    pacer = Pacer(0.5, monotonic=clock, sleep=clock.sleep)
    calls: list[str] = []

    async def send(text: str) -> None:
        calls.append(text)
        if text == "bad":
            raise RuntimeError("boom")

    co = Coalescer(send, lambda: pacer.wait("k"), name="t")
    co.offer("bad")
    await asyncio.sleep(0.01)
    await co.close("good")
    assert calls == ["bad", "good"] and co.errors == 1 and co.sends == 1

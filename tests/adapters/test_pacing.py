"""The shared edit coalescer under a fake clock: newest text wins, one send per interval."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from adapters.pacing import Coalescer, Pacer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_updates_are_coalesced_and_paced() -> None:
    clock = FakeClock()
    sent: list[tuple[float, str]] = []

    async def send(text: str) -> None:
        sent.append((clock.now, text))

    edits = Coalescer(send, interval_s=1.0, name="t", monotonic=clock.monotonic, sleep=clock.sleep)
    edits.offer("a")
    await asyncio.sleep(0)
    for text in ("ab", "abc", "abcd"):
        edits.offer(text)
    for _ in range(20):
        if len(sent) == 2:
            break
        await asyncio.sleep(0)
    await edits.close("abcde")
    assert [t for _, t in sent] == ["a", "abcd", "abcde"]
    times = [at for at, _ in sent]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    edits.offer("late")
    await asyncio.sleep(0)
    assert len(sent) == 3 and edits.sends == 3


async def test_the_final_text_supersedes_a_pending_edit() -> None:
    clock = FakeClock()
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    edits = Coalescer(send, interval_s=1.0, name="t", monotonic=clock.monotonic, sleep=clock.sleep)
    edits.offer("a")
    await asyncio.sleep(0)
    edits.offer("ab")
    await edits.close("final")
    assert sent == ["a", "final"] and clock.sleeps and clock.sleeps[-1] >= 1.0 - 1e-9


async def test_a_failed_intermediate_edit_is_skipped_and_the_final_one_raises() -> None:
    clock = FakeClock()
    calls: list[str] = []

    async def send(text: str) -> None:
        calls.append(text)
        raise RuntimeError("boom")

    edits = Coalescer(send, interval_s=0.5, name="t", monotonic=clock.monotonic, sleep=clock.sleep)
    edits.offer("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await edits.close("final")
    assert calls == ["a", "final"] and edits.errors == 1


async def test_cancel_stops_the_pending_edit() -> None:
    clock = FakeClock()
    gate = asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()

    edits = Coalescer(send, interval_s=1.0, name="t", monotonic=clock.monotonic, sleep=clock.sleep)
    edits.offer("a")
    await asyncio.sleep(0)
    await edits.cancel()
    assert edits.closed and edits.sends == 0


async def test_drain_then_a_final_send_of_the_caller_keeps_the_pace() -> None:
    t = FakeClock()
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
    t = FakeClock()
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


async def test_pacer_spaces_each_key_and_keys_are_independent() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock.monotonic, sleep=clock.sleep)
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


async def test_a_late_wake_up_pushes_the_next_slot_past_the_real_start() -> None:
    clock = FakeClock()

    async def oversleep(seconds: float) -> None:
        late = 0.05 if not clock.sleeps else 0.0  # the loop was busy once: woken 50 ms late
        await clock.sleep(seconds + late)

    pacer = Pacer(1.0, monotonic=clock.monotonic, sleep=oversleep)
    starts = []
    for _ in range(3):
        await pacer.wait("a")
        starts.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 1.0 for gap in gaps), starts


async def test_concurrent_waiters_on_one_key_get_distinct_slots() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock.monotonic, sleep=clock.sleep)
    await asyncio.gather(*(pacer.wait("c") for _ in range(3)))
    assert len(clock.sleeps) == 2 and clock.now == 102.0  # slots 100, 101, 102


async def test_coalescer_skips_intermediate_texts_and_sends_the_final_last() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, monotonic=clock.monotonic, sleep=clock.sleep)
    sent: list[tuple[float, str]] = []
    gate = asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()
        sent.append((clock.now, text))

    co = Coalescer(send, pace=lambda: pacer.wait("k"), name="t")
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
    pacer = Pacer(0.5, monotonic=clock.monotonic, sleep=clock.sleep)
    calls: list[str] = []

    async def send(text: str) -> None:
        calls.append(text)
        if text == "bad":
            raise RuntimeError("boom")

    co = Coalescer(send, pace=lambda: pacer.wait("k"), name="t")
    co.offer("bad")
    await asyncio.sleep(0.01)
    await co.close("good")
    assert calls == ["bad", "good"] and co.errors == 1 and co.sends == 1

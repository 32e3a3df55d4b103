"""The shared edit coalescer under a fake clock: newest text wins, one send per interval."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from adapters.pacing import Coalescer


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

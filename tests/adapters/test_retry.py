"""The one retry policy: Backoff shapes, stated waits honoured in full, the tenacity call loop."""

from __future__ import annotations

import random

import pytest

from adapters.retry import Backoff, Retryable, TooLongWait, call_with_retries
from bridge.store.backoff import Backoff as BridgeBackoff


def test_the_bridge_re_exports_the_one_backoff() -> None:
    assert BridgeBackoff is Backoff


def test_around_doubles_caps_and_resets() -> None:
    b = Backoff(0.1, 1.0, 0.2, random.Random(3).random)
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        base = min(1.0, 0.1 * 2**n)
        assert base * 0.8 <= d <= min(1.0, base * 1.2)
    assert b.failures == 8
    b.reset()
    assert b.failures == 0 and b.next_delay() <= 0.12


@pytest.mark.parametrize(
    ("spread", "low", "high"), [("below", 0.5, 1.0), ("above", 1.0, 1.5), ("around", 0.5, 1.5)]
)
def test_each_spread_stays_in_its_band(spread: str, low: float, high: float) -> None:
    b = Backoff(1.0, 8.0, 0.5, random.Random(5).random, spread=spread)  # type: ignore[arg-type]
    for failures in range(10):
        base = min(8.0, 2.0**failures)
        waits = [b.delay(failures) for _ in range(50)]
        assert all(base * low <= w <= base * high for w in waits)
        assert max(waits) - min(waits) > 0.1 * base  # jittered, not lock-step
        if spread != "above":
            assert max(waits) <= 8.0


def test_a_stated_wait_is_never_shortened() -> None:
    b = Backoff(0.1, 1.0)
    assert b.next_delay(at_least=7.0) == 7.0
    assert b.next_delay(at_least=0.0) <= 0.24


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(0.1, 1.0, jitter=1.5)


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_calls_retry_with_backoff_then_honour_stated_waits() -> None:
    sleeps = Sleeps()
    outcomes: list[Exception | None] = [Retryable("5xx"), Retryable("429", wait_s=3.0), None]

    async def call() -> str:
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc
        return "ok"

    result = await call_with_retries(
        call, attempts=3, base_s=1.0, cap_s=8.0, rng=random.Random(1), sleep=sleeps, event="t"
    )
    assert result == "ok"
    assert 0.5 <= sleeps.waits[0] <= 1.0 and sleeps.waits[1] == 3.0


async def test_a_wait_over_the_maximum_fails_at_once() -> None:
    sleeps = Sleeps()
    tries = 0

    async def call() -> None:
        nonlocal tries
        tries += 1
        raise Retryable("rate limited", wait_s=120.0)

    with pytest.raises(TooLongWait, match="120"):
        await call_with_retries(call, attempts=5, sleep=sleeps, event="t", max_wait_s=60.0)
    assert tries == 1 and sleeps.waits == []


async def test_an_injected_backoff_drives_the_waits_and_tries_run_out() -> None:
    sleeps = Sleeps()

    async def call() -> None:
        raise Retryable("down")

    backoff = Backoff(0.25, 0.25, 0.0)
    with pytest.raises(Retryable, match="down"):
        await call_with_retries(call, attempts=3, sleep=sleeps, event="t", backoff=backoff)
    assert sleeps.waits == [0.25, 0.25]

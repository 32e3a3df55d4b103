"""The answer cache's shared tier as the engine uses it: looked up after the local LRU, filled by
finished jobs, and failing open (slow or broken = a miss, the job still runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from engine import Engine, JobRequest
from engine.cache import CachedAnswer
from engine.shared_cache import SharedAnswerCache
from engine.types import Done
from tests.engine.conftest import collect, image, make_config


class DictShared:
    """A shared tier in a dict, optionally slow or broken on ``get``."""

    def __init__(self, mode: str = "ok") -> None:
        self.items: dict[str, CachedAnswer] = {}
        self.mode = mode
        self.gets = 0
        self.puts = 0
        self.never = asyncio.Event()

    async def get(self, key: str) -> CachedAnswer | None:
        self.gets += 1
        if self.mode == "hang":
            await self.never.wait()
        if self.mode == "raise":
            raise ConnectionError("redis is gone")
        return self.items.get(key)

    async def put(self, key: str, answer: CachedAnswer) -> None:
        self.puts += 1
        if self.mode == "raise":
            raise ConnectionError("redis is gone")
        self.items[key] = answer


class Lookups:
    """An engine observer that only counts cache lookups by tier."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, bool], int] = {}

    def on_batch(self, size: int) -> None:
        pass

    def on_job_end(self, outcome: str, completion_tokens: int, seconds: float) -> None:
        pass

    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch_isolated(self, stage: str, jobs: int) -> None:
        pass

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        self.counts[(tier, hit)] = self.counts.get((tier, hit), 0) + 1

    def on_vision_cache_lookup(self, hit: bool) -> None:
        pass

    def on_vision_cache_bytes(self, size: int) -> None:
        pass


Builder = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def build(tiny_path: Path) -> AsyncIterator[Builder]:
    engines: list[Engine] = []

    async def factory(
        shared: SharedAnswerCache | None, observer: Lookups | None = None, **overrides: object
    ) -> Engine:
        engine = Engine(make_config(tiny_path, **overrides), observer, shared_cache=shared)
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop(grace_s=1.0)


def ask(n: int = 0) -> JobRequest:
    return JobRequest(f"job-{n}", image("chelsea.jpg"), "what animal is this?", max_tokens=8)


async def answer_of(engine: Engine, n: int = 0) -> Done:
    events = await collect(engine.submit(ask(n)))
    done = events[-1]
    assert isinstance(done, Done), events
    return done


async def poll(check: Callable[[], bool], within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


async def test_a_question_answered_on_one_engine_is_cached_on_another(build: Builder) -> None:
    shared = DictShared()
    seen_a, seen_b = Lookups(), Lookups()
    a = await build(shared, seen_a)
    b = await build(shared, seen_b)
    first = await answer_of(a)
    assert not first.cached
    await poll(lambda: shared.puts == 1)  # the write to the shared tier is asynchronous
    on_b = await answer_of(b, 1)
    assert on_b.cached and on_b.text == first.text and on_b.usage == first.usage
    assert seen_b.counts == {("local", False): 1, ("shared", True): 1}
    assert b.answers.counts[("shared", True)] == 1
    again = await answer_of(b, 2)  # now in B's local LRU: the shared tier is not asked
    assert again.cached and shared.gets == 2
    assert seen_b.counts[("local", True)] == 1
    assert seen_a.counts == {("local", False): 1, ("shared", False): 1}


@pytest.mark.parametrize("mode", ["hang", "raise"])
async def test_a_slow_or_broken_shared_tier_is_a_miss(build: Builder, mode: str) -> None:
    shared = DictShared(mode)
    seen = Lookups()
    engine = await build(shared, seen, shared_cache_timeout_s=0.2)
    done = await answer_of(engine)
    assert not done.cached and done.text
    assert seen.counts[("shared", False)] == 1
    # The local tier still works and answers the repeat without asking the shared one.
    again = await answer_of(engine, 1)
    assert again.cached and shared.gets == 1


async def test_without_a_shared_tier_only_the_local_one_is_asked(build: Builder) -> None:
    seen = Lookups()
    engine = await build(None, seen)
    await answer_of(engine)
    assert (await answer_of(engine, 1)).cached
    assert seen.counts == {("local", False): 1, ("local", True): 1}


async def test_a_disabled_cache_asks_no_tier(build: Builder) -> None:
    shared = DictShared()
    seen = Lookups()
    engine = await build(shared, seen, cache_ttl_s=0)
    await answer_of(engine)
    assert not (await answer_of(engine, 1)).cached
    assert seen.counts == {} and shared.gets == 0 and shared.puts == 0

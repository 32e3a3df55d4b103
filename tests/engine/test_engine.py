"""The engine end to end on the tiny CPU model: streaming, batching, limits and bad input."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from engine import BusyError, Engine, EngineError, JobRequest
from engine.types import Delta, Done, Failed, Queued, Started
from tests.engine.conftest import BAD, WAIT, collect, image

Factory = Callable[..., Coroutine[Any, Any, Engine]]
PROMPTS = ["Describe the image.", "What is in this picture?", "Hi", "Tell me a story."]
PHOTOS = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg"]


@pytest.fixture(params=["static", "continuous"])
def batching(request: pytest.FixtureRequest) -> str:
    """Every engine test runs under both batching modes."""
    return str(request.param)


def request(i: int, **kw: Any) -> JobRequest:
    """A job over the sample photos and prompts, varied by ``i``."""
    return JobRequest(
        job_id=f"j{i}",
        image=image(PHOTOS[i % len(PHOTOS)]),
        prompt=PROMPTS[i % len(PROMPTS)] + f" #{i}",
        **kw,
    )


def blocker(gate: threading.Event) -> Callable[[int], None]:
    """A fault hook that holds the worker before generate until ``gate`` opens."""

    def hook(size: int) -> None:
        gate.wait(WAIT)

    return hook


async def run_all(engine: Engine, reqs: list[JobRequest]) -> list[list[Any]]:
    handles = [engine.submit(r) for r in reqs]
    return list(await asyncio.gather(*(collect(h) for h in handles)))


def final(events: list[Any]) -> Done:
    last = events[-1]
    assert isinstance(last, Done), last
    return last


async def test_events_in_order_and_deltas_add_up(make_engine: Factory) -> None:
    engine = await make_engine()
    assert engine.status().ready
    results = await run_all(engine, [request(i, max_tokens=16) for i in range(6)])
    for events in results:
        assert isinstance(events[0], Queued)
        assert isinstance(events[1], Started)
        assert all(isinstance(e, Delta) for e in events[2:-1])
        done = final(events)
        assert "".join(e.text for e in events[2:-1]) == done.text
        assert 1 <= done.usage.completion_tokens <= 16
        assert done.usage.prompt_tokens > 0
        assert not done.cached
        assert sum(isinstance(e, Done | Failed) for e in events) == 1


async def test_batches_really_form(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=8, batch_wait_ms=2000, cache_ttl_s=0)
    seen: list[int] = []
    engine.workers[0].replica.fault_hook = seen.append
    await run_all(engine, [request(i, max_tokens=4) for i in range(8)])
    assert seen == [8]  # all eight joined one batch without waiting the full 2 s
    assert engine.status().batch_sizes == {8: 1}
    # The batch's figures are recorded when generate returns, just after the last Done.
    await _until(lambda: engine.live_rows_per_step > 0)
    assert 1.0 < engine.live_rows_per_step <= 8.0  # decode really ran several rows per step
    assert 0.0 < engine.slot_occupancy <= 1.0


async def test_batched_and_unbatched_greedy_answers_match(make_engine: Factory) -> None:
    reqs = [request(i, max_tokens=12 + 3 * i) for i in range(8)]
    one = await make_engine(max_batch=1, cache_ttl_s=0)
    alone = [final(e).text for e in await run_all(one, reqs)]
    many = await make_engine(max_batch=8, batch_wait_ms=1000, cache_ttl_s=0)
    together_events = await run_all(many, reqs)
    together = [final(e).text for e in together_events]
    assert many.status().batch_sizes == {8: 1}
    assert together == alone
    for req, events in zip(reqs, together_events, strict=True):
        assert final(events).usage.completion_tokens <= (req.max_tokens or 0)


async def test_cancel_queued_and_running(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=2, max_new_tokens=200, cache_ttl_s=0)
    gate = threading.Event()
    engine.workers[0].replica.fault_hook = blocker(gate)
    running = [engine.submit(request(i, max_tokens=200)) for i in range(2)]
    queued = engine.submit(request(9, max_tokens=200))
    queued.cancel()
    events = await collect(queued)
    assert isinstance(events[-1], Failed) and events[-1].code == "cancelled"
    gate.set()
    # Cancel the first running job once it streams; its partner must still finish.
    first = running[0].events()
    async for event in first:
        if isinstance(event, Delta):
            running[0].cancel()
            break
    rest = [e async for e in first]
    assert isinstance(rest[-1], Failed) and rest[-1].code == "cancelled"
    assert isinstance((await collect(running[1]))[-1], Done)
    assert engine.status().queue_depth == 0


async def test_busy_when_queue_full(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=1, queue_size=3, busy_retry_after_s=2.5, cache_ttl_s=0)
    gate = threading.Event()
    engine.workers[0].replica.fault_hook = blocker(gate)
    first = engine.submit(request(0))
    await _until(lambda: engine.status().workers[0].busy)
    waiting = [engine.submit(request(i)) for i in range(1, 4)]
    with pytest.raises(BusyError) as info:
        engine.submit(request(5))
    assert info.value.code == "busy" and info.value.retry_after == 2.5
    assert engine.status().queue_depth == 3
    gate.set()
    for handle in [first, *waiting]:
        assert isinstance((await collect(handle))[-1], Done)


async def test_timeout_while_queued_and_while_running(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=1, cache_ttl_s=0)
    gate = threading.Event()
    engine.workers[0].replica.fault_hook = blocker(gate)
    running = engine.submit(request(0, timeout_s=0.3))
    queued = engine.submit(request(1, timeout_s=0.3))
    for handle in (queued, running):
        events = await collect(handle)
        assert isinstance(events[-1], Failed) and events[-1].code == "timeout"
    gate.set()
    engine.workers[0].replica.fault_hook = None
    assert isinstance((await collect(engine.submit(request(2))))[-1], Done)


async def test_out_of_memory_splits_batch_then_too_large(make_engine: Factory) -> None:
    import torch

    engine = await make_engine(max_batch=4, batch_wait_ms=1000, cache_ttl_s=0)
    sizes: list[int] = []

    def fault(size: int) -> None:
        sizes.append(size)
        if size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.workers[0].replica.fault_hook = fault
    results = await run_all(engine, [request(i, max_tokens=6) for i in range(4)])
    assert all(isinstance(r[-1], Done) for r in results)
    assert sizes[:3] == [4, 2, 1] and sorted(sizes) == [1, 1, 1, 1, 2, 2, 4]

    def always(size: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.workers[0].replica.fault_hook = always
    engine._batcher.wait_s = 0.02  # single jobs from here on: no need to wait for partners
    events = await collect(engine.submit(request(7)))
    assert isinstance(events[-1], Failed) and events[-1].code == "too_large"
    engine.workers[0].replica.fault_hook = None
    assert isinstance((await collect(engine.submit(request(8))))[-1], Done)


class _Crash(BaseException):
    """Kills a worker thread the way an unexpected fatal error would."""


async def test_dead_worker_is_restarted_and_its_jobs_retried(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=2, batch_wait_ms=500, cache_ttl_s=0)
    crashes: list[int] = []

    def fault(size: int) -> None:
        if not crashes:
            crashes.append(size)
            raise _Crash()

    worker = engine.workers[0]
    worker.replica.fault_hook = fault
    results = await run_all(engine, [request(i, max_tokens=5) for i in range(2)])
    assert crashes == [2]
    assert all(isinstance(r[-1], Done) for r in results)
    assert worker.restarts == 1 and worker.alive


async def test_cache_answers_identical_requests(make_engine: Factory) -> None:
    engine = await make_engine()
    first = final(await collect(engine.submit(request(1, max_tokens=10))))
    again = await collect(engine.submit(request(1, max_tokens=10)))
    assert final(again).cached and final(again).text == first.text
    assert "".join(e.text for e in again if isinstance(e, Delta)) == first.text
    other = final(await collect(engine.submit(request(1, max_tokens=11))))
    assert not other.cached


async def test_hot_swap_under_load_loses_no_job(make_engine: Factory, tiny_path: Any) -> None:
    engine = await make_engine(max_batch=4, cache_ttl_s=0)
    old_worker = engine.workers[0]
    handles = [engine.submit(request(i, max_tokens=20)) for i in range(12)]
    await engine.swap_model(str(tiny_path))
    handles += [engine.submit(request(i, max_tokens=20)) for i in range(12, 16)]
    results = await asyncio.gather(*(collect(h) for h in handles))
    assert all(isinstance(r[-1], Done) for r in results)
    assert engine.workers[0] is not old_worker
    await _until(lambda: not old_worker.alive)
    with pytest.raises(EngineError):
        await engine.swap_model("/nonexistent/model/folder")
    assert engine.status().ready
    assert isinstance((await collect(engine.submit(request(3))))[-1], Done)


async def test_every_bad_image_is_refused(make_engine: Factory) -> None:
    engine = await make_engine()
    assert BAD, "the hostile sample files are missing"
    for name in BAD:
        handle = engine.submit(JobRequest(job_id=name, image=image(name), prompt="Describe"))
        events = await asyncio.wait_for(collect(handle), 5.0)
        assert isinstance(events[-1], Failed) and events[-1].code == "bad_image", name
        assert events[-1].message
    assert engine.status().queue_depth == 0


async def test_invalid_requests_and_not_ready(make_engine: Factory, tiny_path: Any) -> None:
    from tests.engine.conftest import make_config

    idle = Engine(make_config(tiny_path))
    with pytest.raises(BusyError):
        idle.submit(request(0))
    engine = await make_engine()
    with pytest.raises(EngineError) as info:
        engine.submit(request(0, max_tokens=0))
    assert info.value.code == "bad_request"
    with pytest.raises(EngineError) as info:
        engine.submit(JobRequest(job_id="x", image=b"x", prompt="p" * 40_000))
    assert info.value.code == "too_large"
    done = final(await collect(engine.submit(request(0, max_tokens=10_000))))
    assert done.usage.completion_tokens <= engine.config.max_new_tokens


async def test_event_loop_stays_responsive_under_load(make_engine: Factory) -> None:
    engine = await make_engine(max_batch=16, max_new_tokens=64, cache_ttl_s=0)
    threads: set[str] = set()
    engine.workers[0].replica.fault_hook = lambda size: threads.add(threading.current_thread().name)
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    tick = asyncio.create_task(ticker())
    started = loop.time()
    # Enough work that a blocked loop would show: on a fast machine one round can be short, so
    # run rounds until the engine has been busy for a while (bounded).
    for round_no in range(8):
        big = [request(round_no * 32 + i, max_tokens=64) for i in range(32)]
        await run_all(engine, big)
        elapsed = loop.time() - started
        if elapsed > 0.3:
            break
    stop.set()
    await tick
    assert threading.main_thread().name not in threads
    assert elapsed > 0.3  # the work was long enough that blocking the loop would show
    assert max(lags) < max(0.25, elapsed / 4), (max(lags), elapsed)


async def test_status_and_stop(make_engine: Factory) -> None:
    engine = await make_engine()
    await collect(engine.submit(request(0, max_tokens=8)))
    status = engine.status()
    assert status.ready and status.model and status.dtype == "float32"
    assert status.workers[0].device == "cpu" and status.workers[0].jobs_done == 1
    assert status.queue_capacity == engine.config.queue_size
    assert status.tokens_per_s > 0
    pending = engine.submit(request(1, max_tokens=8))
    await engine.stop(grace_s=WAIT)
    assert isinstance((await collect(pending))[-1], Done)
    assert not engine.status().ready
    with pytest.raises(BusyError):
        engine.submit(request(2))


async def _until(predicate: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - the state lives on worker threads
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)

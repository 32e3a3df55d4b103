"""Batch formation (max size or max wait, whichever first) and the bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.batcher import Batcher
from engine.job import Dispatcher, Job
from engine.types import BusyError, JobRequest


def make_job(i: int, dispatcher: Dispatcher) -> Job:
    return Job(JobRequest(f"j{i}", b"", "p"), 4, 60.0, dispatcher, lambda job, ev: None)


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(asyncio.new_event_loop())


def test_full_batch_forms_without_waiting(dispatcher: Dispatcher) -> None:
    batcher = Batcher(capacity=10, max_batch=3, wait_s=60.0)
    jobs = [make_job(i, dispatcher) for i in range(4)]
    for job in jobs:
        batcher.reserve()
        batcher.push(job)
    started = time.monotonic()
    assert batcher.take(lambda: False) == jobs[:3]
    assert time.monotonic() - started < 1.0
    assert batcher.depth == 1


def test_partial_batch_released_after_wait(dispatcher: Dispatcher) -> None:
    batcher = Batcher(capacity=10, max_batch=8, wait_s=0.05)
    job = make_job(0, dispatcher)
    batcher.reserve()
    batcher.push(job)
    started = time.monotonic()
    assert batcher.take(lambda: False) == [job]
    assert 0.04 <= time.monotonic() - started < 5.0


def test_capacity_counts_decoding_jobs_and_busy(dispatcher: Dispatcher) -> None:
    depths: list[int] = []
    batcher = Batcher(
        capacity=2, max_batch=8, wait_s=0.0, retry_after_s=3.0, on_depth=depths.append
    )
    assert batcher.reserve() == 0
    assert batcher.reserve() == 1
    with pytest.raises(BusyError) as info:
        batcher.reserve()
    assert info.value.retry_after == 3.0
    batcher.release()
    assert batcher.depth == 1 and depths == [1, 2, 1]


def test_finished_jobs_are_skipped_and_discarded(dispatcher: Dispatcher) -> None:
    batcher = Batcher(capacity=10, max_batch=8, wait_s=0.0)
    a, b, c = (make_job(i, dispatcher) for i in range(3))
    for job in (a, b, c):
        batcher.reserve()
        batcher.push(job)
    b.fail("cancelled", "x")
    batcher.discard(b)
    c.fail("cancelled", "x")
    assert batcher.take(lambda: False) == [a]
    assert batcher.depth == 0


def test_requeue_goes_first_and_stop_wakes_takers(dispatcher: Dispatcher) -> None:
    batcher = Batcher(capacity=10, max_batch=1, wait_s=0.0)
    a, b = make_job(0, dispatcher), make_job(1, dispatcher)
    batcher.reserve()
    batcher.push(a)
    batcher.requeue([b])
    assert batcher.take(lambda: False) == [b]
    assert batcher.take(lambda: False) == [a]
    stop = threading.Event()
    result: list[list[Job]] = []
    taker = threading.Thread(target=lambda: result.append(batcher.take(stop.is_set)))
    taker.start()
    stop.set()
    batcher.wake()
    taker.join(10)
    assert result == [[]]


def test_take_ready_never_waits_and_respects_the_limit(dispatcher: Dispatcher) -> None:
    batcher = Batcher(capacity=10, max_batch=8, wait_s=60.0)
    assert batcher.take_ready(4) == []  # nothing ready: returns at once, no 60 s wait
    jobs = [make_job(i, dispatcher) for i in range(5)]
    for job in jobs:
        batcher.reserve()
        batcher.push(job)
    jobs[1].fail("cancelled", "gone")
    assert batcher.ready == 5
    assert batcher.take_ready(0) == []
    assert batcher.take_ready(2) == [jobs[0], jobs[2]]  # the cancelled job is skipped
    assert batcher.take_ready(9) == jobs[3:]
    assert batcher.depth == 0
    batcher.reserve()
    batcher.push(make_job(7, dispatcher))
    batcher.close()
    assert batcher.take_ready(3) == []

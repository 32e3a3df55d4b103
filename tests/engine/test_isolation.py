"""Batch isolation: a batch that fails for a reason other than memory reruns its jobs one by one,
so only the job that causes the failure ends with an error (static and continuous batching)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from engine import Engine, EngineError, JobRequest
from engine.job import Dispatcher, Job
from engine.model import Replica
from engine.sanitize import PromptGuard
from engine.types import Delta, Done, Failed, JobEvent
from tests.engine.conftest import collect, image

Factory = Callable[..., Coroutine[Any, Any, Engine]]
PROMPTS = ["Describe the image.", "What is in this picture?", "Hi", "Tell me a story."]
PHOTOS = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg"]
POISON = "POISON"


@pytest.fixture(params=["static", "continuous"])
def batching(request: pytest.FixtureRequest) -> str:
    """Every test runs under both batching modes."""
    return str(request.param)


class Observer:
    """Records what the engine reports (an EngineObserver)."""

    def __init__(self) -> None:
        self.isolations: list[tuple[str, int]] = []
        self.outcomes: list[str] = []

    def on_batch(self, size: int) -> None:
        pass

    def on_job_end(self, outcome: str, completion_tokens: int, seconds: float) -> None:
        self.outcomes.append(outcome)

    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch_isolated(self, stage: str, jobs: int) -> None:
        self.isolations.append((stage, jobs))

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        pass

    def on_vision_cache_lookup(self, hit: bool) -> None:
        pass

    def on_vision_cache_bytes(self, size: int) -> None:
        pass


@pytest.fixture
async def observed(make_engine: Factory) -> Callable[..., Coroutine[Any, Any, Any]]:
    """An engine with an :class:`Observer` that gathers 4 jobs per batch: a batch starts as
    soon as 4 are ready, the long wait only covers image decoding on a loaded machine."""

    async def factory(**overrides: Any) -> tuple[Engine, Observer]:
        overrides.setdefault("batch_wait_ms", 10_000)
        engine = await make_engine(max_batch=4, cache_ttl_s=0, **overrides)
        observer = Observer()
        engine._observer = observer
        return engine, observer

    return factory


def request(i: int, prompt: str | None = None, max_tokens: int = 8) -> JobRequest:
    return JobRequest(
        job_id=f"i{i}",
        image=image(PHOTOS[i % len(PHOTOS)]),
        prompt=prompt if prompt is not None else f"{PROMPTS[i % len(PROMPTS)]} #{i}",
        max_tokens=max_tokens,
    )


async def run_all(engine: Engine, reqs: list[JobRequest]) -> list[list[JobEvent]]:
    handles = [engine.submit(r) for r in reqs]
    return list(await asyncio.gather(*(collect(h) for h in handles)))


def streamed(events: list[JobEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


async def references(engine: Engine, reqs: list[JobRequest]) -> list[str]:
    """Each request's answer run on its own (one at a time, no fault injected)."""
    wait_s = engine._batcher.wait_s
    engine._batcher.wait_s = 0.0  # alone: no partner to wait for
    texts = []
    for r in reqs:
        last = (await collect(engine.submit(r)))[-1]
        assert isinstance(last, Done), last
        texts.append(last.text)
    engine._batcher.wait_s = wait_s
    return texts


def poison_encode(replica: Replica) -> None:
    """Make input encoding (processor or vision-cache path) fail for any batch holding a prompt
    with POISON in it."""
    original = replica.encode_rows

    def encode_rows(rows: Any) -> Any:
        if any(POISON in row.prompt for row in rows):
            raise ValueError("injected: this prompt breaks the processor")
        return original(rows)

    replica.encode_rows = encode_rows  # type: ignore[method-assign]


async def test_poisoned_job_fails_alone_and_its_neighbours_answer(
    observed: Any, batching: str
) -> None:
    engine, observer = await observed()
    poison_encode(engine.workers[0].replica)
    reqs = [request(i) for i in range(3)] + [request(3, prompt=f"{POISON} in the prompt")]
    results = await run_all(engine, reqs)
    for events in results[:3]:
        assert isinstance(events[-1], Done), events[-1]
        assert streamed(events) == events[-1].text
    bad = results[3][-1]
    assert isinstance(bad, Failed) and bad.code == "internal"
    stage = "generate" if batching == "static" else "prefill"
    assert observer.isolations == [(stage, 4)]


async def test_a_real_hostile_prompt_without_the_guard_fails_only_itself(
    observed: Any, batching: str
) -> None:
    """Depth 3 on its own: with the prompt guard off, ``<image>`` really breaks the processor."""
    engine, observer = await observed()
    engine.workers[0].replica.guard = PromptGuard([])
    reqs = [request(i) for i in range(3)] + [request(3, prompt="<image> what is this")]
    results = await run_all(engine, reqs)
    assert all(isinstance(events[-1], Done) for events in results[:3])
    bad = results[3][-1]
    assert isinstance(bad, Failed) and bad.code == "internal"
    assert len(observer.isolations) == 1 and observer.isolations[0][1] == 4


async def test_hostile_prompts_beside_three_jobs(observed: Any) -> None:
    """With every depth on: ``<image>`` is answered, a lone surrogate is refused at submit."""
    engine, observer = await observed()
    with pytest.raises(EngineError) as refused:
        engine.submit(request(9, prompt="what is \ud800 this"))
    assert refused.value.code == "bad_request"
    reqs = [request(i) for i in range(3)] + [request(3, prompt="<image> what is this")]
    results = await run_all(engine, reqs)
    assert all(isinstance(events[-1], Done) for events in results)
    assert observer.isolations == []


async def test_injected_batch_fault_isolates_and_every_job_answers(
    observed: Any, batching: str
) -> None:
    engine, observer = await observed()
    reqs = [request(i) for i in range(4)]
    expected = await references(engine, reqs)
    sizes: list[int] = []

    def fault(size: int) -> None:
        sizes.append(size)
        if size > 1:
            raise RuntimeError("injected: the batch fails, whoever is in it")

    engine.workers[0].replica.fault_hook = fault
    results = await run_all(engine, reqs)
    # Continuous mode may admit the first job into the run that served the references, so the
    # failing group is not always all four; every group of several fails and is isolated.
    assert any(size > 1 for size in sizes), sizes
    for events, text in zip(results, expected, strict=True):
        assert isinstance(events[-1], Done) and events[-1].text == text
        assert streamed(events) == text
    assert observer.isolations and all(jobs > 1 for _, jobs in observer.isolations)


async def test_failure_mid_decode_reruns_without_duplicating_streamed_text(
    observed: Any, batching: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that already streamed text restart alone; only text past what was sent goes out."""
    engine, observer = await observed(max_new_tokens=16)
    resent: list[str] = []
    mark_rerun = Job.mark_rerun

    def spy(job: Job) -> None:
        resent.append(job.sent_text)
        mark_rerun(job)

    monkeypatch.setattr(Job, "mark_rerun", spy)
    reqs = [request(i, max_tokens=16) for i in range(4)]
    expected = await references(engine, reqs)
    replica = engine.workers[0].replica
    original = replica.decode
    calls = 0
    armed = threading.Event()
    armed.set()

    def decode(ids: Any) -> str:
        nonlocal calls
        calls += 1
        if armed.is_set() and calls > 40:  # a few tokens into the batch, in every mode
            armed.clear()
            raise RuntimeError("injected: a decode step fails")
        return str(original(ids))

    replica.decode = decode  # type: ignore[method-assign]
    results = await run_all(engine, reqs)
    assert not armed.is_set()
    for events, text in zip(results, expected, strict=True):
        assert isinstance(events[-1], Done), events[-1]
        assert events[-1].text == text and streamed(events) == text
    stage = "generate" if batching == "static" else "decode"
    assert [s for s, _ in observer.isolations] == [stage]
    assert any(resent)  # some rows had streamed text before the rerun


async def test_lone_job_failing_is_not_isolated(observed: Any) -> None:
    engine, observer = await observed(batch_wait_ms=0)

    def fault(size: int) -> None:
        raise RuntimeError("injected")

    engine.workers[0].replica.fault_hook = fault
    last = (await collect(engine.submit(request(0))))[-1]
    assert isinstance(last, Failed) and last.code == "internal"
    assert observer.isolations == []


async def test_rerun_that_diverges_fails_instead_of_splicing_answers() -> None:
    loop = asyncio.get_running_loop()
    ends: list[Done | Failed] = []

    def make(job_id: str) -> Job:
        return Job(
            JobRequest(job_id, b"", "p"), 8, 30.0, Dispatcher(loop), lambda j, e: ends.append(e)
        )

    same = make("same")
    same.advance("Hello wor")
    same.mark_rerun()
    for total in ("He", "Hello wor", "Hello world"):
        same.advance(total)
    assert same.succeed() and same.sent_text == "Hello world"
    other = make("other")
    other.advance("Hello wor")
    other.mark_rerun()
    other.advance("Hello")
    other.advance("Help")
    assert other.finished and other.sent_text == "Hello wor"
    other.advance("Help me")  # nothing more goes out once it failed
    assert isinstance(ends[0], Done) and ends[0].text == "Hello world"
    assert isinstance(ends[1], Failed) and ends[1].code == "internal"
    events = [e async for e in other.events()]
    assert [type(e).__name__ for e in events] == ["Delta", "Failed"]

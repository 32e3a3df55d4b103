"""JobRunner: every event reaches every sink in order, and every job ends exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.jobs.runner import CRASHED, STOPPED, Busy, Job, JobRunner, JobSpec
from bridge.store.backoff import Backoff
from engine.types import (
    BusyError,
    Delta,
    Done,
    EngineError,
    Failed,
    JobRequest,
    Queued,
    Started,
    Usage,
)
from tests.jobs.fakes import (
    ANSWER,
    Ends,
    Releases,
    ScriptedEngine,
    Sink,
    Sleeps,
    Step,
    answer_script,
)

IMAGE = b"\x89PNG image bytes"
FULL = ["queued", "started", "delta", "delta", "delta", "done"]


def make(
    steps: list[Step] | None = None, **runner_kw: Any
) -> tuple[ScriptedEngine, JobRunner, Ends]:
    engine = ScriptedEngine(None if steps is None else (lambda _r: list(steps)))
    ends = Ends()
    return engine, JobRunner(engine, on_end=ends, **runner_kw), ends


def spec(*sinks: Sink, job_id: str = "j1", **kw: Any) -> JobSpec:
    kw.setdefault("origin", "ws")
    kw.setdefault("owner", "alice")
    return JobSpec(request=JobRequest(job_id, IMAGE, "what?"), sinks=sinks, **kw)


async def ended(job: Job) -> str:
    assert job.task is not None
    async with asyncio.timeout(5):
        return await job.task


# --- delivery --------------------------------------------------------------------------------
async def test_every_sink_gets_every_event_in_order_after_being_opened() -> None:
    engine, runner, ends = make()
    log: list[tuple[str, str]] = []
    a, b = Sink("a", log=log), Sink("b", log=log, required=True)
    assert await runner.run(spec(a, b)) == "done"
    assert a.kinds == b.kinds == FULL
    assert a.events == b.events
    assert "".join(e.text for e in a.events if isinstance(e, Delta)) == ANSWER
    # Both are opened before the first event; each event reaches a, then b.
    assert log[:2] == [("a", "open"), ("b", "open")]
    assert log[2:] == [(name, kind) for kind in FULL for name in ("a", "b")]
    assert a.opens == b.opens == 1
    assert ends.calls == [("j1", "ws", "done")]
    assert engine.handles["j1"].cancels == 0 and not runner.is_live("j1")


async def test_start_streams_in_a_background_task_until_the_end() -> None:
    _, runner, ends = make()
    sink = Sink()
    job = runner.start(spec(sink))
    assert runner.is_live("j1") and job.task in runner.tasks
    assert await ended(job) == "done" and job.outcome == "done"
    assert sink.kinds == FULL and ends.calls == [("j1", "ws", "done")]
    assert not runner.is_live("j1") and not runner.tasks


USAGE = Usage(1, 2)
TERMINAL_PATHS: list[tuple[str, list[Step], str, str]] = [
    ("done", answer_script(), "done", "done"),
    ("cached", [Queued(0), Done("hi", USAGE, cached=True)], "done", "cached"),
    ("engine failed", [Queued(0), Started(), Failed("timeout", "too slow")], "error", "timeout"),
    ("stream raised", [Queued(0), Delta("a"), RuntimeError("boom")], "error", "internal"),
    ("stream ran dry", [Queued(0), Started(), Delta("a")], "error", "internal"),
    ("nothing at all", [], "error", "internal"),
]


@pytest.mark.parametrize(
    ("steps", "last_kind", "outcome"),
    [p[1:] for p in TERMINAL_PATHS],
    ids=[p[0] for p in TERMINAL_PATHS],
)
async def test_each_path_ends_every_sink_exactly_once(
    steps: list[Step], last_kind: str, outcome: str
) -> None:
    _, runner, ends = make(steps)
    a, b = Sink("a"), Sink("b")
    seen: list[str | None] = []
    job_spec = spec(a, b, on_end=lambda job: seen.append(job.outcome))
    assert await runner.run(job_spec) == outcome
    for sink in (a, b):
        assert len(sink.terminals) == 1 and sink.events[-1].kind == last_kind
    assert ends.calls == [("j1", "ws", outcome)] and seen == [outcome]
    if outcome == "internal":  # the engine gave no terminal: the runner made one up
        assert a.events[-1] == b.events[-1] == CRASHED


async def test_a_crashed_stream_cancels_the_engine_job() -> None:
    engine, runner, _ = make([Queued(0), RuntimeError("boom")])
    sink = Sink()
    assert await runner.run(spec(sink)) == "internal"
    assert sink.events == [Queued(0), CRASHED]
    assert engine.handles["j1"].cancels == 1


@pytest.mark.parametrize("end_on_stop", [True, False])
async def test_a_cancelled_task_ends_the_job_stopped_only_when_the_spec_says(
    end_on_stop: bool,
) -> None:
    hold = asyncio.Event()
    engine, runner, ends = make(answer_script(hold))
    sink = Sink()
    job = runner.start(spec(sink, end_on_stop=end_on_stop))
    await _until(lambda: "started" in sink.kinds)
    assert job.task is not None
    job.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job.task
    assert engine.handles["j1"].cancels == 1
    if end_on_stop:
        assert sink.events == [Queued(0), Started(), STOPPED]
    else:
        assert sink.events == [Queued(0), Started()]  # run again after a restart: no answer yet
    assert ends.calls == [("j1", "ws", "internal")]
    assert not runner.is_live("j1")


# --- broken sinks ----------------------------------------------------------------------------
@pytest.mark.parametrize("breaks_on", ["open", "queued", "delta", "done"])
async def test_a_broken_optional_sink_is_skipped_and_the_others_get_everything(
    breaks_on: str,
) -> None:
    engine, runner, ends = make()
    if breaks_on == "open":
        broken = Sink("broken", fail_open=RuntimeError("no"))
    else:
        broken = Sink("broken", fail_on=breaks_on)
    before, after = Sink("before"), Sink("after", required=True)
    assert await runner.run(spec(before, broken, after)) == "done"
    assert before.kinds == after.kinds == FULL
    # It was asked once for the failing call and never again.
    calls = broken.sends + broken.opens
    expected = 1 if breaks_on == "open" else 1 + FULL.index(breaks_on) + 1
    assert calls == expected
    assert engine.handles["j1"].cancels == 0 and ends.calls == [("j1", "ws", "done")]


async def test_a_required_sink_error_cancels_the_job_and_reaches_the_caller() -> None:
    engine, runner, ends = make()
    other = Sink("other")
    reply = Sink("reply", required=True, fail_on="delta", error=ConnectionError("platform down"))
    after = Sink("after")
    with pytest.raises(ConnectionError, match="platform down"):
        await runner.run(spec(other, reply, after))
    assert engine.handles["j1"].cancels == 1
    # The first delta reached the sinks before the failing one only; no later event, and no
    # made-up terminal: the caller retries the whole job.
    assert other.kinds == ["queued", "started", "delta"]
    assert after.kinds == ["queued", "started"]
    assert ends.calls == [("j1", "ws", "internal")] and not runner.is_live("j1")


async def test_a_required_sink_that_cannot_open_cancels_the_job_before_any_event() -> None:
    engine, runner, ends = make()
    other = Sink("other")
    reply = Sink("reply", required=True, fail_open=ConnectionError("cannot post"))
    with pytest.raises(ConnectionError):
        await runner.run(spec(other, reply))
    handle = engine.handles["j1"]
    assert handle.cancels == 1 and not handle.iterated
    assert other.events == [] and reply.events == []
    assert len(ends.calls) == 1


async def test_end_job_ends_early_with_its_outcome_and_delivers_nothing_more() -> None:
    engine, runner, ends = make()
    first = Sink("first")
    stopper = Sink("stopper", end_on="delta", end_outcome="stopped")
    last = Sink("last")
    assert await runner.run(spec(first, stopper, last)) == "stopped"
    assert engine.handles["j1"].cancels == 1
    assert first.kinds == stopper.kinds == ["queued", "started", "delta"]
    assert last.kinds == ["queued", "started"]  # the ending event goes no further
    assert ends.calls == [("j1", "ws", "stopped")]


# --- busy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["start", "run"])
async def test_refuse_raises_busy_at_once_and_keeps_nothing(how: str) -> None:
    sleeps, release = Sleeps(), Releases()
    engine, runner, ends = make(sleep=sleeps)
    engine.refuse(BusyError(retry_after=1.0))
    sink = Sink()
    job_spec = spec(sink, busy=Busy.REFUSE, held=len(IMAGE), release=release)
    with pytest.raises(EngineError) as info:
        if how == "start":
            runner.start(job_spec)
        else:
            await runner.run(job_spec)
    assert info.value.code == "busy" and info.value.retry_after == 1.0
    assert engine.submits == 1 and sleeps.delays == []
    assert sink.opens == 0 and sink.events == []
    assert release.calls == []  # a refused job's bytes are still the caller's
    assert ends.calls == [] and runner.live_count() == 0 and not runner.tasks


async def test_wait_submits_again_after_retry_after_or_the_backoff() -> None:
    sleeps = Sleeps()
    engine, runner, ends = make(
        sleep=sleeps, busy_backoff=lambda: Backoff(initial=0.5, cap=5.0, rng=lambda: 0.5)
    )
    engine.refuse(
        BusyError(retry_after=0.25),
        EngineError("busy", "full"),
        EngineError("busy", "full"),
        BusyError(retry_after=3.0),
    )
    sink = Sink()
    assert await runner.run(spec(sink, busy=Busy.WAIT, origin="feishu")) == "done"
    # retry_after when the engine gives one; otherwise the backoff (here without jitter).
    assert sleeps.delays == [0.25, 0.5, 1.0, 3.0]
    assert engine.submits == 5 and sink.kinds == FULL
    assert ends.calls == [("j1", "feishu", "done")]


async def test_wait_without_retry_after_uses_the_jittered_default_backoff() -> None:
    sleeps = Sleeps()
    engine, runner, _ = make(sleep=sleeps)
    engine.refuse(*[EngineError("busy", "full") for _ in range(6)])
    assert await runner.run(spec(Sink(), busy=Busy.WAIT)) == "done"
    assert len(sleeps.delays) == 6
    for delay, base in zip(sleeps.delays, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0], strict=True):
        assert base * 0.8 - 1e-9 <= delay <= min(5.0, base * 1.2) + 1e-9


async def test_wait_does_not_wait_out_other_refusals() -> None:
    sleeps = Sleeps()
    engine, runner, ends = make(sleep=sleeps)
    engine.refuse(EngineError("too_large", "big"))
    with pytest.raises(EngineError) as info:
        await runner.run(spec(Sink(), busy=Busy.WAIT))
    assert info.value.code == "too_large" and sleeps.delays == [] and ends.calls == []


async def test_wait_gives_up_with_busy_once_the_runner_stops() -> None:
    runners: list[JobRunner] = []
    sleeps = Sleeps(on_sleep=lambda _d: setattr(runners[0], "stopping", True))
    engine, runner, ends = make(sleep=sleeps)
    runners.append(runner)
    engine.refuse(*[BusyError(retry_after=0.1) for _ in range(5)])
    with pytest.raises(EngineError) as info:
        await runner.run(spec(Sink(), busy=Busy.WAIT))
    assert info.value.code == "busy"
    assert engine.submits == 2 and ends.calls == []  # one wait, then the stop was noticed


async def test_wait_while_stopping_refuses_at_once() -> None:
    sleeps = Sleeps()
    engine, runner, _ = make(sleep=sleeps)
    runner.stopping = True
    engine.refuse(BusyError())
    with pytest.raises(EngineError, match="full"):
        await runner.run(spec(Sink(), busy=Busy.WAIT))
    assert sleeps.delays == []


async def test_an_engine_that_raises_something_else_on_submit_is_an_internal_refusal() -> None:
    engine, runner, _ = make()
    engine.refuse(RuntimeError("bug"))  # type: ignore[arg-type]
    with pytest.raises(EngineError) as info:
        runner.start(spec(Sink()))
    assert info.value.code == "internal"


# --- held bytes ------------------------------------------------------------------------------
HELD_PATHS: list[tuple[str, list[Step]]] = [
    ("started", answer_script()),
    ("failed while queued", [Queued(3), Failed("timeout", "waited too long")]),
    ("crashed while queued", [Queued(3), RuntimeError("boom")]),
    ("ran dry while queued", [Queued(3)]),
    ("crashed after start", [Queued(0), Started(), RuntimeError("boom")]),
]


@pytest.mark.parametrize("steps", [p[1] for p in HELD_PATHS], ids=[p[0] for p in HELD_PATHS])
async def test_held_bytes_are_released_exactly_once(steps: list[Step]) -> None:
    _, runner, _ = make(steps)
    release = Releases()
    seen_at: list[tuple[str, int]] = []
    sink = Sink()
    original = sink.send

    async def send(event: Any) -> None:
        seen_at.append((event.kind, len(release.calls)))
        await original(event)

    sink.send = send  # type: ignore[method-assign]
    await runner.run(spec(sink, held=1234, release=release))
    assert release.calls == [1234]
    # Given back before the sinks hear of the start (or of the end when it never started).
    given_back_at = "started" if "started" in sink.kinds else sink.events[-1].kind
    point = [kind for kind, _ in seen_at].index(given_back_at)
    counts = [n for _, n in seen_at]
    assert counts == [0] * point + [1] * (len(counts) - point)


async def test_held_bytes_of_a_cancelled_queued_job_are_released_once() -> None:
    hold = asyncio.Event()
    _, runner, _ = make([Queued(5), hold, Started(), Done("x", USAGE)])
    release = Releases()
    sink = Sink()
    job = runner.start(spec(sink, held=99, release=release))
    await _until(lambda: sink.kinds == ["queued"])
    assert release.calls == []
    assert job.task is not None
    job.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job.task
    assert release.calls == [99] and sink.events[-1] == STOPPED


async def test_nothing_held_means_release_is_never_called() -> None:
    _, runner, _ = make()
    release = Releases()
    await runner.run(spec(Sink(), held=0, release=release))
    assert release.calls == []


# --- on_end ----------------------------------------------------------------------------------
async def test_an_on_end_hook_that_raises_does_not_break_the_job() -> None:
    engine = ScriptedEngine()

    def broken(_spec: JobSpec, _outcome: str) -> None:
        raise RuntimeError("metrics down")

    runner = JobRunner(engine, on_end=broken)
    sink = Sink()
    assert await runner.run(spec(sink)) == "done"
    assert sink.kinds == FULL and not runner.is_live("j1")


# --- the live registry and cancel ------------------------------------------------------------
async def test_live_jobs_are_found_by_id_and_cancelled_only_by_their_owner() -> None:
    hold = asyncio.Event()
    engine, runner, ends = make(answer_script(hold))
    mine, theirs = Sink("mine"), Sink("theirs")
    job = runner.start(spec(mine, job_id="ws:s1:a", origin="ws", owner="alice"))
    other = runner.start(spec(theirs, job_id="http:b", origin="http", owner="bob"))
    await _until(lambda: "started" in mine.kinds and "started" in theirs.kinds)
    assert runner.live("ws:s1:a") == [job] and runner.is_live("http:b")
    assert runner.live_count() == 2 and runner.live_count("ws") == 1
    assert runner.live_count("http") == 1 and runner.live_count("feishu") == 0
    assert runner.live("nope") == [] and not runner.is_live("nope")

    assert runner.cancel("ws:s1:a", owner="bob") is False  # not bob's job
    assert runner.cancel("nope") is False
    assert engine.handles["ws:s1:a"].cancels == 0
    assert runner.cancel("ws:s1:a", owner="alice") is True
    assert await ended(job) == "cancelled"
    assert mine.terminals == [Failed("cancelled", "the job was cancelled")]
    assert runner.live_count() == 1 and not runner.is_live("ws:s1:a")
    assert runner.cancel("ws:s1:a", owner="alice") is False  # it has ended

    assert runner.cancel("http:b") is True  # no owner given: any job with that id
    assert await ended(other) == "cancelled"
    assert len(theirs.terminals) == 1 and runner.live_count() == 0
    assert sorted(ends.calls) == [("http:b", "http", "cancelled"), ("ws:s1:a", "ws", "cancelled")]


async def test_two_live_jobs_with_one_id_are_both_listed_and_leave_one_by_one() -> None:
    hold = asyncio.Event()
    _, runner, _ = make([Queued(0), hold, Done("x", USAGE)])
    a, b = Sink("a"), Sink("b")
    first = runner.start(spec(a))
    second = runner.start(spec(b))
    assert runner.live("j1") == [first, second]
    assert first.task is not None
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
    await _until(lambda: runner.live("j1") == [second])
    assert a.events == [STOPPED]
    hold.set()
    assert await ended(second) == "done" and runner.live("j1") == []


@pytest.mark.parametrize("end_on_stop", [True, False])
async def test_a_job_cancelled_before_its_first_step_still_ends_once(end_on_stop: bool) -> None:
    # A task cancelled before it first runs never enters its coroutine: the runner must still
    # end the job (its bytes, the registry, the metrics, a terminal for the client).
    engine, runner, ends = make()
    release, sink = Releases(), Sink()
    job = runner.start(spec(sink, held=50, release=release, end_on_stop=end_on_stop))
    assert job.task is not None
    job.task.cancel()  # in the same loop turn as the submit
    await asyncio.gather(job.task, return_exceptions=True)
    await _until(lambda: not runner.is_live("j1") and not runner._endings)
    assert release.calls == [50] and engine.handles["j1"].cancels == 1
    assert sink.events == ([STOPPED] if end_on_stop else [])
    assert sink.opens == (1 if end_on_stop else 0)
    assert ends.calls == [("j1", "ws", "internal")] and not runner.tasks


async def test_stop_right_after_a_start_still_ends_the_job_once() -> None:
    hold = asyncio.Event()
    _, runner, ends = make(answer_script(hold))
    release, sink = Releases(), Sink()
    runner.start(spec(sink, held=7, release=release))
    async with asyncio.timeout(5):
        await runner.stop(timeout_s=0.0)
    assert len(sink.terminals) == 1 and sink.events[-1] == STOPPED
    assert release.calls == [7] and ends.calls == [("j1", "ws", "internal")]
    assert runner.live_count() == 0


# --- stop ------------------------------------------------------------------------------------
async def test_stop_lets_running_jobs_finish_within_the_timeout() -> None:
    hold = asyncio.Event()
    _, runner, ends = make(answer_script(hold))
    sinks = [Sink(f"s{i}") for i in range(3)]
    jobs = [runner.start(spec(s, job_id=f"j{i}")) for i, s in enumerate(sinks)]
    await _until(lambda: all("started" in s.kinds for s in sinks))
    stopping = asyncio.create_task(runner.stop(timeout_s=60.0))
    await _until(lambda: runner.stopping)
    assert not stopping.done()
    hold.set()
    async with asyncio.timeout(5):
        await stopping
    assert all(s.kinds == FULL for s in sinks)
    assert all(j.outcome == "done" for j in jobs) and len(ends.calls) == 3
    assert not runner.tasks


async def test_stop_cancels_what_is_still_running_after_the_timeout() -> None:
    hold = asyncio.Event()
    engine, runner, ends = make(answer_script(hold))
    ending, pending = Sink("ending"), Sink("pending")
    runner.start(spec(ending, job_id="j1"))
    runner.start(spec(pending, job_id="j2", end_on_stop=False))
    await _until(lambda: "started" in ending.kinds and "started" in pending.kinds)
    async with asyncio.timeout(5):
        await runner.stop(timeout_s=0.0)
    assert ending.events[-1] == STOPPED and len(ending.terminals) == 1
    assert pending.terminals == []
    assert engine.handles["j1"].cancels == 1 and engine.handles["j2"].cancels == 1
    assert sorted(ends.calls) == [("j1", "ws", "internal"), ("j2", "ws", "internal")]
    assert not runner.tasks and runner.live_count() == 0


async def test_stop_with_no_jobs_returns_at_once() -> None:
    _, runner, _ = make()
    async with asyncio.timeout(5):
        await runner.stop(timeout_s=3600.0)
    assert runner.stopping


async def _until(check: Any) -> None:
    """Let the loop run until ``check()`` holds (bounded, never a timed sleep)."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0)


async def test_a_stop_during_the_terminal_delivery_gives_no_sink_a_second_terminal() -> None:
    _, runner, ends = make()
    first, slow = Sink("first"), Sink("slow", hold_on="done")
    job = runner.start(spec(first, slow))
    await _until(lambda: slow.sends == len(FULL))  # first has its done; slow is receiving it
    assert first.kinds == FULL
    assert job.task is not None
    job.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job.task
    assert first.terminals == [first.events[-1]] and first.kinds == FULL
    assert len(slow.terminals) == 1  # the one it was given in place of its interrupted done
    assert len(ends.calls) == 1

"""The engine's side of its workers' threads: what it records when a batch starts, a row ends
or a batch is isolated, and how it retries the jobs of a worker that died and restarts it."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from engine.batcher import Batcher
from engine.cache import CachedAnswer
from engine.job import Job
from engine.rows import RowResult, StepUsage
from engine.shared_cache import TieredAnswers
from engine.stats import EngineStats
from engine.types import EngineObserver
from engine.worker import Worker

log = structlog.get_logger(__name__)


class EngineWorkerHooks:
    """Mixin of :class:`~engine.engine.Engine` implementing :class:`~engine.worker.WorkerHooks`;
    every method but :meth:`_recover` runs on a worker thread."""

    _observer: EngineObserver | None
    _stats: EngineStats
    _answers: TieredAnswers
    _batcher: Batcher
    _loop: asyncio.AbstractEventLoop | None
    _closing: bool

    def on_batch(self, worker: Worker, size: int) -> None:
        """A worker starts a generate call of ``size`` jobs."""
        self._stats.batch(size)
        if self._observer is not None:
            self._observer.on_batch(size)

    def on_batch_end(self, worker: Worker, usage: StepUsage) -> None:
        """A generate call finished; record how many of its decode slots did useful work."""
        self._stats.slots(usage.steps, usage.rows, usage.active_row_steps)

    def on_row_end(self, worker: Worker, job: Job, result: RowResult) -> None:
        """A job's row ended; finish it and remember the answer."""
        self._stats.tokens(result.completion_tokens)
        if result.reason == "stopped":
            return  # cancelled or timed out: the job already has its outcome
        job.prompt_tokens = result.prompt_tokens
        job.completion_tokens = result.completion_tokens
        if job.succeed() and job.cache_key is not None:
            self._answers.put(
                job.cache_key,
                CachedAnswer(job.sent_text, result.prompt_tokens, result.completion_tokens),
            )

    def on_isolation(self, worker: Worker, jobs: list[Job], stage: str) -> None:
        """A batch failed at ``stage`` for a reason other than memory; its jobs rerun alone."""
        if self._observer is not None:
            self._observer.on_batch_isolated(stage, len(jobs))

    def on_exit(self, worker: Worker, error: BaseException | None) -> None:
        """A worker thread ended; when it died, retry its jobs and restart it on the loop."""
        if error is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._recover, worker)

    def _recover(self, worker: Worker) -> None:
        jobs, worker.in_flight = worker.in_flight, []
        retry = []
        for job in jobs:
            job.attempts += 1
            if job.finished:
                continue
            if job.attempts >= 2:
                job.fail("internal", "the worker running this job failed twice")
            else:
                retry.append(job)
        self._batcher.requeue(retry)
        if not self._closing and not worker.retiring:
            worker.restarts += 1
            worker.start()
            log.warning(
                "engine.worker_restarted",
                worker=worker.worker_id,
                restarts=worker.restarts,
                retried=[j.job_id for j in retry],
            )

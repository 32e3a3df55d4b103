"""The continuous-batching schedule of one worker: admit ready jobs between decode steps, step
the running batch, retire rows as they end, and recover from out-of-memory errors and isolate
other errors (only the row that causes one fails; its neighbours are rerun and answer).

It runs on the worker thread and drives a :class:`~engine.continuous.RunningBatch`; the static
path (one ``generate`` per batch) lives in :mod:`engine.worker`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import torch

from engine.batcher import Batcher
from engine.continuous import RunningBatch
from engine.devices import free_memory, is_oom
from engine.job import Dispatcher, Job
from engine.rows import RowResult, StepUsage, spec_of
from engine.types import Started

if TYPE_CHECKING:
    from engine.worker import Worker, WorkerHooks

log = structlog.get_logger(__name__)


class ContinuousScheduler:
    """Runs jobs on one worker's replica with continuous batching until no row is left.

    Between two decode steps it admits up to ``max_batch - live rows`` ready jobs from the
    shared batcher (one prefill for the group), so a job arriving mid-batch starts within one
    step instead of waiting for the whole batch to end.
    """

    def __init__(
        self,
        worker: Worker,
        batcher: Batcher,
        dispatcher: Dispatcher,
        hooks: WorkerHooks,
        clock: Callable[[], float],
        max_batch: int,
    ) -> None:
        self._worker = worker
        self._replica = worker.replica
        self._batcher = batcher
        self._dispatcher = dispatcher
        self._hooks = hooks
        self._clock = clock
        self._max_batch = max_batch
        self._keys = itertools.count()
        self._jobs: dict[int, Job] = {}
        self._texts: dict[int, str] = {}
        self._batch = RunningBatch(self._replica, self._on_text, self._on_end, self._should_stop)
        self._cap = max_batch  # lowered after an out-of-memory error in a decode step
        self._hold = False  # a prefill did not fit next to the running rows: let them drain

    def run(self, first: list[Job]) -> None:
        """Admit ``first``, then step and admit until every row has ended."""
        pending = first
        with self._replica.lock, torch.inference_mode(), self._dispatcher.batch():
            while True:
                if pending:
                    self._track(pending)
                    self._admit(pending)
                    pending = []
                    self._track()  # before the events go out: a Done implies not in flight
                    self._dispatcher.flush()
                if not self._batch:
                    break
                rows = len(self._batch)
                if self._step():
                    self._hooks.on_batch_end(self._worker, StepUsage(1, rows, rows))
                self._track()
                self._dispatcher.flush()
                room = self._cap - len(self._batch)
                if room > 0 and not self._hold and not self._worker.retiring:
                    pending = self._batcher.take_ready(room)

    # --------------------------------------------------------------------------- admission

    def _admit(self, group: list[Job]) -> None:
        """Prefill ``group`` into the running batch; split it in halves on out-of-memory."""
        live = [job for job in group if not job.finished]
        if not live:
            return
        for job in live:
            if not job.started:
                job.started = True
                job.emit(Started())
        keys = [next(self._keys) for _ in live]
        for key, job in zip(keys, live, strict=True):
            self._jobs[key] = job
            self._texts[key] = ""
        specs = [spec_of(job) for job in live]
        out_of_memory = False
        try:
            self._hooks.on_batch(self._worker, len(live))
            self._batch.admit(keys, specs)
        except Exception as exc:
            if not is_oom(exc):
                log.exception(
                    "engine.prefill_failed",
                    worker=self._worker.worker_id,
                    jobs=[j.job_id for j in live],
                )
                failure = f"generation failed: {type(exc).__name__}"
                if set(keys) & set(self._batch.keys):
                    # It failed after merging (while streaming first tokens): the batch state
                    # is suspect, so every row, running or new, restarts on its own.
                    merged = self._batch.keys
                    self._batch.clear()
                    jobs = self._untrack([*merged, *(k for k in keys if k not in merged)])
                    if len(jobs) == 1:
                        jobs[0].fail("internal", failure)
                        return
                    self._isolated(jobs, "prefill", failure)
                    for job in jobs:
                        self._solo(job)
                    return
                if len(live) == 1:
                    self._forget(keys, "internal", failure)
                    return
                # The running rows are untouched by a failed prefill: admit each new job on its
                # own, so only the one that causes the error fails.
                self._untrack(keys)
                self._isolated(live, "prefill", failure)
                for job in live:
                    self._admit([job])
                return
            out_of_memory = True
            log.warning(
                "engine.out_of_memory",
                worker=self._worker.worker_id,
                stage="prefill",
                admitting=len(live),
                running=len(self._batch),
            )
        if not out_of_memory:
            return
        # Outside the except block, so the traceback no longer pins the failed tensors.
        admitted = set(self._batch.keys)
        retry = []
        for key, job in zip(keys, live, strict=True):
            if key not in admitted:
                self._jobs.pop(key, None)
                self._texts.pop(key, None)
                if not job.finished:
                    retry.append(job)
        free_memory()
        if len(retry) > 1:
            mid = len(retry) // 2
            self._admit(retry[:mid])
            self._admit(retry[mid:])
        elif retry and self._batch:
            # It may fit once the running rows are done: back to the front of the queue.
            self._hold = True
            self._batcher.requeue(retry)
        elif retry:
            retry[0].fail("too_large", "the job does not fit in accelerator memory on its own")

    # ------------------------------------------------------------------------------ stepping

    def _step(self) -> bool:
        """One decode step; False when it failed and the rows were retried or failed."""
        out_of_memory = False
        try:
            self._batch.step()
            return True
        except Exception as exc:
            if not is_oom(exc):
                log.exception(
                    "engine.decode_failed",
                    worker=self._worker.worker_id,
                    jobs=[self._jobs[k].job_id for k in self._batch.keys if k in self._jobs],
                )
                keys = self._batch.keys
                self._batch.clear()
                failure = f"generation failed: {type(exc).__name__}"
                if len(keys) == 1:
                    self._forget(keys, "internal", failure)
                    return False
                jobs = self._untrack(keys)
                self._isolated(jobs, "decode", failure)
                for job in jobs:
                    self._solo(job)
                return False
            out_of_memory = True
        assert out_of_memory
        # The cache may be half updated: restart every live row, at most half as many at once.
        keys = self._batch.keys
        self._batch.clear()
        jobs = [self._jobs.pop(k) for k in keys]
        for key in keys:
            self._texts.pop(key, None)
        free_memory()
        live = [job for job in jobs if not job.finished]
        log.warning(
            "engine.out_of_memory",
            worker=self._worker.worker_id,
            stage="decode",
            running=len(live),
        )
        if len(live) == 1:
            live[0].fail("too_large", "the job does not fit in accelerator memory on its own")
        elif live:
            self._cap = max(1, len(live) // 2)
            self._batcher.requeue(live)
        return False

    # ----------------------------------------------------------------------------- isolation

    def _isolated(self, jobs: list[Job], stage: str, failure: str) -> None:
        """Report that ``jobs`` failed together at ``stage`` and are about to run one by one."""
        live = [job for job in jobs if not job.finished]
        log.warning(
            "engine.batch_isolated",
            worker=self._worker.worker_id,
            stage=stage,
            jobs=[j.job_id for j in live],
            error=failure,
        )
        self._hooks.on_isolation(self._worker, live, stage)

    def _solo(self, job: Job) -> None:
        """Run ``job`` from its prompt to its end in a batch of its own (after a decode error).

        Which row broke a shared decode step is unknown and the shared cache may be half
        written, so every row restarts alone; the running batch is empty meanwhile and new jobs
        wait (or go to other workers). A job that streamed part of its answer is verified
        against it (:meth:`Job.mark_rerun`). An error here is this job's own: it fails alone.
        """
        if job.finished:
            return
        job.mark_rerun()
        key = next(self._keys)
        self._jobs[key] = job
        self._texts[key] = ""
        self._track()
        solo = RunningBatch(self._replica, self._on_text, self._on_end, self._should_stop)
        spec = spec_of(job)
        code = ""
        try:
            self._hooks.on_batch(self._worker, 1)
            solo.admit([key], [spec])
            self._dispatcher.flush()
            while len(solo):
                solo.step()
                self._hooks.on_batch_end(self._worker, StepUsage(1, 1, 1))
                self._dispatcher.flush()
        except Exception as exc:
            solo.clear()
            code = "too_large" if is_oom(exc) else "internal"
            log.exception(
                "engine.isolated_job_failed", worker=self._worker.worker_id, job_id=job.job_id
            )
        if code:
            free_memory()
            message = (
                "the job does not fit in accelerator memory on its own"
                if code == "too_large"
                else "generation failed for this job on its own"
            )
            self._forget([key], code, message)
        self._track()

    def _untrack(self, keys: list[int]) -> list[Job]:
        """Stop tracking ``keys`` without ending their jobs; the jobs, in order."""
        jobs = []
        for key in keys:
            job = self._jobs.pop(key, None)
            self._texts.pop(key, None)
            if job is not None:
                jobs.append(job)
        return jobs

    # ----------------------------------------------------------------------------- callbacks

    def _on_text(self, key: int, piece: str) -> None:
        text = self._texts[key] + piece
        self._texts[key] = text
        self._jobs[key].advance(text)

    def _on_end(self, key: int, result: RowResult) -> None:
        job = self._jobs.pop(key)
        self._texts.pop(key, None)
        self._worker.jobs_done += 1
        self._hooks.on_row_end(self._worker, job, result)
        if job.finished:
            job.image = job.vision = None

    def _should_stop(self, key: int) -> bool:
        job = self._jobs[key]
        if job.finished:
            return True
        if self._clock() > job.deadline:
            job.fail("timeout", "the job ran past its deadline")
            return True
        return False

    # ------------------------------------------------------------------------------ helpers

    def _forget(self, keys: list[int], code: str, message: str) -> None:
        """Fail the jobs of ``keys`` and stop tracking them."""
        for key in keys:
            job = self._jobs.pop(key, None)
            self._texts.pop(key, None)
            if job is not None:
                job.fail(code, message)

    def _track(self, extra: list[Job] | None = None) -> None:
        """Publish the jobs this worker holds, so a crash retries exactly those."""
        self._worker.in_flight = [*self._jobs.values(), *(extra or [])]

"""A worker thread: takes batches from the shared :class:`Batcher` and runs them on its replica.

``generate`` and every torch call happen here, never on the event loop. Out-of-memory errors
split the batch and retry; a job that alone does not fit fails with ``too_large``. Any other
error of a batch of several jobs isolates it: each unfinished job is rerun on its own, so only
the job that causes the error fails (``internal``) and its neighbours still get their answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

import structlog

from engine.batcher import Batcher
from engine.devices import free_memory, is_oom
from engine.job import Dispatcher, Job
from engine.model import Replica
from engine.rows import RowResult, StepUsage, spec_of
from engine.scheduler import ContinuousScheduler
from engine.types import Started, WorkerStatus

log = structlog.get_logger(__name__)

BatchingMode = Literal["static", "continuous"]


class WorkerHooks(Protocol):
    """What a worker reports to the engine (called on the worker thread)."""

    def on_batch(self, worker: Worker, size: int) -> None:
        """A generate call is about to start with ``size`` jobs."""
        ...

    def on_batch_end(self, worker: Worker, usage: StepUsage) -> None:
        """A generate call returned normally."""
        ...

    def on_row_end(self, worker: Worker, job: Job, result: RowResult) -> None:
        """A job's row ended with ``result``; the hook finishes the job."""
        ...

    def on_isolation(self, worker: Worker, jobs: list[Job], stage: str) -> None:
        """A batch of ``jobs`` failed at ``stage`` (not out of memory); each is rerun alone."""
        ...

    def on_exit(self, worker: Worker, error: BaseException | None) -> None:
        """The thread ended; ``error`` is set when it died rather than stopped."""
        ...


class Worker:
    """One thread driving one :class:`Replica`, one ``generate`` per batch (``static``) or with
    jobs admitted between decode steps (``continuous``, :mod:`engine.scheduler`)."""

    def __init__(
        self,
        worker_id: str,
        replica: Replica,
        batcher: Batcher,
        dispatcher: Dispatcher,
        hooks: WorkerHooks,
        clock: Callable[[], float] = time.monotonic,
        batching: BatchingMode = "static",
    ) -> None:
        self.worker_id = worker_id
        self.batching: BatchingMode = batching
        self.replica = replica
        self._batcher = batcher
        self._dispatcher = dispatcher
        self._hooks = hooks
        self._clock = clock
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.in_flight: list[Job] = []
        self.jobs_done = 0
        self.restarts = 0

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def retiring(self) -> bool:
        """Whether the worker was told to stop after its current batch."""
        return self._stopping

    def start(self) -> None:
        """Start (or restart after a crash) the thread."""
        self._thread = threading.Thread(
            target=self._main, name=f"engine-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def retire(self) -> None:
        """Finish the current batch, then exit."""
        self._stopping = True
        self._batcher.wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def status(self) -> WorkerStatus:
        """A snapshot for :class:`engine.types.EngineStatus`."""
        in_flight = len(self.in_flight)
        return WorkerStatus(
            worker_id=self.worker_id,
            device=self.replica.device,
            alive=self.alive,
            busy=in_flight > 0,
            jobs_in_flight=in_flight,
            jobs_done=self.jobs_done,
        )

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            while not self._stopping:
                batch = self._batcher.take(lambda: self._stopping)
                if not batch:
                    continue
                self.in_flight = batch
                if self.batching == "continuous":
                    ContinuousScheduler(
                        self,
                        self._batcher,
                        self._dispatcher,
                        self._hooks,
                        self._clock,
                        self._batcher.max_batch,
                    ).run(batch)
                else:
                    self._run(batch)
                # Cleared only on a normal return: after a crash the engine retries these jobs.
                self.in_flight = []
                for job in batch:
                    job.image = job.vision = None  # every job of the batch has ended: free them
        except BaseException as exc:  # the thread is dying; the engine restarts it
            error = exc
            log.error(
                "engine.worker_died",
                worker=self.worker_id,
                error=repr(exc),
                jobs=[j.job_id for j in self.in_flight],
            )
        finally:
            self._hooks.on_exit(self, error)

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.finished]
        if not live:
            return
        with self._dispatcher.batch():
            for job in live:
                if not job.started:
                    job.started = True
                    job.emit(Started())
        out_of_memory = False
        failure: str | None = None
        try:
            self._generate(live)
        except Exception as exc:
            if not is_oom(exc):
                log.exception(
                    "engine.generate_failed", worker=self.worker_id, jobs=[j.job_id for j in live]
                )
                failure = f"generation failed: {type(exc).__name__}"
            else:
                out_of_memory = True
                log.warning("engine.out_of_memory", worker=self.worker_id, batch=len(live))
        if failure is not None:
            self._isolate(live, failure)
        elif out_of_memory:
            # Outside the except block, so the traceback no longer pins the failed tensors.
            free_memory()
            live = [job for job in live if not job.finished]
            if len(live) == 1:
                live[0].fail("too_large", "the job does not fit in accelerator memory on its own")
            elif live:
                mid = len(live) // 2
                self._run(live[:mid])
                self._run(live[mid:])

    def _isolate(self, jobs: list[Job], failure: str) -> None:
        """After a non-OOM error: rerun each unfinished job of a batch alone, or fail a lone one.

        The error says nothing about which row caused it, so each row gets a batch of its own;
        the culprit fails there (a batch of one is never isolated again) and the others answer.
        A job that had streamed part of its answer starts again from its prompt; only text past
        what it already sent goes out, and it fails rather than diverge from that text
        (:meth:`Job.mark_rerun`).
        """
        rest = [job for job in jobs if not job.finished]
        if len(jobs) == 1:
            for job in rest:
                job.fail("internal", failure)
            return
        if not rest:
            return
        log.warning(
            "engine.batch_isolated",
            worker=self.worker_id,
            stage="generate",
            jobs=[j.job_id for j in rest],
            error=failure,
        )
        self._hooks.on_isolation(self, rest, "generate")
        for job in rest:
            job.mark_rerun()
            self._run([job])

    def _generate(self, jobs: list[Job]) -> None:
        self._hooks.on_batch(self, len(jobs))
        rows = [spec_of(job) for job in jobs]
        texts = [""] * len(jobs)
        clock = self._clock

        def on_text(i: int, piece: str) -> None:
            texts[i] += piece
            jobs[i].advance(texts[i])

        def on_end(i: int, result: RowResult) -> None:
            self.jobs_done += 1
            self._hooks.on_row_end(self, jobs[i], result)

        def should_stop(i: int) -> bool:
            job = jobs[i]
            if job.finished:
                return True
            if clock() > job.deadline:
                job.fail("timeout", "the job ran past its deadline")
                return True
            return False

        with self._dispatcher.batch():
            usage = self.replica.generate(
                rows,
                on_text=on_text,
                on_end=on_end,
                should_stop=should_stop,
                on_step=self._dispatcher.flush,
            )
        self._hooks.on_batch_end(self, usage)

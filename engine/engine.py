"""The engine: accepts jobs, decodes their images off the loop, batches them onto worker threads
(one model replica per device) and streams each job's events back to its caller."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from engine.admission import admit
from engine.batcher import Batcher
from engine.batching_mode import choose_batching
from engine.cache import AnswerCache, cache_key
from engine.config import EngineConfig
from engine.images import ImageLimits, load_image
from engine.inspection import EngineInspection
from engine.job import Dispatcher, Handle, Job
from engine.lifecycle import ModelLoader, join_all
from engine.loading import ModelUnavailable
from engine.model import Replica
from engine.progress import LoadCancelled, LoadProgress
from engine.shared_cache import SharedAnswerCache, TieredAnswers
from engine.stats import EngineStats
from engine.types import (
    BusyError,
    Done,
    EngineError,
    EngineObserver,
    Failed,
    JobRequest,
    Queued,
    Started,
)
from engine.vision import VisionContext, VisionFeatures
from engine.vision_cache import VisionCache
from engine.worker import Worker
from engine.worker_hooks import EngineWorkerHooks

log = structlog.get_logger(__name__)


class Engine(EngineInspection, EngineWorkerHooks):
    """In-process inference worker pool with dynamic batching, streaming and backpressure.

    Construct, ``await start()``, then ``submit()`` jobs from the event loop thread. Every job's
    event stream ends with exactly one ``Done`` or ``Failed``. The model load runs in
    :class:`~engine.lifecycle.ModelLoader`; what workers report is handled in
    :mod:`engine.worker_hooks` and the read side (``status()``, statistics) is
    :mod:`engine.inspection`.
    """

    def __init__(
        self,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        shared_cache: SharedAnswerCache | None = None,
    ) -> None:
        self.config = config
        self._observer = observer
        self._stats = EngineStats()
        self._cache = AnswerCache(config.cache_ttl_s, config.cache_max_bytes)
        self._answers = TieredAnswers(
            self._cache,
            shared_cache,
            timeout_s=config.shared_cache_timeout_s,
            on_lookup=observer.on_cache_lookup if observer is not None else None,
        )
        self._vision = VisionFeatures(
            VisionCache(
                config.vision_cache_bytes,
                config.vision_cache_ttl_s,
                on_lookup=observer.on_vision_cache_lookup if observer is not None else None,
                on_bytes=observer.on_vision_cache_bytes if observer is not None else None,
            )
        )
        self._batcher = Batcher(
            capacity=config.queue_size,
            max_batch=config.max_batch,
            wait_s=config.batch_wait_ms / 1000.0,
            retry_after_s=config.busy_retry_after_s,
            on_depth=observer.on_queue_depth if observer is not None else None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: Dispatcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._workers: list[Worker] = []
        self._retired: list[Worker] = []
        self._model_name = config.model
        self._dtype = ""
        self._limits = ImageLimits(max_pixels=config.limits.max_image_pixels)
        self._ready = False
        self._closing = False
        self._reason: str | None = "starting"
        self._live: set[Job] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._swap_lock = asyncio.Lock()
        self._worker_seq = 0
        self._progress: LoadProgress | None = None
        self._loader = ModelLoader(config, self._vision)

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the model on every device off the loop, warm it up, start the workers.

        May be called again after it failed (the bridge's ``--model-load-retry``). The load runs
        on a daemon thread, so a process that stops meanwhile is never held by it: :meth:`stop`
        cancels it at its next step (see :mod:`engine.lifecycle` and :mod:`engine.progress`).

        Raises:
            EngineError: code ``internal`` when the model cannot be loaded (the message is one
                line; for :class:`~engine.loading.ModelUnavailable` it says what to do), or
                ``cancelled`` when :meth:`stop` cancelled the load.
        """
        self._loop = asyncio.get_running_loop()
        self._answers.bind(self._loop)
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self._loop)
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(
                max_workers=self.config.decode_threads, thread_name_prefix="engine-decode"
            )
        progress = self._progress = LoadProgress(self.config.model)
        self._reason = "loading model"
        try:
            replicas = await self._loader.load_in_thread(progress)
        except LoadCancelled as exc:
            self._reason = "stopped"
            raise EngineError("cancelled", str(exc)) from exc
        except ModelUnavailable as exc:
            self._reason = f"model load failed: {exc}"
            log.debug("engine.start_failed", model=self.config.model, error=str(exc))
            raise EngineError("internal", str(exc)) from exc
        except Exception as exc:
            self._reason = f"model load failed: {exc}"
            log.debug("engine.start_failed", model=self.config.model, error=str(exc))
            message = f"cannot load model {self.config.model!r}: {exc}"
            raise EngineError("internal", message) from exc
        finally:
            self._progress = None
        self._install(replicas, self.config.model)
        self._ready = True
        self._reason = None
        log.info(
            "engine.ready",
            model=self._model_name,
            workers=len(self._workers),
            devices=[w.replica.device for w in self._workers],
            dtype=self._dtype,
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new jobs, let running ones finish within ``grace_s``, cancel the rest.

        A model load still in progress is cancelled (see
        :meth:`engine.lifecycle.ModelLoader.abandon`).
        """
        if self._closing:
            return
        self._closing = True
        self._ready = False
        self._reason = "stopping"
        await self._loader.abandon(grace_s)
        if self._live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        for job in list(self._live):
            if job.fail("cancelled", "the engine stopped before the job finished"):
                self._batcher.discard(job)
        self._batcher.close()
        workers = self._workers + self._retired
        for worker in workers:
            worker.retire()
        await asyncio.to_thread(join_all, workers, max(grace_s, 1.0))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._answers.cancel_pending()
        for worker in workers:
            worker.replica.close()
        self._reason = "stopped"
        log.info("engine.stopped", model=self._model_name)

    @property
    def load_abandoned(self) -> bool:
        """True once :meth:`stop` gave up waiting for a model load that ignored its cancel."""
        return self._loader.abandoned

    def _install(self, replicas: list[Replica], model: str) -> None:
        """Start workers for ``replicas`` and make them the ones serving new batches."""
        assert self._dispatcher is not None
        workers = []
        for replica in replicas:
            self._worker_seq += 1
            mode, reason = choose_batching(self.config.batching, replica)
            if reason is not None and self.config.batching == "continuous":
                log.warning("engine.continuous_unsupported", model=model, reason=reason)
            worker = Worker(
                f"w{self._worker_seq}-{replica.device}",
                replica,
                self._batcher,
                self._dispatcher,
                self,
                batching="continuous" if mode == "continuous" else "static",
            )
            log.info("engine.batching", worker=worker.worker_id, mode=mode, reason=reason)
            workers.append(worker)
        first = replicas[0]
        self._limits = ImageLimits(
            max_pixels=self.config.limits.max_image_pixels,
            pixel_budget=first.pixel_budget,
            min_short_edge=first.min_short_edge,
        )
        off = self._vision.install(replicas, model)
        if off is not None:
            log.warning("engine.vision_cache_off", model=model, reason=off)
        else:
            log.info("engine.vision_cache", model=model, enabled=self._vision.context is not None)
        self._model_name = model
        self._dtype = str(first.dtype).removeprefix("torch.")
        self._workers = workers
        for worker in workers:
            worker.start()

    async def swap_model(self, model: str) -> None:
        """Load ``model`` in the background while serving, then switch to it atomically.

        Batches already running finish on the old model; waiting jobs run on the new one. On a
        load failure the old model keeps serving.

        Raises:
            EngineError: code ``internal`` when the new model cannot be loaded.
        """
        if not self._ready:
            raise EngineError("internal", "the engine is not running")
        async with self._swap_lock:
            log.info("engine.swap_started", old=self._model_name, new=model)
            try:
                replicas = await asyncio.to_thread(self._loader.load, model)
            except Exception as exc:
                log.error("engine.swap_failed", old=self._model_name, new=model, error=str(exc))
                raise EngineError("internal", f"cannot load model {model!r}: {exc}") from exc
            old = self._workers
            self._install(replicas, model)
            self._answers.clear()
            self._retired.extend(old)
            for worker in old:
                worker.retire()
            self._spawn(self._reap(old))
            log.info("engine.swap_done", model=model)

    async def _reap(self, workers: list[Worker]) -> None:
        """Wait for retired workers to finish their batches, then free their models."""
        while not await asyncio.to_thread(join_all, workers, 1.0):
            pass
        for worker in workers:
            worker.replica.close()
            if worker in self._retired:
                self._retired.remove(worker)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------------------------- jobs

    def submit(self, request: JobRequest) -> Handle:
        """Accept a job; its events start with ``Queued``. Call from the event loop thread.

        Raises:
            BusyError: the queue is full (or the engine is not ready / stopping).
            EngineError: ``bad_request`` or ``too_large`` for requests that can never run.
        """
        if not self._ready or self._closing or self._loop is None or self._dispatcher is None:
            raise BusyError("the engine is not ready", self.config.busy_retry_after_s)
        max_tokens, timeout = admit(request, self.config)
        position = self._batcher.reserve()
        job = Job(request, max_tokens, timeout, self._dispatcher, self._on_terminal)
        job.on_closed = self._on_closed
        self._live.add(job)
        self._idle.clear()
        job.deliver(Queued(position))
        job.timer = self._loop.call_later(timeout, self._expire, job)
        assert self._decode_pool is not None
        self._decode_pool.submit(
            self._prepare, job, self._limits, self._model_name, self._vision.context
        )
        log.debug("engine.job_queued", job_id=job.job_id, position=position)
        return Handle(job, self._cancel)

    def _prepare(
        self, job: Job, limits: ImageLimits, model: str, vision: VisionContext | None = None
    ) -> None:
        """Decode thread: answer from the cache, or find the image's features in the vision
        cache, or decode the image, then queue the job."""
        try:
            if job.finished:
                self._batcher.release()
                return
            if self._answers.enabled:
                job.cache_key = cache_key(
                    bytes(job.request.image), job.request.prompt, job.max_tokens, model
                )
                answer, tier = self._answers.get(job.cache_key)
                if job.finished:  # cancelled or timed out while the shared tier answered
                    self._batcher.release()
                    return
                if answer is not None:
                    log.debug("engine.job_cached", job_id=job.job_id, tier=tier)
                    self._batcher.release()
                    job.started = True
                    job.emit(Started())
                    job.advance(answer.text)
                    job.prompt_tokens = answer.prompt_tokens
                    job.completion_tokens = answer.completion_tokens
                    job.succeed(cached=True)
                    return
            data = bytes(job.request.image)
            if vision is not None:
                job.vision = self._vision.lookup(data, vision)
                if job.vision.features is not None:  # straight to prefill with these
                    log.debug("engine.vision_cache_hit", job_id=job.job_id)
                    job.reload = lambda: load_image(data, limits)
                    self._batcher.push(job)
                    return
            job.image = load_image(data, limits)
        except EngineError as exc:
            self._batcher.release()
            job.fail(exc.code, exc.message)
            log.info("engine.job_refused", job_id=job.job_id, code=exc.code, reason=exc.message)
            return
        except Exception as exc:
            self._batcher.release()
            job.fail("internal", f"image preparation failed: {type(exc).__name__}")
            log.exception("engine.prepare_failed", job_id=job.job_id)
            return
        self._batcher.push(job)

    def _cancel(self, job: Job) -> None:
        if job.fail("cancelled", "the job was cancelled"):
            self._batcher.discard(job)
            log.info("engine.job_cancelled", job_id=job.job_id)

    def _expire(self, job: Job) -> None:
        job.timer = None
        if job.fail("timeout", "the job did not finish within its deadline"):
            self._batcher.discard(job)
            log.info("engine.job_timeout", job_id=job.job_id)

    def _on_terminal(self, job: Job, event: Done | Failed) -> None:
        """Any thread: the job's outcome is decided."""
        seconds = time.monotonic() - job.submitted_at
        if isinstance(event, Done):
            outcome = "cached" if event.cached else "done"
            tokens = 0 if event.cached else job.completion_tokens
        else:
            outcome, tokens = event.code, job.completion_tokens
        if self._observer is not None:
            self._observer.on_job_end(outcome, tokens, seconds)

    def _on_closed(self, job: Job) -> None:
        """Loop: the terminal event was delivered."""
        self._live.discard(job)
        if not self._live:
            self._idle.set()

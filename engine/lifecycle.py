"""The model's load path for the engine: one replica per device loaded on a daemon thread that a
stopping process can cancel or abandon, kept apart from job handling so each is read alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid

import structlog

from engine.batching_mode import choose_batching
from engine.config import EngineConfig
from engine.continuous import warmup_continuous
from engine.devices import resolve_devices
from engine.model import Replica
from engine.progress import LOG_EVERY_S, LoadCancelled, LoadProgress
from engine.vision import VisionFeatures
from engine.worker import Worker

log = structlog.get_logger(__name__)


class ModelLoader:
    """Loads the replicas of a model for one :class:`~engine.engine.Engine`.

    :meth:`load` runs on any thread; :meth:`load_in_thread` runs it on a daemon thread and
    :meth:`abandon` cancels that load, giving up on it (:attr:`abandoned`) after a grace period.
    """

    def __init__(self, config: EngineConfig, vision: VisionFeatures) -> None:
        self.config = config
        self._vision = vision
        self._thread: threading.Thread | None = None
        self._result: asyncio.Future[list[Replica]] | None = None
        self._progress: LoadProgress | None = None
        self.abandoned = False

    def load(self, model: str, progress: LoadProgress | None = None) -> list[Replica]:
        """Load one replica per device (worker thread); close what was loaded if any fails."""
        replicas: list[Replica] = []
        tag = f"{model}#{uuid.uuid4().hex[:12]}"  # this load's features are its own
        try:
            for device in resolve_devices(self.config.device, self.config.device_map):
                replica = Replica.load(
                    model,
                    device,
                    self.config.dtype,
                    self.config.device_map,
                    self.config.ignore_eos,
                    progress=progress,
                )
                replicas.append(replica)
                self._vision.attach(replica, tag)
                if self.config.warmup:
                    if progress is not None:
                        progress.set_phase("warming up", device)
                    replica.warmup()
                    if choose_batching(self.config.batching, replica)[0] == "continuous":
                        warmup_continuous(replica)
        except BaseException:
            for replica in replicas:
                replica.close()
            raise
        return replicas

    async def load_in_thread(self, progress: LoadProgress) -> list[Replica]:
        """Run :meth:`load` of the configured model on a daemon thread, logging progress every
        few seconds.

        Why not ``asyncio.to_thread``: the loop's default executor is joined when the loop closes,
        so a load stuck in a network call would keep a stopping process alive.
        """
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[Replica]] = loop.create_future()

        def deliver(outcome: list[Replica] | BaseException) -> None:
            if result.done():
                return
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def run() -> None:
            outcome: list[Replica] | BaseException
            try:
                outcome = self.load(self.config.model, progress)
                if progress.cancelled:  # loaded after all, but nobody wants it any more
                    for replica in outcome:
                        replica.close()
                    outcome = LoadCancelled(f"the load of {self.config.model!r} was cancelled")
            except BaseException as exc:  # delivered to the awaiting coroutine
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                loop.call_soon_threadsafe(deliver, outcome)

        thread = threading.Thread(target=run, name="engine-load", daemon=True)
        self._thread, self._result, self._progress = thread, result, progress
        thread.start()
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=LOG_EVERY_S)
                if done:
                    return result.result()
                progress.maybe_log()
        except asyncio.CancelledError:
            progress.cancel()
            raise

    async def abandon(self, grace_s: float) -> None:
        """Cancel a load in progress and wait up to ``grace_s`` for its thread to end.

        A load blocked inside a network call or a single huge read cannot see the cancel flag;
        then :attr:`abandoned` is set and the caller exits without waiting for it.
        """
        thread, result, progress = self._thread, self._result, self._progress
        if thread is None or result is None or result.done() or not thread.is_alive():
            return
        if progress is not None:
            progress.cancel()
        await asyncio.wait({result}, timeout=grace_s)
        if not result.done():
            self.abandoned = True
            log.error(
                "engine.load_abandoned",
                model=self.config.model,
                progress=progress.describe() if progress is not None else None,
                grace_s=grace_s,
                error="the model load did not stop within the grace period; "
                "the process exits without waiting for it",
            )
        else:
            log.info("engine.load_cancelled", model=self.config.model)


def join_all(workers: list[Worker], timeout: float) -> bool:
    """Join every worker thread within ``timeout`` seconds in all; True when all ended."""
    deadline = time.monotonic() + timeout
    ok = True
    for worker in workers:
        ok = worker.join(max(0.0, deadline - time.monotonic())) and ok
    return ok

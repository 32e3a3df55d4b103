"""The engine's read side: its status snapshot, its statistics and the caches and workers it
exposes for inspection, apart from the code that changes them (:mod:`engine.engine`)."""

from __future__ import annotations

from engine.batcher import Batcher
from engine.cache import AnswerCache
from engine.config import EngineConfig
from engine.progress import LoadProgress
from engine.shared_cache import TieredAnswers
from engine.stats import EngineStats
from engine.types import EngineStatus
from engine.vision import VisionFeatures
from engine.vision_cache import VisionCache
from engine.worker import Worker


class EngineInspection:
    """Mixin of :class:`~engine.engine.Engine`: everything that reads its state for metrics,
    ``/readyz``, the dashboard, tests and benchmarks."""

    config: EngineConfig
    _workers: list[Worker]
    _batcher: Batcher
    _stats: EngineStats
    _cache: AnswerCache
    _answers: TieredAnswers
    _vision: VisionFeatures
    _progress: LoadProgress | None
    _model_name: str
    _dtype: str
    _reason: str | None
    _ready: bool
    _closing: bool

    def status(self) -> EngineStatus:
        """A snapshot for metrics, ``/readyz`` and the dashboard."""
        memory: dict[str, int] = {}
        for worker in self._workers:
            memory.update(worker.replica.memory())
        progress = self._progress
        reason = self._reason
        if progress is not None and not self._ready and not self._closing:
            reason = progress.describe()
        return EngineStatus(
            ready=self._ready,
            model=self._model_name,
            dtype=self._dtype,
            workers=tuple(w.status() for w in self._workers),
            queue_depth=self._batcher.depth,
            queue_capacity=self.config.queue_size,
            batch_sizes=self._stats.batch_sizes(),
            tokens_per_s=self._stats.tokens_per_s(),
            gpu_memory=memory,
            reason=reason,
            loading=progress.snapshot() if progress is not None else None,
            vision_cache=self._vision.status(),
        )

    @property
    def cache(self) -> AnswerCache:
        """The local answer cache (for inspection)."""
        return self._cache

    @property
    def vision_cache(self) -> VisionCache:
        """The vision-feature cache (for inspection)."""
        return self._vision.cache

    @property
    def answers(self) -> TieredAnswers:
        """Both answer cache tiers, with lookup counts by tier (for inspection)."""
        return self._answers

    def reset_stats(self) -> None:
        """Start the batch-size, token-rate and occupancy figures afresh (benchmarks)."""
        self._stats = EngineStats()

    @property
    def slot_occupancy(self) -> float:
        """Share of computed decode row-steps that served a live row (1.0 = no padding waste)."""
        return self._stats.slot_occupancy()

    @property
    def live_rows_per_step(self) -> float:
        """Mean rows producing a token per decode step: the batch size decode really ran at."""
        return self._stats.live_rows_per_step()

    @property
    def batching(self) -> str:
        """The batching mode the serving workers run (``static`` or ``continuous``)."""
        return self._workers[0].batching if self._workers else "static"

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The workers serving new batches."""
        return tuple(self._workers)

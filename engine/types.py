"""The engine's public vocabulary: job requests, the events a job yields, status, error codes.

Nothing here knows about WebSockets or IM platforms; the bridge translates these into frames.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ErrorCode = Literal[
    "bad_image", "too_large", "busy", "cancelled", "timeout", "internal", "bad_request"
]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One unit of work: an image, a prompt and limits.

    Attributes:
        job_id: caller-chosen id, unique among the caller's live jobs (used in logs and events).
        image: the raw encoded image bytes (JPEG, PNG, ...); decoded by the engine off the loop.
        prompt: the user's question about the image.
        max_tokens: cap on generated tokens; ``None`` means the engine's ``max_new_tokens``.
        timeout_s: per-job deadline from submission; ``None`` means the engine default.
    """

    job_id: str
    image: bytes
    prompt: str
    max_tokens: int | None = None
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """The job waits in the queue; ``position`` 0 means it is next."""

    position: int
    kind: Literal["queued"] = "queued"


@dataclass(frozen=True, slots=True)
class Started:
    """The job entered a batch on a worker."""

    kind: Literal["started"] = "started"


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece of the answer; all deltas of a job concatenate to its ``Done.text``."""

    text: str
    kind: Literal["delta"] = "delta"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one finished job."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Done:
    """The job finished; ``text`` is the whole answer."""

    text: str
    usage: Usage
    cached: bool = False
    kind: Literal["done"] = "done"


@dataclass(frozen=True, slots=True)
class Failed:
    """The job ended with an error (``code`` is one of :data:`ErrorCode`)."""

    code: str
    message: str
    retry_after: float | None = None
    kind: Literal["error"] = "error"


JobEvent = Queued | Started | Delta | Done | Failed
TERMINAL_KINDS = frozenset({"done", "error"})


class EngineError(Exception):
    """A job could not be accepted; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BusyError(EngineError):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str = "engine queue is full", retry_after: float = 1.0) -> None:
        super().__init__("busy", message, retry_after)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One replica of the model on one device."""

    worker_id: str
    device: str
    alive: bool
    busy: bool
    jobs_in_flight: int
    jobs_done: int


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """A point-in-time snapshot for metrics, ``/readyz`` and the dashboard."""

    ready: bool
    model: str
    dtype: str
    workers: tuple[WorkerStatus, ...]
    queue_depth: int
    queue_capacity: int
    batch_sizes: dict[int, int] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    gpu_memory: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    #: While the model loads: phase, shards, bytes, weights, elapsed (``engine.loading``).
    loading: dict[str, Any] | None = None
    #: The vision-feature cache: enabled, reason when off, entries, bytes, hits, misses.
    vision_cache: dict[str, Any] | None = None


class JobHandle(Protocol):
    """A submitted job: iterate its events (ending in exactly one Done or Failed), or cancel it."""

    job_id: str

    def events(self) -> AsyncIterator[JobEvent]: ...

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the bridge needs of an engine; the real ``engine.Engine`` and test fakes honour it."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 10.0) -> None: ...

    def submit(self, request: JobRequest) -> JobHandle:
        """Accept a job or raise :class:`EngineError` (``busy``, ``too_large``...) at once."""
        ...

    def status(self) -> EngineStatus: ...


class EngineObserver(Protocol):
    """Hooks the engine calls so the bridge can export metrics without knowing Prometheus.

    Calls come from worker threads as well as the event loop; implementations must be thread-safe
    and fast (Prometheus client objects are).
    """

    def on_batch(self, size: int) -> None:
        """A generate call started with ``size`` jobs."""
        ...

    def on_job_end(self, outcome: str, completion_tokens: int, seconds: float) -> None:
        """A job ended: ``outcome`` is ``done``, ``cached`` or an error code."""
        ...

    def on_queue_depth(self, depth: int) -> None:
        """The number of waiting jobs changed."""
        ...

    def on_batch_isolated(self, stage: str, jobs: int) -> None:
        """A batch failed (not out of memory) at ``stage`` (``generate``, ``prefill`` or
        ``decode``); its ``jobs`` unfinished jobs are rerun one by one."""
        ...

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        """The answer cache's ``tier`` (``local`` or ``shared``) was asked; ``hit`` if it knew."""
        ...

    def on_vision_cache_lookup(self, hit: bool) -> None:
        """A job's image was looked up in the vision-feature cache; ``hit`` if its features were
        there (decode, preprocessing and the vision tower are skipped)."""
        ...

    def on_vision_cache_bytes(self, size: int) -> None:
        """The vision-feature cache now holds ``size`` bytes."""
        ...

"""The engine: an in-process vision-language model worker pool with dynamic batching.

It takes jobs (image bytes, prompt, limits) and yields events; it knows nothing of WebSockets or
IM platforms.
"""

from engine.config import EngineConfig
from engine.engine import Engine
from engine.job import Handle
from engine.types import (
    BusyError,
    Delta,
    Done,
    EngineError,
    EngineObserver,
    EngineStatus,
    Failed,
    JobEvent,
    JobRequest,
    Queued,
    Started,
    Usage,
    WorkerStatus,
)

__all__ = [
    "BusyError",
    "Delta",
    "Done",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineStatus",
    "Failed",
    "Handle",
    "JobEvent",
    "JobRequest",
    "Queued",
    "Started",
    "Usage",
    "WorkerStatus",
]

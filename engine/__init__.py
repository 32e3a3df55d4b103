"""The engine: an in-process vision-language model worker pool with dynamic batching.

It takes jobs (image bytes, prompt, limits) and yields events; it knows nothing of WebSockets or
IM platforms. ``Engine`` is imported lazily so that code needing only the vocabulary
(``engine.types``, fakes in tests) does not pay for importing torch and transformers.
"""

from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig
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

if TYPE_CHECKING:
    from engine.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


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

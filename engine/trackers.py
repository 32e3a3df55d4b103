"""tqdm stand-ins that feed the active :class:`~engine.progress.LoadProgress` from transformers'
and the hub's progress bars, and check its cancel flag at every step of a load."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from engine.progress import LoadProgress

_active_lock = threading.Lock()
_active: LoadProgress | None = None


@contextlib.contextmanager
def tracking(progress: LoadProgress) -> Iterator[None]:
    """Feed ``progress`` from transformers' progress bars while the block runs.

    transformers' bars (e.g. "Loading weights") go through its tqdm hook, which is installed once
    and looks up the progress active now; the hub's download bars are replaced by passing
    :class:`DownloadTracker` as ``tqdm_class``. One load runs at a time per process.
    """
    global _active
    _install_hook()
    with _active_lock:
        previous, _active = _active, progress
    try:
        yield
    finally:
        with _active_lock:
            _active = previous


def _current() -> LoadProgress | None:
    with _active_lock:
        return _active


_hook_installed = False


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:  # transformers >= 5
        set_hook(_tqdm_hook)
    _hook_installed = True


def _tqdm_hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    progress = _current()
    if progress is None:
        return factory(*args, **kwargs)
    return WeightsTracker(progress, *args, **kwargs)


class WeightsTracker:
    """A tqdm stand-in for transformers' loops: counts the "Loading weights" items done.

    Bars of other loops are iterated without counting; every item checks the cancel flag.
    """

    def __init__(
        self,
        progress: LoadProgress,
        iterable: Iterable[Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._progress = progress
        self._iterable = iterable
        desc = str(kwargs.get("desc") or "")
        self._counts = not desc or "weight" in desc.lower()
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        progress.check()
        if total and self._counts:
            progress.set_weights_total(int(total))

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items (and stop here if the load was cancelled)."""
        if self._counts:
            self._progress.advance_weights(int(n))
        else:
            self._progress.check()

    def __enter__(self) -> WeightsTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        """Nothing to release."""

    def __getattr__(self, name: str) -> Any:
        # set_description, set_postfix, refresh, ...: accepted and ignored.
        return lambda *args, **kwargs: None


class DownloadTracker:
    """A tqdm stand-in for the hub's per-file download bars (pass the class as ``tqdm_class``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._progress = _current()
        total = kwargs.get("total") or 0
        if self._progress is not None:
            self._progress.check()
            self._progress.add_download(int(total) - int(kwargs.get("initial") or 0))
        self._closed = False

    def update(self, n: float | None = 1) -> None:
        """``n`` more bytes arrived."""
        if self._progress is not None and n:
            self._progress.advance_download(int(n))

    def close(self) -> None:
        """The file is complete (or abandoned)."""
        if self._progress is not None and not self._closed:
            self._closed = True
            self._progress.file_downloaded()

    def __enter__(self) -> DownloadTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def get_lock(cls) -> threading.RLock:
        """tqdm's class lock API, used by the hub's thread pools."""
        return _TRACKER_LOCK

    @classmethod
    def set_lock(cls, lock: Any) -> None:
        """tqdm's class lock API; the trackers need no shared lock."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


_TRACKER_LOCK = threading.RLock()

"""How far one model load has got (:class:`LoadProgress`) and how it is cancelled: the figures
``/readyz`` and the dashboard show while a model loads, apart from finding the model."""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Seconds between two progress log lines while nothing else happens.
LOG_EVERY_S = 5.0


class LoadCancelled(Exception):
    """The load was cancelled (the process is stopping); nothing of it is kept."""


class LoadProgress:
    """How far one model load has got; written by the loading thread, read from any thread.

    ``cancel()`` asks the load to stop: the next tracker update raises :class:`LoadCancelled`.
    """

    def __init__(self, model: str, clock: Any = time.monotonic) -> None:
        self.model = model
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.phase = "starting"
        self.device: str | None = None
        self.shards = 0
        self.checkpoint_bytes = 0
        self.download_total = 0
        self.downloaded = 0
        self.files_downloaded = 0
        self.weights_done = 0
        self.weights_total = 0
        self._last_log = float("-inf")

    # --- written by the loader ------------------------------------------------------------------
    def set_phase(self, phase: str, device: str | None = None) -> None:
        """Enter a new step of the load and log it; raises :class:`LoadCancelled` if cancelled."""
        self.check()
        with self._lock:
            self.phase = phase
            if device is not None:
                self.device = device
        self.log_now()

    def set_checkpoint(self, shards: int, total_bytes: int) -> None:
        """Record the checkpoint's weight files (count and bytes) once they are known."""
        with self._lock:
            self.shards, self.checkpoint_bytes = shards, total_bytes

    def add_download(self, total: int) -> None:
        """A file download of ``total`` bytes starts."""
        with self._lock:
            self.download_total += max(0, total)
            if self.phase != "downloading":
                self.phase = "downloading"

    def advance_download(self, n: int) -> None:
        """``n`` more bytes arrived."""
        self.check()
        with self._lock:
            self.downloaded += max(0, n)
        self.maybe_log()

    def file_downloaded(self) -> None:
        """A file download finished (logged: one line per file)."""
        with self._lock:
            self.files_downloaded += 1
        self.log_now()

    def set_weights_total(self, total: int) -> None:
        """Materialising ``total`` weights starts."""
        with self._lock:
            self.weights_total, self.weights_done = max(0, total), 0
            self.phase = "loading weights"

    def advance_weights(self, n: int) -> None:
        """``n`` more weights are in place."""
        self.check()
        with self._lock:
            self.weights_done += max(0, n)
        self.maybe_log()

    # --- cancellation ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the load to stop at its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise :class:`LoadCancelled` when the load was cancelled."""
        if self._cancel.is_set():
            raise LoadCancelled(f"the load of {self.model!r} was cancelled")

    # --- read by anyone -------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        """Seconds since the load started."""
        return float(self._clock() - self.started)

    def snapshot(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict, with ``text`` the one-line summary."""
        with self._lock:
            data: dict[str, Any] = {
                "model": self.model,
                "phase": self.phase,
                "device": self.device,
                "shards": self.shards,
                "checkpoint_bytes": self.checkpoint_bytes,
                "downloaded_bytes": self.downloaded,
                "download_total_bytes": self.download_total,
                "files_downloaded": self.files_downloaded,
                "weights_done": self.weights_done,
                "weights_total": self.weights_total,
                "elapsed_s": round(self.elapsed_s, 1),
            }
        data["text"] = _describe(data)
        return data

    def describe(self) -> str:
        """One line for ``/readyz``: ``loading model 'x': loading weights 10/20 (50%), 3.1 s``."""
        return str(self.snapshot()["text"])

    def log_now(self) -> None:
        """Log the progress as ``engine.load_progress`` now."""
        data = self.snapshot()
        self._last_log = self._clock()
        log.info("engine.load_progress", **{k: v for k, v in data.items() if k != "text"})

    def maybe_log(self) -> None:
        """Log the progress unless a line went out less than :data:`LOG_EVERY_S` ago."""
        if self._clock() - self._last_log >= LOG_EVERY_S:
            self.log_now()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover - the loop always returns


def _describe(d: dict[str, Any]) -> str:
    parts = [str(d["phase"]) + (f" on {d['device']}" if d["device"] else "")]
    if d["phase"] == "downloading" and d["download_total_bytes"]:
        pct = 100 * d["downloaded_bytes"] / d["download_total_bytes"]
        total = _size(d["download_total_bytes"])
        parts[0] += f" {_size(d['downloaded_bytes'])}/{total} ({pct:.0f}%)"
    elif d["phase"] == "loading weights" and d["weights_total"]:
        pct = 100 * d["weights_done"] / d["weights_total"]
        parts[0] += f" {d['weights_done']}/{d['weights_total']} ({pct:.0f}%)"
    if d["shards"]:
        noun = "shard" if d["shards"] == 1 else "shards"
        parts.append(f"{d['shards']} {noun}, {_size(d['checkpoint_bytes'])}")
    parts.append(f"{d['elapsed_s']:.1f} s")
    return f"loading model {d['model']!r}: " + ", ".join(parts)

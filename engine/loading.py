"""Where a model comes from, how far its load has got, and how a load is abandoned.

Why this module exists: ``from_pretrained`` is one long blocking call. Left alone it hides what it
is doing for minutes (progress bars are off in a service), retries an unreachable hub for about two
minutes per file, and cannot be interrupted. Here we

* classify ``--model`` before loading (:func:`local_model_problem`, :func:`resolve_model`): the
  built-in ``tiny``, a local folder, or a Hugging Face id, which is looked up in the local cache
  and, unless ``HF_HUB_OFFLINE`` is set, checked with one quick hub request, so a model that
  cannot be fetched fails at once with one line saying what to do (:class:`ModelUnavailable`);
* count progress (:class:`LoadProgress`): checkpoint shards and bytes, bytes downloaded, weights
  materialised, elapsed seconds, fed by tqdm-compatible trackers that replace transformers' and the
  hub's progress bars (:func:`tracking`);
* let a load be cancelled: every tracker update checks :meth:`LoadProgress.cancel`'s flag and
  raises :class:`LoadCancelled`, which unwinds ``from_pretrained`` at its next step.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Seconds between two progress log lines while nothing else happens.
LOG_EVERY_S = 5.0

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


class ModelUnavailable(Exception):
    """The model cannot be loaded for a reason the operator must fix.

    The message is one line that names the model and says what to do.
    """


class LoadCancelled(Exception):
    """The load was cancelled (the process is stopping); nothing of it is kept."""


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face model id (``name`` or ``org/name``)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def local_model_problem(name: str) -> str | None:
    """Why ``name`` can never be loaded, judged from the file system alone (None: it may load).

    A path that does not exist is a configuration error, found before anything starts: a value
    that is absolute, starts with ``.`` or ``~``, or is not shaped like a hub id must be a folder.
    """
    if name == "tiny":
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{name!r} is a folder without config.json, not a model folder"
        return None
    if path.exists():
        return f"{name!r} is a file; give the model's folder"
    if name.startswith(("/", ".", "~")) or not looks_like_repo_id(name):
        return f"{name!r}: no such model folder (and not a Hugging Face id like 'org/name')"
    return None


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where to load a model from: a local folder, or a hub id to load from the hub or its cache.

    Attributes:
        name: the value of ``--model``.
        path: what to pass to ``from_pretrained`` (a folder or the hub id).
        local_files_only: load from the cache without asking the hub.
    """

    name: str
    path: str
    local_files_only: bool = False


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


# --- trackers: tqdm stand-ins that feed the active LoadProgress ---------------------------------

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


# --- resolving a model name ---------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: ``*.safetensors``, else ``*.bin``."""
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin")


def _record_folder(progress: LoadProgress, folder: Path) -> None:
    files = checkpoint_files(folder)
    progress.set_checkpoint(len(files), sum(f.stat().st_size for f in files))


def resolve_model(
    name: str, progress: LoadProgress, hub_timeout_s: float | None = None
) -> ModelSource:
    """Decide where ``name`` loads from, recording the checkpoint size in ``progress``.

    ``tiny`` and local folders load as they are. A hub id loads from the local cache when the hub
    is offline or unreachable and the model is cached; otherwise one quick request to the hub
    checks that the model exists and tells the download size.

    Raises:
        ModelUnavailable: the name is no model folder, or a hub id that is neither cached nor
            fetchable now; the message says what to do.
        LoadCancelled: the load was cancelled meanwhile.
    """
    if name == "tiny":
        from engine.tiny import ensure_tiny_model

        progress.set_phase("building the tiny model")
        folder = Path(ensure_tiny_model())
        _record_folder(progress, folder)
        return ModelSource(name, str(folder))
    problem = local_model_problem(name)
    if problem is not None:
        raise ModelUnavailable(problem)
    path = Path(name).expanduser()
    if path.is_dir():
        _record_folder(progress, path)
        return ModelSource(name, str(path))
    return _resolve_hub(name, progress, hub_timeout_s)


def _resolve_hub(name: str, progress: LoadProgress, timeout_s: float | None) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    folder = Path(cached).parent if isinstance(cached, str) else None
    todo = (
        f"download it first (`hf download {name}`) where there is network, point HF_HOME at a "
        "cache that has it, or pass a local model folder to --model"
    )
    if constants.HF_HUB_OFFLINE:
        if folder is None:
            raise ModelUnavailable(
                f"model {name!r} is not a local folder and not in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE is set; {todo}"
            )
        _record_folder(progress, folder)
        return ModelSource(name, name, local_files_only=True)
    progress.set_phase("asking the hub")
    try:
        info = _model_info(name, timeout_s or float(constants.HF_HUB_ETAG_TIMEOUT))
    except ModelUnavailable:
        raise
    except Exception as exc:  # connection refused, DNS, timeout, HTTP 5xx: the hub is unreachable
        progress.check()
        reason = _one_line(exc)
        if folder is not None:
            log.warning("engine.hub_unreachable_using_cache", model=name, error=reason)
            _record_folder(progress, folder)
            return ModelSource(name, name, local_files_only=True)
        raise ModelUnavailable(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({reason}); {todo}, or set HF_HUB_OFFLINE=1 to use only the cache; "
            "--model-load-retry keeps trying"
        ) from None
    progress.check()
    weights = [
        s for s in info.siblings or () if str(s.rfilename).endswith((".safetensors", ".bin"))
    ]
    if any(str(s.rfilename).endswith(".safetensors") for s in weights):
        weights = [s for s in weights if str(s.rfilename).endswith(".safetensors")]
    progress.set_checkpoint(len(weights), sum(int(s.size or 0) for s in weights))
    return ModelSource(name, name)


def _model_info(name: str, timeout_s: float) -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return HfApi().model_info(name, files_metadata=True, timeout=timeout_s)
    except GatedRepoError:
        raise ModelUnavailable(
            f"model {name!r} is gated on the hub: accept its licence on huggingface.co and log in "
            "(`hf auth login`), or pass a local model folder to --model"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"model {name!r} does not exist on the hub (or is private: log in with "
            "`hf auth login`); check the id, or pass a local model folder to --model"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."

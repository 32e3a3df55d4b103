"""Where a model comes from, how far its load has got, and how a load is abandoned.

Why this module exists: ``from_pretrained`` is one long blocking call. Left alone it hides what it
is doing for minutes (progress bars are off in a service), retries an unreachable hub for about two
minutes per file, and cannot be interrupted. Here we

* classify ``--model`` before loading (:func:`local_model_problem`, :func:`resolve_model`): the
  built-in ``tiny``, a local folder, or a Hugging Face id, which is looked up in the local cache
  and, unless ``HF_HUB_OFFLINE`` is set, checked with one quick hub request, so a model that
  cannot be fetched fails at once with one line saying what to do (:class:`ModelUnavailable`);
* count progress (:class:`LoadProgress`, in :mod:`engine.progress`): checkpoint shards and bytes,
  bytes downloaded, weights materialised, elapsed seconds, fed by tqdm-compatible trackers that
  replace transformers' and the hub's progress bars (:func:`tracking`, in :mod:`engine.trackers`);
* let a load be cancelled: every tracker update checks :meth:`LoadProgress.cancel`'s flag and
  raises :class:`LoadCancelled`, which unwinds ``from_pretrained`` at its next step.

This module holds the first point; the names of the other two are re-exported here.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from engine.progress import LOG_EVERY_S, LoadCancelled, LoadProgress
from engine.trackers import DownloadTracker, WeightsTracker, tracking

log = structlog.get_logger(__name__)

#: Progress, cancel and trackers live in engine.progress and engine.trackers; re-exported here.
__all__ = [
    "LOG_EVERY_S",
    "DownloadTracker",
    "LoadCancelled",
    "LoadProgress",
    "ModelSource",
    "ModelUnavailable",
    "WeightsTracker",
    "checkpoint_files",
    "local_model_problem",
    "looks_like_repo_id",
    "resolve_model",
    "tracking",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


class ModelUnavailable(Exception):
    """The model cannot be loaded for a reason the operator must fix.

    The message is one line that names the model and says what to do.
    """


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

"""Logging set-up: structlog everywhere, JSON lines when stdout is not a terminal.

A redaction processor masks any field whose name looks secret and drops raw bytes, so a token or an
image can never reach a log line even if a caller passes one by mistake.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

_SECRET_MARKERS = ("token", "secret", "password", "encrypt_key", "authorization", "cookie")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    if lowered.endswith(("_tokens", "tokens_total")) or lowered in (
        "prompt_tokens",
        "completion_tokens",
        "max_tokens",
        "tokens",
    ):
        return False
    return any(marker in lowered for marker in _SECRET_MARKERS)


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask secret-looking fields and replace bytes with their length."""
    for key, value in list(event.items()):
        if _is_secret_key(key) and value:
            event[key] = "***"
        elif isinstance(value, bytes | bytearray | memoryview):
            event[key] = f"<{len(value)} bytes>"
    return event


Tap = Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]
_taps: list[Tap] = []


def add_tap(tap: Tap) -> None:
    """Let ``tap`` see every event after redaction (the dashboard's recent errors)."""
    _taps.append(tap)


def remove_tap(tap: Tap) -> None:
    """Stop feeding ``tap``."""
    if tap in _taps:
        _taps.remove(tap)


def _run_taps(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for tap in list(_taps):
        try:
            tap(logger, name, dict(event))
        except Exception:  # a broken tap must never break logging
            continue
    return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and the standard library's logging to stdout in one format.

    Args:
        level: debug, info, warning or error.
        fmt: ``json``, ``console``, or ``auto`` (console on a terminal, JSON otherwise).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        _run_taps,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Library chatter that would drown the service's own events.
    for noisy in ("aiohttp.access", "transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    _adopt_library_loggers()


#: Libraries that install their own stderr handler on their root logger.
_SELF_HANDLING = ("huggingface_hub", "transformers")


def _adopt_library_loggers() -> None:
    """Send the hub's and transformers' records through the root handler only, once each.

    Why: ``huggingface_hub`` adds a plain stderr handler to its logger *and* propagates, so every
    hub warning ("Retrying in 4s ...") was printed twice, once plain and once as JSON; transformers
    adds one and does not propagate, so its warnings never reached the JSON log. Both configure
    their logger when first imported or used, so we make them do that now, then take their
    handlers away and let the records propagate to ours.
    """
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils.logging  # noqa: F401 - configures its logger on import
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger()  # runs its one-time set-up (adds the stderr handler)
    for name in _SELF_HANDLING:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True

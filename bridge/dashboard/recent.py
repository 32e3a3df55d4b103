"""A bounded, thread-safe list of the newest errors for the dashboard's "recent errors" panel.

Fill it directly with :meth:`RecentErrors.add`, or add :meth:`RecentErrors.processor` to the
structlog chain (after redaction) so every ``warning``/``error`` log event shows up without
touching call sites.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

_MESSAGE_CHARS = 500
# Log fields worth showing next to an error (ids only, never payloads).
_ID_FIELDS = ("conn_id", "connection_id", "job_id", "message_id", "session", "chat_id", "code")
_LEVELS = frozenset({"warning", "error", "critical", "exception"})


class RecentErrors:
    """Keeps the last ``capacity`` errors, newest first on read."""

    def __init__(self, capacity: int = 200, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._clock = clock
        self._lock = threading.Lock()
        self._items: deque[dict[str, Any]] = deque(maxlen=capacity)

    def add(self, source: str, code: str, message: str, **ids: str | int | None) -> None:
        """Record one error.

        Args:
            source: the part that failed (``hub``, ``engine``, ``feishu``...).
            code: a short machine code (``timeout``, ``bad_signature``...).
            message: a human sentence; cut to 500 characters.
            ids: connection, job or message ids that help find the log lines.
        """
        item: dict[str, Any] = {
            "ts": self._clock(),
            "source": str(source)[:64],
            "code": str(code)[:64],
            "message": str(message)[:_MESSAGE_CHARS],
        }
        item.update({k: v for k, v in ids.items() if v is not None})
        with self._lock:
            self._items.append(item)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` errors, newest first."""
        with self._lock:
            items = list(self._items)
        items.reverse()
        return [dict(i) for i in items[: max(0, limit)]]

    def processor(
        self, _logger: Any, method_name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor that copies warning and error events here and passes them on."""
        level = str(event.get("level") or method_name).lower()
        if level in _LEVELS:
            name = str(event.get("event", "error"))
            source = str(event.get("logger") or "bridge").rsplit(".", 1)[-1]
            detail = event.get("error") or event.get("reason") or name
            ids = {k: str(event[k]) for k in _ID_FIELDS if k in event and k != "code"}
            self.add(source, str(event.get("code") or name), str(detail), **ids)
        return event

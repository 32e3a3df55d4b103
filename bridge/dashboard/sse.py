"""Server-sent events for the dashboard: one snapshot per interval on ``GET /api/events``.

Each stream pushes the page of connections its query string asks for plus the status panels, so a
new client shows up within one interval and a browser never holds more than one page of rows.
Streams end when the session is revoked or expires, and all of them end promptly at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from bridge.dashboard.errors import SECURITY_HEADERS, ApiError

log = structlog.get_logger(__name__)

Snapshot = Callable[[], dict[str, Any]]
StillValid = Callable[[], bool]


def encode_event(event: str, data: Any) -> bytes:
    """One SSE message: ``event:`` and a single-line JSON ``data:`` field."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {text}\n\n".encode()


class EventStreams:
    """Serves and tracks the open SSE streams (bounded in number, stopped on shutdown)."""

    def __init__(self, interval_s: float = 1.0, max_streams: int = 64) -> None:
        self.interval_s = interval_s
        self.max_streams = max_streams
        self._open = 0
        self._stopping = asyncio.Event()

    @property
    def open_streams(self) -> int:
        """How many streams are being served now."""
        return self._open

    async def on_shutdown(self, _app: web.Application) -> None:
        """aiohttp ``on_shutdown`` hook: tell every stream to finish."""
        self._stopping.set()

    async def serve(
        self,
        request: web.Request,
        snapshot: Snapshot,
        still_valid: StillValid,
    ) -> web.StreamResponse:
        """Stream ``snapshot()`` every interval until the client leaves or the session ends.

        Args:
            request: the ``GET /api/events`` request (already authenticated).
            snapshot: builds the next payload; an exception is logged and the stream goes on.
            still_valid: false once the session was revoked or expired (sends ``logout``).

        Raises:
            ApiError: 503 when too many streams are open already.
        """
        if self._open >= self.max_streams:
            raise ApiError(503, "unavailable", "too many dashboard event streams are open")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                **SECURITY_HEADERS,
            }
        )
        self._open += 1
        try:
            await response.prepare(request)
            await response.write(f"retry: {int(self.interval_s * 2000)}\n\n".encode())
            while not self._stopping.is_set():
                if not still_valid():
                    await response.write(encode_event("logout", {"reason": "session ended"}))
                    break
                try:
                    payload = snapshot()
                except Exception:
                    # A failing panel must not blank the page; the next tick tries again.
                    log.exception("dashboard_snapshot_failed")
                    payload = None
                if payload is not None:
                    await response.write(encode_event("snapshot", payload))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_s)
            if self._stopping.is_set():
                await response.write(encode_event("bye", {"reason": "server shutting down"}))
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away; nothing to clean up beyond the counter
        finally:
            self._open -= 1
        return response

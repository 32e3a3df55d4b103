"""The dashboard's view of a running bridge: an ``OpsSource`` over hub, engine and adapters."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from bridge.dashboard.live import engine_status_dict
from bridge.dashboard.recent import RecentErrors
from bridge.dashboard.source import (
    ConnectionPage,
    ConnectionQuery,
    connection_row,
    page_rows,
)
from bridge.dashboard.timeline import Timeline
from bridge.heap import freeze_heap

if TYPE_CHECKING:
    from bridge.app import BridgeApp


class BridgeOpsSource:
    """Reads live state for ``/dashboard`` and ``/api/*``; acts through the hub and the engine."""

    def __init__(self, app: BridgeApp) -> None:
        self._app = app
        self.errors = RecentErrors()
        self.chart = Timeline(clock=app.clock)
        self._frames_seen = 0.0
        self._swap_lock = asyncio.Lock()

    def connections(self, query: ConnectionQuery) -> ConnectionPage:
        return page_rows((connection_row(c) for c in self._app.hub.connections()), query)

    async def kick(self, conn_id: str) -> bool:
        return await self._app.hub.kick(conn_id)

    def engine_status(self) -> dict[str, Any]:
        return engine_status_dict(self._app.engine.status())

    def adapter_statuses(self) -> list[dict[str, Any]]:
        return [a.status().to_dict() for a in self._app.adapters]

    def recent_errors(self, limit: int) -> list[dict[str, Any]]:
        return self.errors.list(limit)

    def timeline(self) -> list[dict[str, Any]]:
        return self.chart.samples()

    def topic_grants(self) -> list[dict[str, Any]]:
        """Each client token's chat-topic patterns, under its label (never the token)."""
        grants = self._app.hub.cfg.grants.by_label()
        return [{"token": label, "patterns": list(grants[label])} for label in sorted(grants)]

    def http_jobs(self) -> dict[str, Any]:
        """The HTTP API's in-flight and recently finished jobs, by token label."""
        return self._app.http_api.jobs.board()

    def count_connections(self) -> int:
        """Open connections now; also feeds the events/s chart from the frames counter."""
        frames = self._app.metrics.ws_frames.labels(direction="out")._value.get()
        delta = int(frames - self._frames_seen)
        self._frames_seen = frames
        if delta > 0:
            self.chart.record_event(delta)
        return len(self._app.hub.connections())

    async def swap_model(self, name: str) -> dict[str, Any]:
        swap = getattr(self._app.engine, "swap_model", None)
        if swap is None:
            raise ValueError("this engine cannot swap models")
        name = name.strip()
        if not name or len(name) > 500 or "\n" in name:
            raise ValueError("a model name must be one non-empty line")
        async with self._swap_lock:
            await swap(name)
        freeze_heap()
        return {"model": self._app.engine.status().model}

"""A ready-made :class:`OpsSource` over callables, so wiring the real bridge is one call.

The composition root passes what it has (``hub.connections``, ``hub.kick``, ``engine.status``,
each adapter's ``status``, ``engine.swap_model``) and this turns their dataclasses into the JSON
rows and dicts the dashboard shows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from bridge.dashboard.recent import RecentErrors
from bridge.dashboard.source import (
    DEFAULT_SLOW_RTT_MS,
    ConnectionPage,
    ConnectionQuery,
    connection_row,
    page_rows,
    to_jsonable,
)
from bridge.dashboard.timeline import Timeline


def engine_status_dict(status: Any) -> dict[str, Any]:
    """An ``engine.types.EngineStatus`` as JSON, with the figures the page shows precomputed.

    Adds ``devices`` (distinct worker devices), ``replicas`` (workers alive / total) and turns
    ``batch_sizes`` keys into strings, as JSON requires.
    """
    data = to_jsonable(status)
    if not isinstance(data, dict):
        return {"status": data}
    workers = data.get("workers") or []
    data["devices"] = sorted({str(w.get("device")) for w in workers if isinstance(w, dict)})
    data["replicas"] = {
        "alive": sum(1 for w in workers if isinstance(w, dict) and w.get("alive")),
        "total": len(workers),
    }
    return data


def adapter_status_dict(name: str, status: Any) -> dict[str, Any]:
    """An adapter's ``AdapterStatus`` (any dataclass or mapping) as JSON, tagged with its name."""
    data = to_jsonable(status)
    if not isinstance(data, dict):
        data = {"state": data}
    return {"name": name, **data}


class LiveOpsSource:
    """An :class:`OpsSource` built from the running bridge's parts.

    Args:
        list_connections: ``hub.connections`` (objects with ``ConnectionInfo``'s attributes).
        kick: ``hub.kick``: closes with 4000, false when the id is unknown.
        engine_status: ``engine.status`` returning an ``EngineStatus``.
        adapters: ``(name, adapter.status)`` pairs, e.g. ``[("feishu", feishu.status)]``.
        swap_model: ``engine.swap_model``; ``None`` refuses swaps with ``ValueError``.
        timeline: the charts' ring buffer (the root feeds and samples it).
        errors: the recent-errors buffer.
        slow_rtt_ms: RTT from which a connection counts as slow.
    """

    def __init__(
        self,
        list_connections: Callable[[], Iterable[Any]],
        kick: Callable[[str], Awaitable[bool]],
        engine_status: Callable[[], Any],
        adapters: Sequence[tuple[str, Callable[[], Any]]] = (),
        swap_model: Callable[[str], Awaitable[Any]] | None = None,
        timeline: Timeline | None = None,
        errors: RecentErrors | None = None,
        slow_rtt_ms: float = DEFAULT_SLOW_RTT_MS,
    ) -> None:
        self._list = list_connections
        self._kick = kick
        self._engine = engine_status
        self._adapters = list(adapters)
        self._swap = swap_model
        self._timeline = timeline
        self._errors = errors
        self._slow_rtt_ms = slow_rtt_ms

    def connections(self, query: ConnectionQuery) -> ConnectionPage:
        """Rows from the hub, filtered, sorted and paged in memory."""
        return page_rows((connection_row(c) for c in self._list()), query, self._slow_rtt_ms)

    async def kick(self, conn_id: str) -> bool:
        """Ask the hub to close the connection with 4000."""
        return await self._kick(conn_id)

    def engine_status(self) -> dict[str, Any]:
        """The engine's status as JSON."""
        return engine_status_dict(self._engine())

    def adapter_statuses(self) -> list[dict[str, Any]]:
        """Every adapter's status; one that fails to answer shows as ``state: unknown``."""
        out: list[dict[str, Any]] = []
        for name, status in self._adapters:
            try:
                out.append(adapter_status_dict(name, status()))
            except Exception as exc:
                out.append({"name": name, "state": "unknown", "last_error": type(exc).__name__})
        return out

    def recent_errors(self, limit: int) -> list[dict[str, Any]]:
        """The newest errors first (empty without an error buffer)."""
        return self._errors.list(limit) if self._errors is not None else []

    def timeline(self) -> list[dict[str, Any]]:
        """The charts' samples (empty without a timeline)."""
        return self._timeline.samples() if self._timeline is not None else []

    async def swap_model(self, name: str) -> dict[str, Any]:
        """Swap the engine's model and report the status after the swap."""
        if self._swap is None:
            raise ValueError("this bridge cannot swap models")
        result = await self._swap(name)
        return {"result": to_jsonable(result)} if result is not None else {}

"""What the dashboard reads and does, as one small JSON-shaped protocol the composition root fills.

The routes never touch the hub, engine or adapters directly: they depend on :class:`OpsSource`, so
tests run against a fake and the wiring stays a few lines. :func:`page_rows` does the server-side
search, sort and paging over plain row dicts, which keeps the page usable with 10 000 connections.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# Fields of a connection row, in the documented order (docs/dashboard.md) plus ``state``.
ROW_FIELDS = (
    "id",
    "session",
    "remote",
    "connected_at",
    "last_pong_at",
    "rtt_ms",
    "topics",
    "sent",
    "received",
    "state",
)
SORT_FIELDS = frozenset(
    {"id", "session", "remote", "connected_at", "last_pong_at", "rtt_ms", "sent", "received"}
    | {"state", "topics"}
)
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_QUERY_CHARS = 200
DEFAULT_SLOW_RTT_MS = 500.0


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    """One page request of the connections table.

    Attributes:
        q: case-insensitive substring matched against id, session, remote, state and topics.
        state: keep only rows in this state (``None``: all).
        sort: the row field to order by (one of :data:`SORT_FIELDS`).
        desc: descending order when true.
        offset: rows to skip after filtering and sorting.
        limit: the most rows to return (1..:data:`MAX_LIMIT`), or None for every row.
    """

    q: str = ""
    state: str | None = None
    sort: str = "connected_at"
    desc: bool = True
    offset: int = 0
    limit: int | None = DEFAULT_LIMIT


@dataclass(slots=True)
class ConnectionPage:
    """One page of connection rows with the totals the header shows.

    Attributes:
        connections: the rows of this page (dicts of :data:`ROW_FIELDS`).
        total: rows matching the filter (before paging).
        counts: aggregates over all connections: ``all``, ``states`` ({state: n}), ``slow``,
            ``rtt_p50_ms``, ``rtt_p95_ms``, ``sent``, ``received``.
    """

    connections: list[dict[str, Any]]
    total: int
    counts: dict[str, Any] = field(default_factory=dict)

    def to_json(self, query: ConnectionQuery) -> dict[str, Any]:
        """The API shape: the documented ``connections`` plus paging and aggregate fields."""
        return {
            "connections": self.connections,
            "total": self.total,
            "offset": query.offset,
            "limit": query.limit,
            "sort": query.sort,
            "order": "desc" if query.desc else "asc",
            "counts": self.counts,
        }


class OpsSource(Protocol):
    """Everything the dashboard and ``/api/*`` need from the running bridge, JSON-shaped."""

    def connections(self, query: ConnectionQuery) -> ConnectionPage:
        """A filtered, sorted page of live connections with aggregate counts."""
        ...

    async def kick(self, conn_id: str) -> bool:
        """Close that connection with code 4000; false when no such connection is open."""
        ...

    def engine_status(self) -> dict[str, Any]:
        """The engine's snapshot (devices, model, replicas, queue, batches, tokens/s, memory)."""
        ...

    def adapter_statuses(self) -> list[dict[str, Any]]:
        """One dict per IM adapter: name, mode, state, since, attempts, last event, last error."""
        ...

    def recent_errors(self, limit: int) -> list[dict[str, Any]]:
        """The newest errors first: ``ts``, ``source``, ``code``, ``message`` and ids."""
        ...

    def timeline(self) -> list[dict[str, Any]]:
        """Samples of the last minutes, oldest first: ``ts``, ``connections``, ``events_per_s``,
        ``p95_ms``."""
        ...

    async def swap_model(self, name: str) -> dict[str, Any]:
        """Load model ``name`` and switch to it; raises ``ValueError`` for a name it refuses."""
        ...


def to_jsonable(value: Any) -> Any:
    """Turn dataclasses, enums, datetimes, sets and tuples into plain JSON values.

    Datetimes become Unix seconds so every timestamp in the API has one unit; non-finite floats
    become ``None`` because JSON has no NaN.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, datetime):
        return value.timestamp()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Iterable):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [to_jsonable(v) for v in items]
    return str(value)


def _plain(value: Any) -> Any:
    # Fast path for the types the hub really uses; 10 000 rows are converted every refresh.
    kind = type(value)
    if value is None or kind is str or kind is int:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    return to_jsonable(value)


def connection_row(info: Any) -> dict[str, Any]:
    """A JSON row from any object with the hub's ``ConnectionInfo`` attributes (or a mapping)."""
    if isinstance(info, Mapping):
        row = {name: _plain(info.get(name)) for name in ROW_FIELDS}
    else:
        row = {name: _plain(getattr(info, name, None)) for name in ROW_FIELDS}
    if type(row["id"]) is not str:
        row["id"] = str(row["id"])
    topics = row["topics"]
    row["topics"] = [str(t) for t in topics] if topics else []
    row["sent"] = int(row["sent"] or 0)
    row["received"] = int(row["received"] or 0)
    row["state"] = str(row["state"] or "open")
    return row


def _matches(row: Mapping[str, Any], needle: str) -> bool:
    for name in ("id", "session", "remote", "state"):
        value = row.get(name)
        if value is not None and needle in str(value).lower():
            return True
    return any(needle in str(topic).lower() for topic in row.get("topics") or ())


def _sort_key(name: str) -> Any:
    def key(row: Mapping[str, Any]) -> tuple[int, Any]:
        value = row.get(name)
        if value is None:
            return (1, 0)  # missing values (no pong yet) sort last either way
        if name == "topics":
            return (0, len(value))
        if isinstance(value, int | float):
            return (0, value)
        return (0, str(value).lower())

    return key


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return round(sorted_values[index], 3)


def aggregate(rows: Iterable[Mapping[str, Any]], slow_rtt_ms: float) -> dict[str, Any]:
    """Counts over every connection: by state, slow heartbeats, RTT p50/p95, frame totals."""
    states: dict[str, int] = {}
    rtts: list[float] = []
    sent = received = slow = total = 0
    for row in rows:
        total += 1
        state = str(row.get("state") or "open")
        states[state] = states.get(state, 0) + 1
        rtt = row.get("rtt_ms")
        if isinstance(rtt, int | float) and math.isfinite(rtt):
            rtts.append(float(rtt))
            if rtt >= slow_rtt_ms:
                slow += 1
        sent += int(row.get("sent") or 0)
        received += int(row.get("received") or 0)
    rtts.sort()
    return {
        "all": total,
        "states": states,
        "slow": slow,
        "rtt_p50_ms": _percentile(rtts, 0.50),
        "rtt_p95_ms": _percentile(rtts, 0.95),
        "sent": sent,
        "received": received,
    }


def page_rows(
    rows: Iterable[Mapping[str, Any]],
    query: ConnectionQuery,
    slow_rtt_ms: float = DEFAULT_SLOW_RTT_MS,
) -> ConnectionPage:
    """Filter, sort and slice rows in memory: the reference implementation of ``connections()``.

    Args:
        rows: every live connection as :func:`connection_row` dicts.
        query: the page wanted.
        slow_rtt_ms: RTT at or above which a connection counts as slow.

    Returns:
        The page, its matching total and aggregates over all rows.
    """
    everything = list(rows)
    counts = aggregate(everything, slow_rtt_ms)
    needle = query.q.strip().lower()
    matching = [
        row
        for row in everything
        if (query.state is None or row.get("state") == query.state)
        and (not needle or _matches(row, needle))
    ]
    # Sort by the id first so rows with equal keys keep a stable order between refreshes.
    matching.sort(key=lambda row: str(row.get("id")))
    key = _sort_key(query.sort)
    present = [r for r in matching if r.get(query.sort) is not None]
    missing = [r for r in matching if r.get(query.sort) is None]
    present.sort(key=key, reverse=query.desc)
    ordered = present + missing
    end = None if query.limit is None else query.offset + query.limit
    window = ordered[query.offset : end]
    return ConnectionPage(connections=[dict(r) for r in window], total=len(ordered), counts=counts)

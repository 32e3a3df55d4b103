"""A scriptable OpsSource and a settable clock for the dashboard tests."""

from __future__ import annotations

from typing import Any

from bridge.dashboard.source import ConnectionPage, ConnectionQuery, connection_row, page_rows
from engine.types import EngineError


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeOpsSource:
    """An in-memory OpsSource: tests add and remove connections and read what was kicked."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.rows: dict[str, dict[str, Any]] = {}
        self.kicked: list[str] = []
        self.swapped: list[str] = []
        self.swap_error: Exception | None = None
        self.fail_connections = False
        self.engine: dict[str, Any] = {
            "ready": True,
            "model": "tiny",
            "dtype": "float32",
            "devices": ["cpu"],
            "replicas": {"alive": 1, "total": 1},
            "workers": [],
            "queue_depth": 0,
            "queue_capacity": 256,
            "batch_sizes": {"1": 5, "2": 3, "4": 1},
            "tokens_per_s": 12.5,
            "gpu_memory": {},
        }
        self.adapters: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []

    def add(self, conn_id: str, **fields: Any) -> dict[str, Any]:
        """Open a fake connection; unspecified fields get plausible values."""
        row = connection_row(
            {
                "id": conn_id,
                "session": fields.pop("session", f"s-{conn_id}"),
                "remote": fields.pop("remote", "127.0.0.1:50000"),
                "connected_at": fields.pop("connected_at", self.clock.now),
                "last_pong_at": fields.pop("last_pong_at", None),
                "rtt_ms": fields.pop("rtt_ms", None),
                "topics": fields.pop("topics", []),
                "sent": fields.pop("sent", 0),
                "received": fields.pop("received", 0),
                "state": fields.pop("state", "open"),
            }
        )
        assert not fields, f"unknown fields {fields}"
        self.rows[conn_id] = row
        return row

    def connections(self, query: ConnectionQuery) -> ConnectionPage:
        if self.fail_connections:
            raise RuntimeError("hub exploded")
        return page_rows(list(self.rows.values()), query)

    async def kick(self, conn_id: str) -> bool:
        if conn_id not in self.rows:
            return False
        del self.rows[conn_id]
        self.kicked.append(conn_id)
        return True

    def engine_status(self) -> dict[str, Any]:
        return dict(self.engine)

    def adapter_statuses(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self.adapters]

    def recent_errors(self, limit: int) -> list[dict[str, Any]]:
        return self.errors[:limit]

    def timeline(self) -> list[dict[str, Any]]:
        return list(self.samples)

    async def swap_model(self, name: str) -> dict[str, Any]:
        if self.swap_error is not None:
            raise self.swap_error
        if name == "refuse-me":
            raise EngineError("busy", "the engine is busy")
        self.swapped.append(name)
        self.engine["model"] = name
        return {"previous": "tiny"}

"""The dashboard's pure parts: rows and paging, JSON conversion, timeline, errors, sessions."""

from __future__ import annotations

import asyncio
import enum
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.dashboard import (
    ConnectionQuery,
    LiveOpsSource,
    RecentErrors,
    Timeline,
    connection_row,
    engine_status_dict,
    page_rows,
    to_jsonable,
)
from bridge.dashboard.auth import AdminAuth, LoginLimiter
from bridge.dashboard.errors import ApiError
from bridge.dashboard.params import parse_query
from engine.types import EngineStatus, WorkerStatus
from tests.dashboard.fakes import FakeClock


class Color(enum.Enum):
    RED = "red"


@dataclass
class Info:
    id: str
    session: str | None
    remote: str
    connected_at: datetime
    last_pong_at: float | None
    rtt_ms: float | None
    topics: frozenset[str]
    sent: int
    received: int
    state: Color


def test_connection_row_from_hub_like_object() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    row = connection_row(
        Info("c1", None, "1.2.3.4:5", when, math.nan, 3.5, frozenset({"b", "a"}), 1, 2, Color.RED)
    )
    assert row == {
        "id": "c1",
        "session": None,
        "remote": "1.2.3.4:5",
        "connected_at": when.timestamp(),
        "last_pong_at": None,
        "rtt_ms": 3.5,
        "topics": ["a", "b"],
        "sent": 1,
        "received": 2,
        "state": "red",
    }


def test_to_jsonable_handles_odd_values() -> None:
    assert to_jsonable({1: b"abc", "x": (1, math.inf), "y": {3, 1}}) == {
        "1": "<3 bytes>",
        "x": [1, None],
        "y": [1, 3],
    }
    assert to_jsonable(object()).startswith("<object")


def test_page_rows_counts_and_window() -> None:
    rows = [
        connection_row({"id": f"c{i}", "rtt_ms": i * 100.0, "state": "open", "sent": 1})
        for i in range(10)
    ]
    page = page_rows(rows, ConnectionQuery(sort="rtt_ms", desc=True, offset=2, limit=3))
    assert [r["id"] for r in page.connections] == ["c7", "c6", "c5"]
    assert page.total == 10
    assert page.counts["slow"] == 5 and page.counts["rtt_p95_ms"] == 900.0
    assert page.counts["rtt_p50_ms"] == 400.0 and page.counts["sent"] == 10
    past_end = page_rows(rows, ConnectionQuery(offset=50))
    assert past_end.connections == [] and past_end.total == 10


def test_parse_query_defaults_and_variants() -> None:
    assert parse_query({}) == ConnectionQuery()
    assert parse_query({"sort": "remote"}).desc is False
    assert parse_query({"sort": "-remote"}).desc is True
    assert parse_query({"sort": "-remote", "order": "asc"}).desc is False
    assert parse_query({"limit": "500", "offset": "10"}).limit == 500
    with pytest.raises(ApiError) as info:
        parse_query({"limit": "\u0663"})  # an Arabic-Indic digit is not an ASCII integer
    assert info.value.status == 400


def test_timeline_rates_and_p95_with_a_fake_clock() -> None:
    clock = FakeClock(1000.0)
    timeline = Timeline(interval_s=5, capacity=3, clock=clock)
    timeline.record_event(50)
    for ms in range(1, 101):
        timeline.record_latency(ms / 1000)
    timeline.record_latency(-1)
    timeline.record_latency(math.nan)
    clock.advance(5)
    sample = timeline.sample(connections=7)
    assert sample.events_per_s == 10.0 and sample.p95_ms == 95.0 and sample.connections == 7
    clock.advance(5)
    assert timeline.sample(8).p95_ms is None
    for _ in range(3):
        clock.advance(5)
        timeline.sample(9)
    samples = timeline.samples()
    assert len(samples) == 3 and samples[-1] == {
        "ts": clock.now,
        "connections": 9,
        "events_per_s": 0.0,
        "p95_ms": None,
    }
    with pytest.raises(ValueError):
        Timeline(interval_s=0)


def test_timeline_is_thread_safe() -> None:
    clock = FakeClock()
    timeline = Timeline(clock=clock)

    def hammer() -> None:
        for _ in range(10_000):
            timeline.record_event()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clock.advance(1)
    assert timeline.sample(0).events_per_s == 40_000.0


async def test_timeline_task_samples_and_stops() -> None:
    timeline = Timeline(interval_s=0.01)
    timeline.start(lambda: 3)
    for _ in range(500):
        if timeline.samples():
            break
        await asyncio.sleep(0.01)
    await timeline.stop()
    assert timeline.samples()[0]["connections"] == 3
    count = len(timeline.samples())
    await asyncio.sleep(0.05)
    assert len(timeline.samples()) == count


def test_recent_errors_bounded_newest_first_and_processor() -> None:
    errors = RecentErrors(capacity=3, clock=FakeClock())
    for i in range(5):
        errors.add("hub", f"e{i}", "m" * 1000, conn_id=f"c{i}", job_id=None)
    listed = errors.list(10)
    assert [e["code"] for e in listed] == ["e4", "e3", "e2"]
    assert len(listed[0]["message"]) == 500 and listed[0]["conn_id"] == "c4"
    assert "job_id" not in listed[0]
    event: dict[str, Any] = {"event": "pong_timeout", "level": "warning", "conn_id": "c9"}
    event["logger"] = "bridge.hub.heartbeat"
    assert errors.processor(None, "warning", event) is event
    assert errors.processor(None, "info", {"event": "fine", "level": "info"})
    newest = errors.list(1)[0]
    assert newest["source"] == "heartbeat" and newest["code"] == "pong_timeout"
    assert newest["conn_id"] == "c9"


def test_sessions_expire_revoke_and_csrf_is_per_session() -> None:
    clock = FakeClock()
    auth = AdminAuth("tok", session_ttl_s=60, clock=clock)
    cookie, session = auth.issue()
    assert auth.verify(cookie) == session
    other_cookie, other = auth.issue()
    assert auth.check_csrf(session, auth.csrf_token(session))
    assert not auth.check_csrf(session, auth.csrf_token(other))
    assert not auth.check_csrf(session, None) and not auth.check_csrf(session, "é")
    assert AdminAuth("other", clock=clock).verify(cookie) is None
    auth.revoke(session)
    assert auth.verify(cookie) is None and auth.verify(other_cookie) == other
    clock.advance(61)
    assert auth.verify(other_cookie) is None
    assert auth.check_token("tok") and not auth.check_token("to") and not auth.check_token("")
    with pytest.raises(ValueError):
        AdminAuth("")


def test_login_limiter_window_and_memory_bound() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(max_failures=2, window_s=10, clock=clock, max_remotes=5)
    limiter.failed("a")
    assert not limiter.blocked("a")
    limiter.failed("a")
    assert limiter.blocked("a")
    clock.advance(11)
    assert not limiter.blocked("a")
    for i in range(100):
        limiter.failed(f"r{i}")
    assert len(limiter._failures) <= 5


async def test_live_ops_source_over_engine_and_adapter_objects() -> None:
    @dataclass
    class AdapterStatus:
        mode: str
        state: str
        since: datetime | None
        attempts: int

    kicked: list[str] = []

    async def kick(conn_id: str) -> bool:
        kicked.append(conn_id)
        return True

    def broken() -> Any:
        raise RuntimeError("boom")

    status = EngineStatus(
        ready=True,
        model="tiny",
        dtype="float32",
        workers=(
            WorkerStatus("w0", "cuda:0", True, False, 0, 3),
            WorkerStatus("w1", "cuda:1", False, False, 0, 0),
        ),
        queue_depth=2,
        queue_capacity=256,
        batch_sizes={1: 3, 4: 2},
        gpu_memory={"cuda:0": 1024},
    )
    source = LiveOpsSource(
        list_connections=lambda: [{"id": "a", "rtt_ms": 600.0}, {"id": "b"}],
        kick=kick,
        engine_status=lambda: status,
        adapters=[
            ("feishu", lambda: AdapterStatus("longconn", "reconnecting", None, 3)),
            ("broken", broken),
        ],
    )
    page = source.connections(ConnectionQuery(sort="id", desc=False))
    assert [r["id"] for r in page.connections] == ["a", "b"] and page.counts["slow"] == 1
    assert await source.kick("a") and kicked == ["a"]
    engine = source.engine_status()
    assert engine["batch_sizes"] == {"1": 3, "4": 2}
    assert engine["devices"] == ["cuda:0", "cuda:1"]
    assert engine["replicas"] == {"alive": 1, "total": 2}
    adapters = source.adapter_statuses()
    assert adapters[0] == {
        "name": "feishu",
        "mode": "longconn",
        "state": "reconnecting",
        "since": None,
        "attempts": 3,
    }
    assert adapters[1] == {"name": "broken", "state": "unknown", "last_error": "RuntimeError"}
    assert source.recent_errors(5) == [] and source.timeline() == []
    with pytest.raises(ValueError):
        await source.swap_model("x")
    assert engine_status_dict(status)["model"] == "tiny"

"""Cross-node fan-out of IM job events: two ClusterFanout nodes on one event log (Redis stream or
in-process), through cut connections, a stopped Redis, trimming, overflow and garbage entries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bridge.cluster.eventlog import LocalEventLog
from bridge.cluster.redis_eventlog import RedisEventLog
from bridge.fanout import (
    ClusterFanout,
    Origin,
    decode_event,
    decode_message,
    encode_event,
)
from bridge.store.backoff import Backoff
from engine.types import Delta, Done, Failed, JobEvent, Queued, Started, Usage
from tests.cluster.tcp_proxy import TcpProxy
from tests.conftest import UNIT
from tests.redis_fixtures import RedisServer, delete_prefix, unique_prefix

TOPIC = "chat:feishu:oc_1"
WITHIN = 30.0 * UNIT

Record = tuple[str, str, JobEvent]


class RecordingHub:
    """A LocalHub that records what it is given and lets a test wait for a number of events."""

    def __init__(self) -> None:
        self.got: list[Record] = []
        self._changed = asyncio.Event()

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        self.got.append((topic, job_id, event))
        self._changed.set()

    async def wait_for(self, n: int, within: float = WITHIN) -> list[Record]:
        async with asyncio.timeout(within):
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.got


async def until(cond: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait for ``cond()`` to hold, checking every 10 ms."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def answer(n: int, job_id: str = "job-b") -> list[Record]:
    """``n`` events of one job in the order a job produces them: queued, started, deltas, done."""
    assert n >= 3
    events: list[JobEvent] = [Queued(0), Started()]
    events += [Delta(f"t{i} ") for i in range(n - 3)]
    events.append(Done("whole answer", Usage(3, n - 3)))
    return [(TOPIC, job_id, e) for e in events]


def deltas(start: int, n: int, job_id: str = "job-b") -> list[Record]:
    return [(TOPIC, job_id, Delta(f"d{i}")) for i in range(start, start + n)]


async def publish_all(node: ClusterFanout, records: list[Record]) -> None:
    for topic, job_id, event in records:
        await node.publish(topic, job_id, event)


def fast_backoff() -> Backoff:
    return Backoff(initial=0.01, cap=0.2)


def redis_log(url: str, name: str, **kw: Any) -> RedisEventLog:
    return RedisEventLog(
        url, client_name=f"fanout-{name}-{uuid.uuid4().hex[:8]}", backoff=fast_backoff(), **kw
    )


async def started(log: Any, node_id: str) -> tuple[ClusterFanout, RecordingHub]:
    hub = RecordingHub()
    node = ClusterFanout(log, hub, node_id, backoff=fast_backoff())
    await node.start()
    return node, hub


async def last_stream_id(url: str, stream: str) -> str | None:
    client = aioredis.Redis.from_url(url)
    try:
        rows = await client.xrevrange(stream, count=1)
    finally:
        await client.aclose()
    return rows[0][0].decode() if rows else None


async def named_client_ids(admin: aioredis.Redis, name: str) -> list[str]:
    """Ids of the connections named ``name`` (CLIENT LIST)."""
    return [str(c["id"]) for c in await admin.client_list() if c.get("name") == name]


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


def logs_gap(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return events_named(logs, "fanout_gap")


@pytest.fixture
async def shared_url(redis_cluster_url: str) -> AsyncIterator[str]:
    """The cluster test DB under a unique prefix, deleted afterwards."""
    prefix = unique_prefix()
    yield f"{redis_cluster_url}?prefix={prefix}"
    delete_prefix(redis_cluster_url, prefix)


@pytest.fixture
async def proxy(redis_cluster_url: str) -> AsyncIterator[TcpProxy]:
    """A cuttable path to the cluster test Redis."""
    parts = urlsplit(redis_cluster_url)
    p = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await p.start()
    yield p
    await p.close()


def via(proxy: TcpProxy, url: str) -> str:
    """``url`` (redis://host:port/db?...) pointed at the proxy instead."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


# --- Redis: two nodes ----------------------------------------------------------------------------


async def test_events_from_b_reach_a_in_order_once_and_b_locally_once(shared_url: str) -> None:
    b_log = redis_log(shared_url, "b")
    b, b_hub = await started(b_log, "node-b")
    await publish_all(b, deltas(0, 3, "job-old"))  # before A starts: not replayed to A
    await until(lambda: b.outbox_depth == 0)
    a, a_hub = await started(redis_log(shared_url, "a"), "node-a")
    try:
        records = answer(50)
        for i, (topic, job_id, event) in enumerate(records):
            await b.publish(topic, job_id, event)
            # B's own sessions get the event at once, without a Redis round trip.
            assert b_hub.got[-1] == (topic, job_id, event) and len(b_hub.got) == 3 + i + 1
        marker = deltas(0, 1, "job-marker")
        await publish_all(b, marker)
        await a_hub.wait_for(51)
        await until(lambda: b.outbox_depth == 0)
        last = await last_stream_id(shared_url.split("?")[0], b_log.stream)
        await until(lambda: b_log.cursor == last)  # B's reader has seen its own events come back
        assert a_hub.got == records + marker
        assert b_hub.got == deltas(0, 3, "job-old") + records + marker
        assert b.status()["forwarded"] == 0 and a.status()["forwarded"] == 51
    finally:
        await a.stop()
        await b.stop()


async def test_a_reader_cut_off_reads_on_from_its_last_entry(
    shared_url: str, proxy: TcpProxy
) -> None:
    a_log = redis_log(via(proxy, shared_url), "a")
    a, a_hub = await started(a_log, "node-a")
    b, _ = await started(redis_log(shared_url, "b"), "node-b")
    try:
        first = deltas(0, 1)
        await publish_all(b, first)
        await a_hub.wait_for(1)
        with capture_logs() as logs:
            await proxy.cut()
            await until(lambda: not a_log.connected.is_set())
            during = deltas(1, 200)
            await publish_all(b, during)  # A is cut off for all of them
            await until(lambda: b.outbox_depth == 0)
            assert a_hub.got == first
            await proxy.start()
            await a_hub.wait_for(201)
            after = deltas(201, 5)
            await publish_all(b, after)
            await a_hub.wait_for(206)
        assert a_hub.got == first + during + after
        assert events_named(logs, "eventlog_disconnected")
        assert events_named(logs, "eventlog_reconnected")
        assert not events_named(logs, "fanout_gap")
    finally:
        await a.stop()
        await b.stop()


async def test_killed_reader_connection_loses_and_repeats_nothing(
    shared_url: str, redis_cluster_url: str
) -> None:
    a_log = redis_log(shared_url, "a")
    a, a_hub = await started(a_log, "node-a")
    b, _ = await started(redis_log(shared_url, "b"), "node-b")
    admin = aioredis.Redis.from_url(redis_cluster_url)
    try:
        records = deltas(0, 200)
        for i in range(0, 200, 50):
            await publish_all(b, records[i : i + 50])
            async with asyncio.timeout(WITHIN):  # A's reader may still be reconnecting
                while not (ids := await named_client_ids(admin, a_log.client_name)):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            for client_id in ids:
                await admin.execute_command("CLIENT", "KILL", "ID", client_id)
        await a_hub.wait_for(200)
        marker = deltas(0, 1, "job-marker")
        await publish_all(b, marker)
        await a_hub.wait_for(201)
        assert a_hub.got == records + marker
    finally:
        await admin.aclose()
        await a.stop()
        await b.stop()


async def test_redis_stopped_b_keeps_its_events_and_a_gets_them_after_restart(
    private_redis: RedisServer,
) -> None:
    url = f"{private_redis.url(0)}?prefix={unique_prefix()}"
    a_log = redis_log(url, "a")
    a, a_hub = await started(a_log, "node-a")
    b, b_hub = await started(redis_log(url, "b"), "node-b")
    try:
        first = deltas(0, 1)
        await publish_all(b, first)
        await a_hub.wait_for(1)
        with capture_logs() as logs:
            private_redis.stop()
            outage = answer(100)
            await publish_all(b, outage)  # never raises
            assert b_hub.got == first + outage  # B's sessions did not wait for Redis
            await until(
                lambda: (
                    bool(events_named(logs, "fanout_append_failed"))
                    and not a_log.connected.is_set()
                )
            )
            assert b.outbox_depth == 100
            private_redis.start()  # no persistence: the stream and A's last id are gone
            await a_hub.wait_for(101)
            after = deltas(1, 3)
            await publish_all(b, after)
            await a_hub.wait_for(104)
        assert a_hub.got == first + outage + after
        assert events_named(logs, "fanout_append_failed")
        assert events_named(logs, "eventlog_stream_reset")
    finally:
        await a.stop()
        await b.stop()


async def test_new_stream_with_ids_below_a_cursor_is_read_from_its_start(
    private_redis: RedisServer,
) -> None:
    """After a restart Redis ids are normally above the old ones (they are ms timestamps); here
    they are not (an old entry far in the future stands for a clock that stepped back)."""
    prefix = unique_prefix()
    url = f"{private_redis.url(0)}?prefix={prefix}"
    a_log = redis_log(url, "a")
    a, a_hub = await started(a_log, "node-a")
    b, _ = await started(redis_log(url, "b"), "node-b")
    admin = aioredis.Redis.from_url(private_redis.url(0))
    try:
        future = encode_event(TOPIC, "job-x", Started(), Origin("node-x", "r", 1))
        await admin.xadd(f"{prefix}events", {b"payload": future}, id="99999999999999-0")
        await a_hub.wait_for(1)
        assert a_log.cursor == "99999999999999-0"
        private_redis.stop()
        records = answer(100)
        await publish_all(b, records)
        private_redis.start()
        await a_hub.wait_for(101)
        assert a_hub.got[1:] == records
    finally:
        await admin.aclose()
        await a.stop()
        await b.stop()


async def test_trimmed_entries_are_logged_as_a_gap_and_delivery_goes_on(
    shared_url: str, proxy: TcpProxy
) -> None:
    a_log = redis_log(via(proxy, shared_url), "a")
    a, a_hub = await started(a_log, "node-a")
    b, _ = await started(redis_log(shared_url, "b", max_len=10), "node-b")
    try:
        first = deltas(0, 1)
        await publish_all(b, first)
        await a_hub.wait_for(1)
        with capture_logs() as logs:
            await proxy.cut()
            await until(lambda: not a_log.connected.is_set())
            during = deltas(1, 400)  # MAXLEN ~ 10 trims whole nodes of 100 entries
            await publish_all(b, during)
            await until(lambda: b.outbox_depth == 0)
            await proxy.start()
            await until(lambda: any(g["reader"] == a_log.client_name for g in logs_gap(logs)))
            after = deltas(401, 3)
            await publish_all(b, after)
            await until(lambda: a_hub.got[-1:] == after[-1:])
        gaps = [g for g in events_named(logs, "fanout_gap") if g["reader"] == a_log.client_name]
        lost = sum(g["lost"] for g in gaps)
        got = a_hub.got[1:-3]
        assert 0 < lost < 400 and len(got) + lost == 400
        assert got == during[lost:]  # what was left, in order, then the rest
        assert a_hub.got[-3:] == after
        assert gaps[0]["after_id"] and gaps[0]["first_id"]
        assert a_log.last_gap is not None and a_log.lost == lost
        assert [e for e in events_named(logs, "fanout_origin_gap") if e["node"] == "node-a"]
    finally:
        await a.stop()
        await b.stop()


async def test_garbage_entries_are_skipped_with_a_logged_error(shared_url: str) -> None:
    a_log = redis_log(shared_url, "a")
    a, a_hub = await started(a_log, "node-a")
    b, _ = await started(redis_log(shared_url, "b"), "node-b")
    admin = aioredis.Redis.from_url(shared_url.split("?")[0])
    try:
        with capture_logs() as logs:
            no_payload = await admin.xadd(a_log.stream, {b"other": b"x"})
            not_json = await admin.xadd(a_log.stream, {b"payload": b"\xff not json"})
            bad_kind = await admin.xadd(a_log.stream, {b"payload": b'{"kind":"x","topic":"t"}'})
            records = answer(5)
            await publish_all(b, records)
            await a_hub.wait_for(5)
        assert a_hub.got == records
        malformed = [
            e
            for e in events_named(logs, "eventlog_entry_malformed")
            if e["reader"] == a_log.client_name
        ]
        assert [e["entry_id"] for e in malformed] == [no_payload.decode()]
        bad = [e for e in events_named(logs, "fanout_payload_malformed") if e["node"] == "node-a"]
        assert [e["entry_id"] for e in bad] == [not_json.decode(), bad_kind.decode()]
    finally:
        await admin.aclose()
        await a.stop()
        await b.stop()


# --- in-process log ------------------------------------------------------------------------------


async def test_outbox_overflow_drops_the_oldest_and_is_logged() -> None:
    log_b = LocalEventLog()
    a, a_hub = await started(log_b.follower(), "node-a")
    hub_b = RecordingHub()
    b = ClusterFanout(log_b, hub_b, "node-b", max_outbox=10, backoff=fast_backoff())
    await b.start()
    try:
        with capture_logs() as logs:
            log_b.down = True
            records = deltas(0, 25)
            await publish_all(b, records)  # never raises
            assert hub_b.got == records
            assert b.outbox_depth == 10 and b.status()["outbox_dropped"] == 15
            await until(lambda: bool(events_named(logs, "fanout_append_failed")))
            log_b.down = False
            await a_hub.wait_for(10)
            await until(lambda: b.outbox_depth == 0)
        assert a_hub.got == records[15:]
        overflow = events_named(logs, "fanout_outbox_overflow")
        assert overflow and sum(e["dropped"] for e in overflow) == 15
        assert overflow[0]["node"] == "node-b"
        assert events_named(logs, "fanout_append_failed")
        assert events_named(logs, "fanout_append_resumed")
    finally:
        await a.stop()
        await b.stop()


async def test_own_events_and_repeats_are_skipped_and_jumps_logged() -> None:
    log_b = LocalEventLog()
    log_a = log_b.follower()
    a, a_hub = await started(log_a, "node-a")
    b, b_hub = await started(log_b, "node-b")
    try:
        await publish_all(b, deltas(0, 2))
        assert b_hub.got == deltas(0, 2) and a_hub.got == []  # the hop is a background task
        await a_hub.wait_for(2)
        with capture_logs() as logs:
            one = encode_event(TOPIC, "job-c", Delta("1"), Origin("node-c", "run1", 1))
            three = encode_event(TOPIC, "job-c", Delta("3"), Origin("node-c", "run1", 3))
            for payload in (one, one, three, one):
                await log_b.append(payload)
            await a_hub.wait_for(4)
            await b_hub.wait_for(4)
            await until(lambda: a.status()["repeats"] == 2 and b.status()["repeats"] == 2)
        assert a_hub.got[2:] == [(TOPIC, "job-c", Delta("1")), (TOPIC, "job-c", Delta("3"))]
        assert b_hub.got[2:] == a_hub.got[2:]
        (jump,) = [e for e in events_named(logs, "fanout_origin_gap") if e["node"] == "node-a"]
        assert jump["origin"] == "node-c" and jump["expected_seq"] == 2 and jump["seq"] == 3
    finally:
        await a.stop()
        await b.stop()


async def test_stop_flushes_the_outbox_or_gives_up_in_bounded_time() -> None:
    log_b = LocalEventLog()
    a, a_hub = await started(log_b.follower(), "node-a")
    b = ClusterFanout(log_b, RecordingHub(), "node-b", flush_timeout_s=0.2 * UNIT)
    await b.start()
    await publish_all(b, deltas(0, 3))
    await b.stop()  # the outbox reaches the log before the task stops
    await a_hub.wait_for(3)
    assert a_hub.got == deltas(0, 3)
    c = ClusterFanout(log_b, RecordingHub(), "node-c", flush_timeout_s=0.2 * UNIT)
    await c.start()
    log_b.down = True
    with capture_logs() as logs:
        await publish_all(c, deltas(0, 4))
        async with asyncio.timeout(WITHIN):
            await c.stop()
    (abandoned,) = events_named(logs, "fanout_outbox_abandoned")
    assert abandoned["count"] == 4 and abandoned["node"] == "node-c"
    await a.stop()


def test_payloads_stay_compatible_and_bad_ones_are_refused() -> None:
    event = Failed("busy", "try later", 1.5)
    old = encode_event(TOPIC, "job-1", event)
    assert decode_event(old) == (TOPIC, "job-1", event)
    assert decode_message(old).origin is None
    new = encode_event(TOPIC, "job-1", event, Origin("node-a", "r1", 7))
    assert decode_event(new) == (TOPIC, "job-1", event)
    assert decode_message(new).origin == Origin("node-a", "r1", 7)
    extra = new[:-1] + b',"future":{"x":1}}'
    assert decode_event(extra) == (TOPIC, "job-1", event)
    done = Done("text", Usage(1, 2), cached=True)
    assert decode_event(encode_event(TOPIC, "j", done)) == (TOPIC, "j", done)
    for bad in (
        b"not json",
        b'{"kind":"delta","topic":"t"}',
        b'{"kind":"nope","topic":"t","id":"j"}',
        b'{"kind":"started","topic":"t","id":"j","origin":"n","run":"r","seq":true}',
        b'{"kind":"started","topic":"t","id":"j","origin":"n","seq":1}',
        b"[]",
    ):
        with pytest.raises(ValueError):
            decode_event(bad)

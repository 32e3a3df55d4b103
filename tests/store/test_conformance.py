"""One behaviour suite for every store backend (memory, SQLite, Redis): same calls, same answers."""

from __future__ import annotations

import asyncio
import math

import pytest

from bridge.store.base import INBOX_DONE_RETENTION_S, InboxEntry, SessionRecord, StoredEvent
from bridge.store.checks import MAX_KEY_LEN, MAX_PAYLOAD_BYTES
from bridge.store.redis import RedisStore
from tests.store.conftest import Harness


def ev(seq: int, frame: str | None = None) -> StoredEvent:
    return StoredEvent(seq=seq, ts=1000.0 + seq, frame=frame or f'{{"type":"event","seq":{seq}}}')


# --- dedupe claims ---------------------------------------------------------------------------


async def test_claim_once_then_refused_until_released(harness: Harness) -> None:
    s = harness.store
    assert await s.claim("feishu:msg:1", harness.long_ttl) is True
    assert await s.claim("feishu:msg:1", harness.long_ttl) is False
    assert await s.claim("feishu:msg:2", harness.long_ttl) is True
    await s.release("feishu:msg:1")
    assert await s.claim("feishu:msg:1", harness.long_ttl) is True
    await s.release("never-claimed")  # no error


async def test_claim_expires_after_ttl(harness: Harness) -> None:
    s = harness.store
    assert await s.claim("k", harness.ttl)
    assert not await s.claim("k", harness.ttl)
    await harness.pass_ttl()
    assert await harness.eventually(lambda: s.claim("k", harness.ttl))


async def test_many_concurrent_claims_of_one_key_give_exactly_one_true(harness: Harness) -> None:
    s = harness.store
    results = await asyncio.gather(*(s.claim("race", harness.long_ttl) for _ in range(100)))
    assert results.count(True) == 1


async def test_claims_and_values_are_separate_namespaces(harness: Harness) -> None:
    s = harness.store
    await s.set_value("same", "v")
    assert await s.claim("same", harness.long_ttl)
    assert await s.get_value("same") == "v"


# --- small values and counters ----------------------------------------------------------------


async def test_values_roundtrip_overwrite_and_expire(harness: Harness) -> None:
    s = harness.store
    assert await s.get_value("reply:1") is None
    await s.set_value("reply:1", "om_abc")
    await s.set_value("reply:1", "om_def")
    await s.set_value("short", "x", ttl_s=harness.ttl)
    assert await s.get_value("reply:1") == "om_def"
    assert await s.get_value("short") == "x"
    await harness.pass_ttl()

    async def gone() -> bool:
        return await s.get_value("short") is None

    assert await harness.eventually(gone)
    assert await s.get_value("reply:1") == "om_def"  # no TTL: kept


async def test_hostile_keys_and_values_roundtrip(harness: Harness) -> None:
    s = harness.store
    keys = ["*", "a:b:{c}", "line\nbreak", "ключ 🔑", "'; DROP TABLE kv; --", "x" * MAX_KEY_LEN]
    for i, key in enumerate(keys):
        await s.set_value(key, f"v{i}|\x01 ünï")
    for i, key in enumerate(keys):
        assert await s.get_value(key) == f"v{i}|\x01 ünï"


async def test_incr_counts_within_window_and_restarts_after(harness: Harness) -> None:
    s = harness.store
    counts = await asyncio.gather(*(s.incr("rate:u1", harness.ttl) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))
    assert await s.incr("rate:u2", harness.ttl) == 1
    await harness.pass_ttl()

    async def restarted() -> bool:
        return await s.incr("rate:u1", harness.ttl) == 1

    assert await harness.eventually(restarted)


# --- inbox ---------------------------------------------------------------------------------------


async def test_inbox_pending_oldest_first_and_complete(harness: Harness) -> None:
    s = harness.store
    await s.inbox_add(InboxEntry("b", b"second", accepted_at=2.0))
    await s.inbox_add(InboxEntry("a", b"first", accepted_at=1.0))
    await s.inbox_add(InboxEntry("c", b"third", accepted_at=3.0))
    assert [e.entry_id for e in await s.inbox_pending()] == ["a", "b", "c"]
    assert [e.entry_id for e in await s.inbox_pending(limit=2)] == ["a", "b"]
    await s.inbox_complete("a")
    pending = await s.inbox_pending()
    assert [(e.entry_id, e.payload, e.accepted_at) for e in pending] == [
        ("b", b"second", 2.0),
        ("c", b"third", 3.0),
    ]


async def test_inbox_add_is_idempotent_and_completed_never_returns(harness: Harness) -> None:
    s = harness.store
    await s.inbox_add(InboxEntry("m1", b"original", accepted_at=1.0))
    await s.inbox_add(InboxEntry("m1", b"redelivered", accepted_at=5.0))
    assert [e.payload for e in await s.inbox_pending()] == [b"original"]
    await s.inbox_complete("m1")
    await s.inbox_add(InboxEntry("m1", b"redelivered again", accepted_at=6.0))
    assert await s.inbox_pending() == []
    await s.inbox_complete("unknown")  # no error; and it is then never run either
    await s.inbox_add(InboxEntry("unknown", b"late", accepted_at=7.0))
    assert await s.inbox_pending() == []
    assert INBOX_DONE_RETENTION_S >= 24 * 3600


async def test_inbox_attempts_are_counted(harness: Harness) -> None:
    s = harness.store
    await s.inbox_add(InboxEntry("m", b"p", accepted_at=1.0))
    assert await s.inbox_attempt("m") == 1
    assert await s.inbox_attempt("m") == 2
    assert (await s.inbox_pending())[0].attempts == 2
    assert await s.inbox_attempt("nope") == 0
    await s.inbox_complete("m")
    assert await s.inbox_attempt("m") == 0


async def test_inbox_binary_payload_is_exact(harness: Harness) -> None:
    s = harness.store
    payload = bytes(range(256)) * 4 + b"\x00|\xff"
    await s.inbox_add(InboxEntry("bin", payload, accepted_at=1.0))
    assert (await s.inbox_pending())[0].payload == payload


async def test_many_concurrent_inbox_adds_all_kept(harness: Harness) -> None:
    s = harness.store
    await asyncio.gather(
        *(s.inbox_add(InboxEntry(f"e{i:03}", b"x", accepted_at=float(i))) for i in range(200))
    )
    pending = await s.inbox_pending(limit=500)
    assert [e.entry_id for e in pending] == [f"e{i:03}" for i in range(200)]


# --- sessions ----------------------------------------------------------------------------------


async def test_unknown_session_is_none(harness: Harness) -> None:
    assert await harness.store.load_session("nope") is None


async def test_append_creates_session_and_load_replays_in_order(harness: Harness) -> None:
    s = harness.store
    frames = ['{"text":"a|b|c"}', '{"text":"ünïcødé 🌉"}', '{"text":"line\\nbreak"}']
    await s.append_events("s1", [ev(1, frames[0]), ev(2, frames[1])], harness.long_ttl)
    await s.append_events("s1", [ev(3, frames[2])], harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None
    assert rec.last_seq == 3 and rec.first_seq == 1
    assert [e.seq for e in rec.events] == [1, 2, 3]
    assert [e.frame for e in rec.events] == frames
    assert rec.events[0].ts == 1001.0


async def test_append_ignores_seqs_already_kept(harness: Harness) -> None:
    s = harness.store
    await s.append_events("s1", [ev(1), ev(2)], harness.long_ttl)
    await s.append_events("s1", [ev(2, "dup"), ev(3)], harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None
    assert [(e.seq, e.frame) for e in rec.events] == [(1, ev(1).frame), (2, ev(2).frame),
                                                      (3, ev(3).frame)]  # fmt: skip


async def test_save_session_header_and_trim(harness: Harness) -> None:
    s = harness.store
    await s.append_events("s1", [ev(i) for i in range(1, 6)], harness.long_ttl)
    await s.save_session(
        SessionRecord("s1", last_seq=5, first_seq=3, topics=["chat:feishu:oc_1", "ops"],
                      updated_at=42.0),
        harness.long_ttl,
    )  # fmt: skip
    rec = await s.load_session("s1")
    assert rec is not None
    assert rec.topics == ["chat:feishu:oc_1", "ops"]
    assert rec.updated_at == 42.0
    assert (rec.first_seq, rec.last_seq) == (3, 5)
    assert [e.seq for e in rec.events] == [3, 4, 5]
    await s.trim_events("s1", 4)
    rec = await s.load_session("s1")
    assert rec is not None
    assert rec.first_seq == 5 and [e.seq for e in rec.events] == [5]
    await s.trim_events("s1", 99)  # beyond last_seq: clamps, never skips future seqs
    rec = await s.load_session("s1")
    assert rec is not None
    assert (rec.first_seq, rec.last_seq, rec.events) == (6, 5, [])
    await s.append_events("s1", [ev(6)], harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None and [e.seq for e in rec.events] == [6]
    await s.trim_events("unknown", 3)  # no error, creates nothing
    assert await s.load_session("unknown") is None


async def test_save_new_session_without_events(harness: Harness) -> None:
    s = harness.store
    await s.save_session(SessionRecord("fresh", topics=["ops"]), harness.long_ttl)
    rec = await s.load_session("fresh")
    assert rec is not None
    assert (rec.last_seq, rec.first_seq, rec.topics, rec.events) == (0, 1, ["ops"], [])


async def test_open_jobs_roundtrip_in_the_session_header(harness: Harness) -> None:
    s = harness.store
    await s.append_events("s1", [ev(1), ev(2)], harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None and rec.open_jobs == []  # a header created by an append: none
    jobs = ["job-1", "a/b:c@d=e+f.g_h"]
    await s.save_session(SessionRecord("s1", last_seq=2, open_jobs=jobs), harness.long_ttl)
    await s.append_events("s1", [ev(3)], harness.long_ttl)  # appends keep the header's list
    rec = await s.load_session("s1")
    assert rec is not None and rec.open_jobs == jobs and rec.last_seq == 3
    rec.open_jobs.append("changed-by-the-caller")
    again = await s.load_session("s1")
    assert again is not None and again.open_jobs == jobs
    # A header written without the field (no open job, or an older writer) reads as none.
    await s.save_session(SessionRecord("s1", last_seq=3), harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None and rec.open_jobs == [] and [e.seq for e in rec.events] == [1, 2, 3]


async def test_session_expires_and_append_after_expiry_starts_clean(harness: Harness) -> None:
    s = harness.store
    await s.append_events("s1", [ev(1), ev(2)], harness.ttl)
    await harness.pass_ttl()

    async def gone() -> bool:
        return await s.load_session("s1") is None

    assert await harness.eventually(gone)
    await s.append_events("s1", [ev(1, "new")], harness.long_ttl)
    rec = await s.load_session("s1")
    assert rec is not None
    assert [(e.seq, e.frame) for e in rec.events] == [(1, "new")]


async def test_append_renews_session_ttl(harness: Harness) -> None:
    s = harness.store
    if isinstance(s, RedisStore):  # real time: check the TTL Redis holds instead of waiting
        await s.append_events("s1", [ev(1)], 5.0)
        await s.append_events("s1", [ev(2)], 3600.0)
        for key in s._sess_keys("s1"):
            ttl_ms: int = await s._run("pttl", lambda c, k=key: c.pttl(k))  # type: ignore[misc]
            assert ttl_ms > 3000_000
        return
    assert harness.clock is not None
    await s.append_events("s1", [ev(1)], 10.0)
    harness.clock.now += 8
    await s.append_events("s1", [ev(2)], 10.0)
    harness.clock.now += 8
    rec = await s.load_session("s1")
    assert rec is not None and [e.seq for e in rec.events] == [1, 2]


async def test_delete_session(harness: Harness) -> None:
    s = harness.store
    await s.append_events("s1", [ev(1)], harness.long_ttl)
    await s.delete_session("s1")
    assert await s.load_session("s1") is None
    await s.delete_session("s1")  # idempotent


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
async def test_bad_ttl_is_refused(harness: Harness, ttl: float) -> None:
    with pytest.raises(ValueError):
        await harness.store.claim("k", ttl)
    with pytest.raises(ValueError):
        await harness.store.set_value("k", "v", ttl_s=ttl)
    assert await harness.store.claim("k", harness.long_ttl)  # nothing was recorded


async def test_bad_keys_and_entries_are_refused_and_store_keeps_working(harness: Harness) -> None:
    s = harness.store
    for bad in ["", "x" * (MAX_KEY_LEN + 1), "nul\x00byte"]:
        with pytest.raises(ValueError):
            await s.claim(bad, 1.0)
        with pytest.raises(ValueError):
            await s.load_session(bad)
    with pytest.raises(TypeError):
        await s.claim(b"bytes-key", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await s.inbox_add(InboxEntry("big", b"x" * (MAX_PAYLOAD_BYTES + 1), accepted_at=1.0))
    with pytest.raises(TypeError):
        await s.inbox_add(InboxEntry("str", "not bytes", accepted_at=1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await s.inbox_pending(limit=0)
    with pytest.raises(ValueError):
        await s.append_events("s", [ev(2), ev(1)], 10.0)
    with pytest.raises(ValueError):
        await s.append_events("s", [ev(0)], 10.0)
    with pytest.raises(ValueError):
        await s.trim_events("s", -1)
    assert await s.inbox_pending() == []
    assert await s.load_session("s") is None
    await s.ping()


async def test_accept_entry_records_then_claims_in_one_step(harness: Harness) -> None:
    store = harness.store
    entry = InboxEntry("feishu:om_acc", b"payload", 1.0)
    keys = ("feishu:msg:om_acc", "feishu:evt:ev_acc")
    assert await store.accept_entry(entry, keys, harness.long_ttl) is True
    assert [e.entry_id for e in await store.inbox_pending()] == ["feishu:om_acc"]
    # A re-delivery (same message, new event id) is a duplicate and records nothing new.
    again = ("feishu:msg:om_acc", "feishu:evt:ev_other")
    duplicate = InboxEntry("feishu:om_acc", b"x", 2.0)
    assert await store.accept_entry(duplicate, again, harness.long_ttl) is False
    pending = await store.inbox_pending()
    assert len(pending) == 1 and pending[0].payload == b"payload"
    for key in keys:
        assert await store.claim(key, harness.long_ttl) is False
    await store.inbox_complete("feishu:om_acc")
    assert await store.accept_entry(entry, ("feishu:msg:om_new",), harness.long_ttl) is True
    assert await store.inbox_pending() == []  # a completed entry is never re-run

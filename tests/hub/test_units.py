"""The I/O-free parts: token bucket, replay buffer, timer wheel, session persistence batches."""

from __future__ import annotations

import pytest

from bridge.hub.config import HubConfig, token_label
from bridge.hub.heartbeat import TimerWheel
from bridge.hub.ratelimit import TokenBucket
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session, new_session_id
from bridge.store.base import SessionRecord, StoredEvent


def ev(seq: int, ts: float = 0.0, size: int = 10) -> StoredEvent:
    return StoredEvent(seq=seq, ts=ts, frame="x" * size)


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=20, now=0.0)
    assert all(bucket.take(0.0) for _ in range(20))
    assert not bucket.take(0.0)
    assert bucket.retry_after() == pytest.approx(0.1)
    assert bucket.take(0.1)
    assert not bucket.take(0.1)
    assert sum(bucket.take(100.0) for _ in range(50)) == 20  # refills only up to the burst


def test_replay_bounds_by_count_bytes_and_age() -> None:
    buf = ReplayBuffer(max_events=5, max_bytes=1000, max_age_s=60.0)
    for seq in range(1, 9):
        buf.append(ev(seq, ts=float(seq)))
    assert len(buf) == 5 and buf.first_seq == 4 and buf.last_seq == 8
    events, missed = buf.since(1)
    assert [e.seq for e in events] == [4, 5, 6, 7, 8] and missed == 2
    assert buf.since(8) == ([], 0)
    assert [e.seq for e in buf.since(6)[0]] == [7, 8]
    buf.trim_age(now=66.5)  # events with ts < 6.5 go
    assert buf.first_seq == 7
    small = ReplayBuffer(max_events=100, max_bytes=25, max_age_s=60.0)
    for seq in range(1, 5):
        small.append(ev(seq))
    assert len(small) == 2 and small.bytes == 20
    with pytest.raises(ValueError):
        small.append(ev(9))


def test_replay_ack_and_restore_keeps_only_a_gap_free_tail() -> None:
    buf = ReplayBuffer(10, 10_000, 60.0)
    for seq in range(1, 6):
        buf.append(ev(seq))
    buf.ack(3)
    assert buf.first_seq == 4 and [e.seq for e in buf.since(0)[0]] == [4, 5]
    assert buf.since(0)[1] == 3
    restored = ReplayBuffer(10, 10_000, 60.0)
    restored.restore([ev(2), ev(3), ev(5), ev(6)], last_seq=6)
    assert restored.first_seq == 5 and restored.since(0) == ([ev(5), ev(6)], 4)
    empty = ReplayBuffer(10, 10_000, 60.0)
    empty.restore([], last_seq=7)
    assert empty.first_seq == 8 and empty.since(3) == ([], 4)


def test_timer_wheel_fires_never_early_at_most_one_slot_late() -> None:
    wheel: TimerWheel[str] = TimerWheel(0.5)
    wheel.schedule("a", 10.2)
    wheel.schedule("b", 10.5)
    wheel.schedule("c", 30.0)
    assert wheel.next_due() == pytest.approx(10.5)
    assert wheel.pop_due(10.1) == []
    assert sorted(wheel.pop_due(10.5)) == ["a", "b"]
    wheel.schedule("c", 12.0)  # rescheduling moves it
    wheel.schedule("d", 11.0)
    wheel.cancel("d")
    assert wheel.pop_due(11.5) == []
    assert wheel.pop_due(12.0) == ["c"]
    assert len(wheel) == 0 and wheel.next_due() is None


def test_session_ids_are_unguessable_and_unique() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 32 for i in ids)


def test_session_batches_and_record_round_trip() -> None:
    session = Session(id="s1", owner="tok", admin=False, replay=ReplayBuffer(3, 10_000, 60.0))
    frames = [session.emit('"id":"j","kind":"started"}', wall_now=1.0) for _ in range(5)]
    assert frames[0] == '{"type":"event","seq":1,"id":"j","kind":"started"}'
    batch = session.take_batch(2.0)
    assert batch is not None
    assert [e.seq for e in batch.events] == [3, 4, 5]  # 1 and 2 fell out of the buffer already
    assert batch.trim_through == 2 and batch.record is not None and batch.record.last_seq == 5
    session.batch_failed(batch)
    again = session.take_batch(2.0)
    assert again is not None and [e.seq for e in again.events] == [3, 4, 5]
    session.batch_done(again)
    assert session.take_batch(3.0) is None
    record = SessionRecord(
        "s1", last_seq=5, first_seq=3, topics=["ops", "chat:a:b"], events=again.events
    )
    back = Session.from_record(
        record, owner="tok", admin=False, replay=ReplayBuffer(3, 10_000, 60.0)
    )
    assert back.last_seq == 5 and back.topics == {"chat:a:b"}  # ops needs an admin token
    assert back.resume_from(2) == ([e.frame for e in again.events], 0)
    assert back.resume_from(0)[1] == 2


def test_session_refuses_reused_job_ids() -> None:
    session = Session(id="s", owner="t", admin=False, replay=ReplayBuffer(3, 100, 1.0))
    assert not session.knows_job("a")
    session.remember_job("a")
    assert session.knows_job("a")


def test_config_validation_and_labels() -> None:
    with pytest.raises(ValueError):
        HubConfig(heartbeat_s=0)
    cfg = HubConfig(tokens=frozenset({"secret"}))
    assert cfg.label_of("secret") == token_label("secret") and "secret" not in cfg.label_of(
        "secret"
    )


def test_timer_wheel_with_many_slots_and_reschedules_stays_exact() -> None:
    wheel: TimerWheel[int] = TimerWheel(0.01)
    for key in range(1000):
        wheel.schedule(key, 1.0 + key * 0.013)
    for key in range(0, 1000, 2):  # move half of them later, as a pong does with a deadline
        wheel.schedule(key, 100.0 + key * 0.013)
    for key in range(0, 1000, 4):
        wheel.cancel(key)
    fired: list[int] = []
    now = 0.0
    while len(wheel):
        due = wheel.next_due()
        assert due is not None and due >= now
        now = due
        batch = wheel.pop_due(now)
        assert batch, "next_due named a slot with nothing in it"
        fired += batch
    expected_odd = list(range(1, 1000, 2))
    expected_moved = [k for k in range(0, 1000, 2) if k % 4]
    assert fired == expected_odd + expected_moved
    assert wheel.next_due() is None and wheel.pop_due(1e9) == []

"""The connection state machine driven by a fake clock: hello gate, heartbeat, limits."""

from __future__ import annotations

import json

from bridge.hub import protocol as p
from bridge.hub.config import HubConfig
from bridge.hub.connection import Close, ConnectionCore, Phase, Send
from tests.hub.fakes import FakeClock

CFG = HubConfig(
    tokens=frozenset({"t"}),
    heartbeat_s=45.0,
    heartbeat_timeout_s=10.0,
    hello_timeout_s=10.0,
    submit_rate=10.0,
    submit_burst=20,
    frame_rate=100.0,
    frame_burst=200,
)
HELLO = json.dumps({"type": "hello", "token": "t"})


def opened(clock: FakeClock) -> ConnectionCore:
    """A welcomed core whose first ping (sent right after welcome) was answered at once."""
    core = ConnectionCore("c1", CFG, clock())
    actions, frame = core.receive(HELLO, clock())
    assert actions == [] and isinstance(frame, p.Hello)
    core.welcomed(clock())
    [ping] = core.on_timer(clock())
    assert isinstance(ping, Send)
    core.receive(json.dumps({"type": "pong", "ts": json.loads(ping.frame)["ts"]}), clock())
    return core


def test_first_ping_right_after_welcome_measures_rtt_within_one_round_trip() -> None:
    clock = FakeClock()
    core = ConnectionCore("c1", CFG, clock())
    core.receive(HELLO, clock())
    start = clock()
    core.welcomed(start)
    assert core.rtt_s is None and core.last_pong_at is None
    assert core.next_deadline() == start  # due at once, not a whole interval later
    [send] = core.on_timer(clock())
    assert isinstance(send, Send)
    ping = json.loads(send.frame)
    assert ping["type"] == "ping" and ping["ts"] == round(start, 6)
    assert core.next_deadline() == start + 10.0  # its pong deadline
    core.receive(json.dumps({"type": "pong", "ts": ping["ts"]}), clock.advance(0.004))
    assert core.rtt_s is not None and abs(core.rtt_s - 0.004) < 1e-9
    assert core.last_pong_at == clock()
    # The cadence continues from there: the next ping is one interval after the first.
    assert core.next_deadline() == start + 45.0
    assert core.on_timer(start + 44.9) == []
    [again] = core.on_timer(start + 45.0)
    assert json.loads(again.frame)["type"] == "ping"  # type: ignore[union-attr]


def test_a_client_that_never_answers_the_first_ping_is_closed_at_its_deadline() -> None:
    clock = FakeClock()
    core = ConnectionCore("c1", CFG, clock())
    core.receive(HELLO, clock())
    core.welcomed(clock())
    [send] = core.on_timer(clock())
    assert isinstance(send, Send)
    assert core.on_timer(clock.advance(9.999)) == []
    assert core.on_timer(clock.advance(0.001)) == [Close(4002, "heartbeat timeout")]


def test_hello_deadline_closes_4001() -> None:
    clock = FakeClock()
    core = ConnectionCore("c1", CFG, clock())
    assert core.next_deadline() == clock() + 10.0
    assert core.on_timer(clock.advance(9.99)) == []
    assert core.on_timer(clock.advance(0.01)) == [Close(4001, "no hello in time")]
    assert core.phase is Phase.CLOSED and core.next_deadline() is None
    assert core.receive(HELLO, clock()) == ([], None)  # nothing is read after a close


def test_first_frame_must_be_hello() -> None:
    clock = FakeClock()
    for text in ('{"type":"ping"}', "junk", '{"type":"submit"}'):
        core = ConnectionCore("c1", CFG, clock())
        actions, frame = core.receive(text, clock())
        assert frame is None and actions == [Close(4001, "hello expected")]


def test_heartbeat_ping_pong_rtt_and_next_ping() -> None:
    clock = FakeClock()
    core = opened(clock)
    start = clock()
    assert core.next_deadline() == start + 45.0
    assert core.on_timer(clock.advance(44.0)) == []
    [send] = core.on_timer(clock.advance(1.0))
    assert isinstance(send, Send)
    ping = json.loads(send.frame)
    assert ping["type"] == "ping"
    assert core.next_deadline() == clock() + 10.0
    # A pong for some other ping does not count.
    core.receive(json.dumps({"type": "pong", "ts": ping["ts"] + 1}), clock.advance(0.5))
    assert core.ping_ts is not None
    core.receive(json.dumps({"type": "pong", "ts": ping["ts"]}), clock.advance(0.25))
    assert core.ping_ts is None and core.rtt_s == 0.75 and core.last_pong_at == clock()
    assert core.next_deadline() == start + 90.0
    assert core.on_timer(start + 55.0) == []  # the old pong deadline passes harmlessly
    [again] = core.on_timer(start + 90.0)
    assert json.loads(again.frame)["type"] == "ping"  # type: ignore[union-attr]


def test_missed_pong_closes_4002_exactly_at_the_deadline() -> None:
    clock = FakeClock()
    core = opened(clock)
    core.on_timer(clock.advance(45.0))
    assert core.on_timer(clock.advance(9.999)) == []
    assert core.on_timer(clock.advance(0.001)) == [Close(4002, "heartbeat timeout")]
    assert core.close_code == 4002


def test_client_ping_is_answered_and_second_hello_refused() -> None:
    clock = FakeClock()
    core = opened(clock)
    assert core.receive('{"type":"ping","ts":3}', clock()) == (
        [Send('{"type":"pong","ts":3.0}')],
        None,
    )
    actions, frame = core.receive(HELLO, clock())
    assert frame is None and json.loads(actions[0].frame)["code"] == "bad_frame"  # type: ignore[union-attr]


def test_submit_token_bucket_10_per_s_burst_20() -> None:
    clock = FakeClock()
    core = opened(clock)
    submit = json.dumps({"type": "submit", "id": "j", "prompt": "p", "image": "AAAA"})
    results = [core.receive(submit, clock())[1] is not None for _ in range(25)]
    assert results.count(True) == 20
    actions, frame = core.receive(submit, clock())
    assert frame is None and json.loads(actions[0].frame)["code"] == "rate_limited"  # type: ignore[union-attr]
    clock.advance(0.1)
    assert core.receive(submit, clock())[1] is not None
    assert core.receive(submit, clock())[1] is None


def test_frame_flood_closes_4008_and_errors_keep_the_connection() -> None:
    clock = FakeClock()
    core = opened(clock)
    actions, _ = core.receive('{"type":"nope"}', clock())
    assert json.loads(actions[0].frame)["code"] == "unknown_type"  # type: ignore[union-attr]
    closes = []
    for _ in range(300):
        actions, _ = core.receive('{"type":"ping"}', clock())
        closes += [a for a in actions if isinstance(a, Close)]
    assert closes == [Close(4008, "too many frames")]


def test_pings_keep_a_fixed_cadence_when_the_timer_runs_late() -> None:
    clock = FakeClock()
    core = opened(clock)
    start = clock()
    core.on_timer(clock.advance(45.3))  # fired 0.3 s late
    core.receive(json.dumps({"type": "pong", "ts": core.ping_ts}), clock.advance(0.1))
    assert core.next_deadline() == start + 90.0  # not start + 90.3: lateness does not add up
    core.on_timer(start + 90.0)
    core.receive(json.dumps({"type": "pong", "ts": core.ping_ts}), start + 90.1)
    core.on_timer(start + 300.0)  # a stall longer than the interval: no burst of catch-up pings
    assert core.next_ping_at == start + 345.0

"""The I/O-free long-connection core, driven with a fake clock and no socket."""

from __future__ import annotations

import json
import random

from adapters.feishu.longconn.client import reconnect_delay, refusal
from adapters.feishu.longconn.frame import (
    METHOD_CONTROL,
    METHOD_DATA,
    Frame,
    decode_frame,
    encode_frame,
)
from adapters.feishu.longconn.protocol import (
    ClientConfig,
    ConfigChanged,
    EventDelivery,
    LongConnProtocol,
)
from adapters.feishu.openapi import FeishuApiError

CFG = ClientConfig(
    ping_interval_s=120.0, reconnect_count=-1, reconnect_interval_s=120, reconnect_nonce_s=30
)


def proto(now: float = 0.0, **kw: float) -> LongConnProtocol:
    return LongConnProtocol(service_id=33, config=CFG, now=now, pong_timeout_s=10.0, **kw)  # type: ignore[arg-type]


def pong(config: dict[str, object] | None = None) -> bytes:
    payload = json.dumps(config).encode() if config is not None else b""
    return encode_frame(
        Frame(service=33, method=METHOD_CONTROL, headers=(("type", "pong"),), payload=payload)
    )


def data(mid: str, payload: bytes, *, total: int = 1, seq: int = 0) -> bytes:
    headers = (
        ("type", "event"),
        ("message_id", mid),
        ("sum", str(total)),
        ("seq", str(seq)),
        ("trace_id", "t"),
    )
    return encode_frame(
        Frame(seq_id=5, log_id=6, service=33, method=METHOD_DATA, headers=headers, payload=payload)
    )


def test_pings_at_once_and_then_at_the_interval() -> None:
    p = proto()
    p.tick(0.0)
    [ping] = [decode_frame(b) for b in p.data_to_send()]
    assert ping.method == METHOD_CONTROL and ping.service == 33 and ping.header("type") == "ping"
    p.receive(pong(), 0.1)
    assert p.next_wakeup() == 120.0
    p.tick(119.9)
    assert p.data_to_send() == []
    p.tick(120.0)
    assert len(p.data_to_send()) == 1
    assert p.failure is None


def test_pong_loss_fails_within_interval_plus_deadline() -> None:
    p = proto()
    p.tick(0.0)
    p.receive(pong(), 0.05)
    p.tick(120.0)  # second ping; the server stops answering
    assert p.next_wakeup() == 130.0
    p.tick(129.99)
    assert p.failure is None
    p.tick(130.0)
    assert p.failure == "pong_timeout"
    p.tick(500.0)
    assert p.data_to_send() == [encode_frame(p.ping_frame())] * 2  # nothing after failing


def test_any_frame_counts_as_proof_of_life() -> None:
    p = proto()
    p.tick(0.0)
    p.receive(data("m1", b"{}"), 9.0)
    p.tick(15.0)
    assert p.failure is None


def test_pong_carries_a_new_client_config() -> None:
    p = proto()
    p.tick(0.0)
    p.receive(
        pong(
            {"PingInterval": 30, "ReconnectCount": 5, "ReconnectInterval": 60, "ReconnectNonce": 2}
        ),
        0.1,
    )
    [change] = p.events_received()
    assert isinstance(change, ConfigChanged)
    assert change.config == ClientConfig(30.0, 5, 60.0, 2.0)
    assert p.next_wakeup() == 30.0
    p.receive(pong({"PingInterval": "x", "ReconnectCount": -7, "ReconnectNonce": -1}), 0.2)
    assert p.events_received() == []  # invalid values keep the old ones


def test_single_event_and_ack_frame() -> None:
    p = proto()
    p.receive(data("m1", b'{"a":1}'), 1.0)
    [event] = p.events_received()
    assert isinstance(event, EventDelivery)
    assert (event.message_id, event.kind, event.payload, event.error) == (
        "m1",
        "event",
        b'{"a":1}',
        None,
    )
    p.ack(event, 200, biz_rt_ms=12)
    [ack] = [decode_frame(b) for b in p.data_to_send()]
    assert ack.method == METHOD_DATA and ack.seq_id == 5 and ack.log_id == 6
    assert ack.header("message_id") == "m1" and ack.header("biz_rt") == "12"
    assert ack.payload == b'{"code":200}'  # what Feishu's SDKs send: no headers, no data
    p.ack(event, 500)
    [failed] = [decode_frame(b) for b in p.data_to_send()]
    assert failed.payload == b'{"code":500}' and failed.header("biz_rt") == "0"


def test_fragments_are_reassembled_in_seq_order() -> None:
    p = proto()
    p.receive(data("m2", b"C", total=3, seq=2), 1.0)
    p.receive(data("m2", b"A", total=3, seq=0), 1.1)
    assert p.events_received() == []
    p.receive(data("m2", b"A", total=3, seq=0), 1.15)  # a repeated fragment changes nothing
    p.receive(data("m2", b"B", total=3, seq=1), 1.2)
    [event] = p.events_received()
    assert isinstance(event, EventDelivery) and event.payload == b"ABC"


def test_incomplete_fragments_expire() -> None:
    p = proto(fragment_ttl_s=5.0)
    p.tick(0.0)
    p.receive(data("m3", b"A", total=2, seq=0), 1.0)
    assert p.next_wakeup() == 6.0
    p.tick(6.0)
    assert p.dropped_fragments == 1
    p.receive(data("m3", b"B", total=2, seq=1), 6.5)
    assert p.events_received() == []


def test_oversized_and_bad_fragments_are_reported_for_a_clean_ack() -> None:
    p = proto(max_event_bytes=4)
    p.receive(data("big", b"12345"), 1.0)
    p.receive(data("big2", b"123", total=2, seq=0), 1.0)
    p.receive(data("big2", b"45", total=2, seq=1), 1.0)
    p.receive(data("odd", b"x", total=2, seq=7), 1.0)
    p.receive(data("huge", b"x", total=100000, seq=0), 1.0)
    errors = [(e.message_id, e.error) for e in p.events_received() if isinstance(e, EventDelivery)]
    assert errors == [
        ("big", "too_large"),
        ("big2", "too_large"),
        ("odd", "bad_fragment"),
        ("huge", "bad_fragment"),
    ]


def test_garbage_frames_are_counted_not_fatal() -> None:
    p = proto()
    p.receive(b"\xff\xff", 1.0)
    p.receive(encode_frame(Frame(method=7)), 1.0)
    assert p.bad_frames == 2 and p.failure is None
    p.receive(data("m", b"{}"), 1.0)
    assert len(p.events_received()) == 1


def test_reconnect_delay_starts_from_reconnect_interval_and_caps() -> None:
    rng = random.Random(1)
    cfg = ClientConfig(
        ping_interval_s=120, reconnect_count=-1, reconnect_interval_s=8.0, reconnect_nonce_s=3.0
    )
    first = [reconnect_delay(1, cfg, cap_s=60.0, rng=rng) for _ in range(50)]
    assert all(0.0 <= d <= 3.0 for d in first)  # the first retry: a random part of the nonce
    assert max(first) - min(first) > 1.0  # spread, not one fixed value
    # Later ones: ReconnectInterval is the base (never waited less), doubling up to the cap.
    for step, ceiling in ((2, 8.0), (3, 16.0), (4, 32.0), (5, 60.0), (9, 60.0)):
        waits = [reconnect_delay(step, cfg, cap_s=60.0, rng=rng) for _ in range(20)]
        assert all(ceiling <= d <= ceiling * 1.2 for d in waits), (step, waits)
    # A cap below Feishu's interval never undercuts it (the SDKs wait exactly that interval).
    assert min(reconnect_delay(6, cfg, cap_s=2.0, rng=rng) for _ in range(20)) >= 8.0
    # The nonce is bounded by the cap too.
    short = ClientConfig(reconnect_interval_s=1.0, reconnect_nonce_s=30.0)
    assert max(reconnect_delay(1, short, cap_s=5.0, rng=rng) for _ in range(50)) <= 5.0


def test_reconnect_delay_is_reproducible_with_an_injected_rng() -> None:
    cfg = ClientConfig(reconnect_interval_s=4.0, reconnect_nonce_s=2.0)
    a = [reconnect_delay(s, cfg, cap_s=30.0, rng=random.Random(42)) for s in range(1, 6)]
    b = [reconnect_delay(s, cfg, cap_s=30.0, rng=random.Random(42)) for s in range(1, 6)]
    assert a == b


def test_endpoint_refusals_follow_the_sdk_codes() -> None:
    assert refusal(FeishuApiError("auth failed", code=514))
    assert refusal(FeishuApiError("forbidden", code=403))
    assert refusal(FeishuApiError("no credential", code=1000040344))
    assert not refusal(FeishuApiError("system busy", code=1))
    assert not refusal(FeishuApiError("internal error", code=1000040343))
    assert not refusal(FeishuApiError("gave up: http 503", code=-1, http_status=503))

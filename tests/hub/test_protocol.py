"""Frame parsing and validation: every hostile frame becomes a FrameError, never a crash."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.hub import protocol as p
from engine.types import Delta, Done, Failed, JobEvent, Queued, Started, Usage

LIMITS = {"max_prompt_chars": 100, "max_image_bytes": 30}


def parse(obj: object) -> p.ClientFrame:
    return p.parse_frame(json.dumps(obj), **LIMITS)


def test_hello_parses_and_bad_token_becomes_empty() -> None:
    assert parse({"type": "hello", "token": "t", "session": None, "last_seq": 3}) == p.Hello(
        "t", None, 3
    )
    assert parse({"type": "hello", "token": 5}) == p.Hello("", None, None)
    with pytest.raises(p.FrameError):
        parse({"type": "hello", "token": "t", "last_seq": -1})
    with pytest.raises(p.FrameError):
        parse({"type": "hello", "token": "t", "session": 7})


def test_submit_validation() -> None:
    image = base64.b64encode(b"abc").decode()
    ok = parse({"type": "submit", "id": "j1", "prompt": "hi", "image": image, "max_tokens": 5})
    assert ok == p.Submit("j1", "hi", image, 5)
    cases = [
        ({"type": "submit", "prompt": "hi", "image": image}, "bad_frame"),
        ({"type": "submit", "id": "", "prompt": "hi", "image": image}, "bad_frame"),
        ({"type": "submit", "id": "x" * 200, "prompt": "hi", "image": image}, "too_large"),
        ({"type": "submit", "id": "a b", "prompt": "hi", "image": image}, "bad_frame"),
        ({"type": "submit", "id": "j", "prompt": 3, "image": image}, "bad_frame"),
        ({"type": "submit", "id": "j", "prompt": "p" * 101, "image": image}, "too_large"),
        ({"type": "submit", "id": "j", "prompt": "hi"}, "bad_image"),
        ({"type": "submit", "id": "j", "prompt": "hi", "image": "A" * 100}, "too_large"),
        (
            {"type": "submit", "id": "j", "prompt": "hi", "image": image, "max_tokens": 0},
            "bad_frame",
        ),
        (
            {"type": "submit", "id": "j", "prompt": "hi", "image": image, "max_tokens": True},
            "bad_frame",
        ),
    ]
    for frame, code in cases:
        with pytest.raises(p.FrameError) as info:
            parse(frame)
        assert info.value.code == code, frame


def test_other_frames() -> None:
    assert parse({"type": "ack", "seq": 4}) == p.Ack(4)
    assert parse({"type": "ping"}) == p.Ping(None)
    assert parse({"type": "pong", "ts": 1.5}) == p.Pong(1.5)
    assert parse({"type": "subscribe", "topic": "chat:feishu:oc_1"}) == p.Subscribe(
        "chat:feishu:oc_1"
    )
    assert parse({"type": "unsubscribe", "topic": "ops"}) == p.Unsubscribe("ops")
    assert parse({"type": "cancel", "id": "j"}) == p.Cancel("j")
    for bad in ({"type": "subscribe", "topic": "news"}, {"type": "ack", "seq": "1"}):
        with pytest.raises(p.FrameError):
            parse(bad)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad_frame"),
        ("[1,2]", "bad_frame"),
        ('{"type": 3}', "bad_frame"),
        ('{"type": "launch"}', "unknown_type"),
        ('{"type": "ping", "ts": NaN}', "bad_frame"),
        ('{"type": "ping", "ts": 1e999}', "bad_frame"),
        ("[" * 100_000, "bad_frame"),
    ],
)
def test_garbage(text: str, code: str) -> None:
    with pytest.raises(p.FrameError) as info:
        p.parse_frame(text, **LIMITS)
    assert info.value.code == code


def test_event_frames_are_exact_json() -> None:
    events: list[JobEvent] = [
        Queued(2),
        Started(),
        Delta('hé\n"x"'),
        Done("all", Usage(3, 4), cached=True),
        Failed("busy", "full", 1.5),
    ]
    for seq, event in enumerate(events, 1):
        frame = json.loads(p.event_frame(seq, p.event_tail("j1", event, "chat:feishu:oc")))
        assert frame["type"] == "event" and frame["seq"] == seq and frame["id"] == "j1"
        assert frame["kind"] == event.kind and frame["topic"] == "chat:feishu:oc"
    done = json.loads(p.event_frame(1, p.event_tail("j", events[3])))
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4} and done["cached"] is True
    assert "topic" not in done


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
frame_objects = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["hello", "submit", "cancel", "subscribe", "unsubscribe", "ack", "ping", "pong", "x"]
        )
    },
    optional={
        "token": json_values,
        "session": json_values,
        "last_seq": json_values,
        "id": json_values,
        "prompt": json_values,
        "image": json_values,
        "max_tokens": json_values,
        "topic": json_values,
        "seq": json_values,
        "ts": json_values,
    },
)


@settings(max_examples=150, deadline=None)
@given(obj=frame_objects)
def test_fuzz_structured_frames_parse_or_frame_error(obj: dict[str, object]) -> None:
    try:
        text = json.dumps(obj)
    except ValueError:
        return
    try:
        frame = p.parse_frame(text, **LIMITS)
    except p.FrameError as exc:
        assert exc.code in {"bad_frame", "unknown_type", "bad_image", "too_large"}
        json.loads(p.error(exc.code, exc.message, exc.job_id))
    else:
        assert isinstance(
            frame,
            p.Hello | p.Submit | p.Cancel | p.Subscribe | p.Unsubscribe | p.Ack | p.Ping | p.Pong,
        )
        if isinstance(frame, p.Ping):
            json.loads(p.pong(frame.ts))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_any_text(text: str) -> None:
    with contextlib.suppress(p.FrameError):
        p.parse_frame(text, **LIMITS)


@pytest.mark.parametrize(
    ("frame", "parsed"),
    [
        ({"type": "hello", "token": "t", "v": 2}, p.Hello("t", None, None)),
        ({"type": "cancel", "id": "j", "reason": "x"}, p.Cancel("j")),
        ({"type": "subscribe", "topic": "chat:feishu:c", "x": [1]}, p.Subscribe("chat:feishu:c")),
        ({"type": "unsubscribe", "topic": "ops", "x": None}, p.Unsubscribe("ops")),
        ({"type": "ack", "seq": 4, "extra": {"a": 1}}, p.Ack(4)),
    ],
)
def test_unknown_fields_are_ignored(frame: dict[str, object], parsed: p.ClientFrame) -> None:
    """docs/protocol.md: a newer client's extra fields never break an older server."""
    assert parse(frame) == parsed


def test_unknown_fields_in_a_submit_are_ignored() -> None:
    image = base64.b64encode(b"img").decode()
    frame = parse({"type": "submit", "id": "j", "prompt": "q", "image": image, "priority": 9})
    assert isinstance(frame, p.Submit) and (frame.id, frame.prompt) == ("j", "q")

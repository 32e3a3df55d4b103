"""The one job-event encoding: every event round-trips, and bad input is only a ValueError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.fanout import decode_event, encode_event
from bridge.hub.protocol import event_tail
from bridge.jobs.events import event_fields, event_from_fields
from engine.types import Delta, Done, Failed, JobEvent, Queued, Started, Usage

texts = st.text()  # any unicode, surrogates and NULs included
ints = st.integers(min_value=0, max_value=2**63)
retry = st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False)
events: st.SearchStrategy[JobEvent] = st.one_of(
    st.builds(Queued, ints),
    st.just(Started()),
    st.builds(Delta, texts),
    st.builds(Done, texts, st.builds(Usage, ints, ints), st.booleans()),
    st.builds(Failed, texts, texts, retry),
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(events)
def test_every_event_round_trips(event: JobEvent) -> None:
    fields = event_fields(event)
    assert fields["kind"] == event.kind
    assert event_from_fields(fields) == event
    # ... also through JSON text, as every surface carries it.
    assert event_from_fields(json.loads(json.dumps(fields))) == event


def test_wire_shapes() -> None:
    assert event_fields(Queued(2)) == {"kind": "queued", "position": 2}
    assert event_fields(Started()) == {"kind": "started"}
    assert event_fields(Delta("hé")) == {"kind": "delta", "text": "hé"}
    assert event_fields(Done("x", Usage(3, 4), cached=True)) == {
        "kind": "done",
        "text": "x",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "cached": True,
    }
    # retry_after appears only when set.
    assert event_fields(Failed("busy", "full")) == {
        "kind": "error",
        "code": "busy",
        "message": "full",
    }
    assert event_fields(Failed("busy", "full", 1.5))["retry_after"] == 1.5
    with pytest.raises(TypeError):
        event_fields("not an event")  # type: ignore[arg-type]


@FAST
@given(texts, ints, ints, st.booleans())
def test_the_old_list_form_of_usage_decodes(text: str, prompt: int, done: int, c: bool) -> None:
    old = {"kind": "done", "text": text, "usage": [prompt, done], "cached": c}
    assert event_from_fields(old) == Done(text, Usage(prompt, done), c)


def test_unknown_fields_are_ignored_and_cached_defaults_to_false() -> None:
    data = {"kind": "done", "text": "t", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    assert event_from_fields({**data, "extra": [1]}) == Done("t", Usage(1, 2), False)
    assert event_from_fields({"kind": "error", "code": "c", "message": "m", "retry_after": 2}) == (
        Failed("c", "m", 2.0)
    )


GOOD_USAGE = {"prompt_tokens": 1, "completion_tokens": 2}
MALFORMED: list[Any] = [
    {},
    {"kind": "nope"},
    {"kind": None},
    {"kind": ["delta"]},
    {"kind": "delta"},
    {"kind": "delta", "text": 5},
    {"kind": "delta", "text": None},
    {"kind": "queued"},
    {"kind": "queued", "position": "1"},
    {"kind": "queued", "position": True},
    {"kind": "queued", "position": 1.0},
    {"kind": "done", "text": "t"},
    {"kind": "done", "text": "t", "usage": None},
    {"kind": "done", "text": "t", "usage": "1,2"},
    {"kind": "done", "text": "t", "usage": 3},
    {"kind": "done", "text": "t", "usage": [1]},
    {"kind": "done", "text": "t", "usage": [1, 2, 3]},
    {"kind": "done", "text": "t", "usage": [True, 2]},
    {"kind": "done", "text": "t", "usage": {"prompt_tokens": 1}},
    {"kind": "done", "text": "t", "usage": {"prompt_tokens": False, "completion_tokens": 2}},
    {"kind": "done", "text": "t", "usage": {"prompt_tokens": 1.0, "completion_tokens": 2}},
    {"kind": "done", "text": 1, "usage": GOOD_USAGE},
    {"kind": "error", "code": "c"},
    {"kind": "error", "message": "m"},
    {"kind": "error", "code": 1, "message": "m"},
    {"kind": "error", "code": "c", "message": "m", "retry_after": "soon"},
    {"kind": "error", "code": "c", "message": "m", "retry_after": [1]},
    {"kind": "error", "code": "c", "message": "m", "retry_after": 10**400},
    {"kind": "error", "code": "c", "message": "m", "retry_after": True},
    {"kind": "error", "code": "c", "message": "m", "retry_after": "1.5"},
    [],
    "delta",
    None,
    7,
]


@pytest.mark.parametrize("data", MALFORMED, ids=[repr(d)[:60] for d in MALFORMED])
def test_malformed_input_is_a_value_error(data: Any) -> None:
    with pytest.raises(ValueError):
        event_from_fields(data)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**1023, max_value=2**1100)  # beyond any float
    | st.floats()
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = st.sampled_from(
    ["kind", "text", "position", "usage", "cached", "code", "message", "retry_after", "x"]
)
KINDS = st.sampled_from(["queued", "started", "delta", "done", "error", "other"])
event_like = st.dictionaries(FIELD_NAMES, json_values, max_size=6) | st.fixed_dictionaries(
    {"kind": KINDS},
    optional={
        "text": json_values,
        "position": json_values,
        "usage": json_values
        | st.fixed_dictionaries({"prompt_tokens": json_values, "completion_tokens": json_values}),
        "cached": json_values,
        "code": json_values,
        "message": json_values,
        "retry_after": json_values,
    },
)


@st.composite
def damaged(draw: st.DrawFn) -> dict[str, Any]:
    """A good event's fields with one field (or one usage count) dropped or replaced."""
    fields = event_fields(draw(events))
    usage = fields.get("usage")
    if isinstance(usage, dict) and draw(st.booleans()):
        fields = {**fields, "usage": dict(usage)}
        fields["usage"][draw(st.sampled_from(sorted(usage)))] = draw(scalars | json_values)
        return fields
    key = draw(st.sampled_from([*fields, "retry_after", "cached"]))
    if key in fields and draw(st.booleans()):
        del fields[key]
    else:
        fields[key] = draw(scalars | json_values)
    return fields


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(damaged(), event_like, json_values))
def test_arbitrary_json_decodes_to_an_event_or_a_value_error(data: Any) -> None:
    try:
        event = event_from_fields(data)
    except ValueError:
        return
    # Whatever decodes is a well-formed event that encodes again.
    assert event_from_fields(event_fields(event)) == event


# --- one encoder for every surface -----------------------------------------------------------
@FAST
@given(events, st.text(), st.text())
def test_ws_frames_and_the_cluster_log_carry_the_same_event_fields(
    event: JobEvent, job_id: str, topic: str
) -> None:
    fields = event_fields(event)
    frame = json.loads('{"type":"event","seq":1,' + event_tail(job_id, event))
    assert frame == {"type": "event", "seq": 1, "id": job_id, **fields}
    with_topic = json.loads("{" + event_tail(job_id, event, topic))
    assert with_topic == {"id": job_id, **fields, "topic": topic}
    logged = json.loads(encode_event(topic, job_id, event))
    assert logged == {"topic": topic, "id": job_id, **fields}
    assert decode_event(encode_event(topic, job_id, event)) == (topic, job_id, event)

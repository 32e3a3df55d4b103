"""The request parser and the stop-sequence scanner, without I/O (hypothesis for hostile input)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.http.chat import ChatRenderer, StopScanner
from bridge.http.errors import ApiError
from bridge.http.parse import Limits, parse_chat
from engine.types import Delta, Done, Usage

LIMITS = Limits(max_image_bytes=1024, max_prompt_chars=200, image_hosts=frozenset({"img.test"}))
PNG = base64.b64encode(b"\x89PNG-bytes").decode()


def body(**extra: Any) -> bytes:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
        ],
    }
    return json.dumps({"model": "tiny", "messages": [message], **extra}).encode()


def test_a_full_request_maps_to_one_job() -> None:
    req = parse_chat(
        body(
            max_tokens=9,
            max_completion_tokens=7,
            stream=True,
            temperature=0.5,
            top_p=1,
            seed=3,
            stop=["\n", "END"],
            stream_options={"include_usage": True},
            user="u1",
        ),
        LIMITS,
    )
    assert req.prompt == "what is this?" and req.image == b"\x89PNG-bytes"
    assert req.max_tokens == 7 and req.stream and req.include_usage
    assert req.stop == ("\n", "END") and req.model == "tiny"


def test_a_conversation_is_joined_with_roles_and_an_allowed_url_is_kept() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://IMG.test/a.jpg"}},
                {"type": "text", "text": "what?"},
            ],
        },
    ]
    req = parse_chat(json.dumps({"messages": msgs}).encode(), LIMITS)
    assert req.prompt == "System: be brief\nUser: what?"
    assert req.image is None and req.image_url == "https://IMG.test/a.jpg" and req.model is None


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"n": 2}, 400),
        ({"tools": [{"type": "function"}]}, 400),
        ({"temperature": 3}, 400),
        ({"max_tokens": 0}, 400),
        ({"max_tokens": True}, 400),
        ({"stop": ["a"] * 5}, 400),
        ({"stream": "yes"}, 400),
        ({"seed": 1.5}, 400),
        ({"model": 3}, 400),
    ],
)
def test_bad_parameters_are_refused(extra: dict[str, Any], status: int) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body(**extra), LIMITS)
    assert err.value.status == status and err.value.param is not None


def test_two_images_and_an_image_in_a_system_message_are_refused() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}
    two = {"messages": [{"role": "user", "content": [part, part]}]}
    sys_img = {"messages": [{"role": "system", "content": [part]}]}
    for obj in (two, sys_img):
        with pytest.raises(ApiError) as err:
            parse_chat(json.dumps(obj).encode(), LIMITS)
        assert err.value.status == 400


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_a_clear_400(raw: bytes) -> None:
    try:
        parse_chat(raw, LIMITS)
    except ApiError as exc:
        assert exc.status in (400, 413) and exc.message


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "stream",
                "stop",
                "max_tokens",
                "n",
                "seed",
                "temperature",
                "stream_options",
                "tools",
            ]
        ),
        JSONISH,
        max_size=6,
    ),
    st.lists(JSONISH, max_size=3),
)
def test_any_json_shape_gives_a_request_or_a_clear_error(
    top: dict[str, Any], contents: list[Any]
) -> None:
    top = dict(top)
    if contents:
        top["messages"] = [{"role": "user", "content": c} for c in contents]
    try:
        req = parse_chat(json.dumps(top).encode(), LIMITS)
    except ApiError as exc:
        assert exc.status in (400, 413)
        assert "Traceback" not in exc.message
    else:
        assert req.image is not None or req.image_url is not None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abXY\n", max_size=6), max_size=8),
    st.lists(st.text(alphabet="abXY\n", min_size=1, max_size=3), max_size=4),
)
def test_the_stop_scanner_cuts_at_the_first_stop_however_the_text_is_split(
    pieces: list[str], stops: list[str]
) -> None:
    scanner = StopScanner(tuple(stops))
    out = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    whole = "".join(pieces)
    cuts = [i for i in (whole.find(s) for s in stops) if i >= 0]
    assert out == (whole[: min(cuts)] if cuts else whole)
    assert scanner.stopped == bool(cuts)


def test_the_renderer_stops_early_and_reports_finish_reasons() -> None:
    r = ChatRenderer("c1", 0, "m", include_usage=True, stop=("cat",))
    out = r.feed(Delta("a c")) + r.feed(Delta("at here"))
    assert r.stopped and r.finished and r.text == "a " and r.finish_reason == "stop"
    assert out[-1] == "[DONE]" and json.loads(out[-2])["usage"]["completion_tokens"] == 2
    r2 = ChatRenderer("c2", 0, "m", include_usage=False, max_tokens=2)
    r2.feed(Delta("ab"))
    r2.feed(Done("abcd", Usage(3, 2)))  # a cached answer may carry more text than its deltas
    assert r2.text == "abcd" and r2.finish_reason == "length"
    assert r2.completion()["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }

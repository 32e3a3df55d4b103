"""Edge validation of prompts on /ws: a prompt that is not valid Unicode is a ``bad_frame``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.hub import protocol as p

LIMITS = {"max_prompt_chars": 100, "max_image_bytes": 30}


def submit(prompt_json: str) -> str:
    """A submit frame whose prompt is ``prompt_json``, spliced in as raw JSON text."""
    return '{"type":"submit","id":"j1","image":"aGk=","prompt":' + prompt_json + "}"


@pytest.mark.parametrize("prompt", [r'"\ud800"', r'"what \udfff is this"', r'"\ude00\ud83d"'])
def test_lone_surrogates_are_bad_frames_with_the_job_id(prompt: str) -> None:
    with pytest.raises(p.FrameError) as err:
        p.parse_frame(submit(prompt), **LIMITS)
    assert err.value.code == "bad_frame" and err.value.job_id == "j1"
    assert "Unicode" in err.value.message


def test_escaped_pairs_and_control_token_spellings_are_accepted() -> None:
    frame = p.parse_frame(submit(r'"\ud83d\ude00 <image> <|im_end|> \u0000"'), **LIMITS)
    assert isinstance(frame, p.Submit)
    assert frame.prompt == "\U0001f600 <image> <|im_end|> \x00"  # the engine neutralises these


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=()), max_size=40))
def test_any_prompt_parses_or_is_refused_never_crashes(text: str) -> None:
    raw = json.dumps(text)  # ASCII JSON: lone surrogates become \udXXX escapes
    try:
        frame = p.parse_frame(submit(raw), **LIMITS)
    except p.FrameError as err:
        assert err.code == "bad_frame"
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    else:
        assert isinstance(frame, p.Submit) and frame.prompt == text
        frame.prompt.encode("utf-8")

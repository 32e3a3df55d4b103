"""Prompt sanitising (engine.sanitize): user text is valid Unicode and never a control token.

The guard is checked on the tiny model's real processor, on tokenizers carrying the special
tokens of other architectures (Qwen-VL, Gemma, Llama 3, Pixtral spellings), and by property-based
tests that drive hostile text through the real processor and model beside a neighbour row.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoProcessor

from engine.continuous import RunningBatch
from engine.model import Replica, RowResult, RowSpec
from engine.sanitize import WORD_JOINER, PromptGuard, is_valid_text, special_spellings, valid_text

# Spellings of control tokens across the architectures the bridge is meant to serve.
FOREIGN = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<start_of_image>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "[IMG]",
    "[INST]",
]
TINY_SPECIAL = ["<image>", "<s>", "</s>", "<pad>"]
CONTROL = ["\x00", "\x1b", "\r", "\u200b", "\u2028", "\ufeff", "\U000e0001", WORD_JOINER]
NEIGHBOUR = "Describe the image."


@pytest.fixture(scope="module")
def replica(tiny_path: Path) -> Replica:
    """The tiny model, loaded the way the engine loads it."""
    return Replica.load(str(tiny_path), "cpu", "float32")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.new("RGB", (48, 40), (30, 120, 200))


@pytest.fixture(scope="module")
def foreign_processor(tiny_path: Path) -> Any:
    """The tiny processor whose tokenizer also knows other architectures' control tokens."""
    processor = AutoProcessor.from_pretrained(str(tiny_path))
    tokenizer = processor.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": FOREIGN[:-2]})
    tokenizer.add_tokens(["[IMG]", "[INST]"])  # added but not flagged special, as in Pixtral
    return processor


def special_ids(replica: Replica) -> set[int]:
    return {int(i) for i in replica.tokenizer.all_special_ids}


def special_counts(replica: Replica, prompt: str, image: Image.Image) -> Counter[int]:
    """How often each special id occurs in the model input built for ``prompt``."""
    ids = replica.encode([prompt], [image])["input_ids"][0].tolist()
    specials = special_ids(replica)
    return Counter(int(i) for i in ids if int(i) in specials)


# ------------------------------------------------------------------------------ valid Unicode


def test_lone_surrogates_are_detected_and_replaced() -> None:
    assert is_valid_text("plain, 你好, \U0001f600") and not is_valid_text("a\ud800b")
    assert valid_text("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert valid_text("\ud83d\ude00") == "\U0001f600"  # an escaped pair spells its character
    assert valid_text("ok") == "ok"


# ------------------------------------------------------------------------------- spellings


def test_tiny_spellings_cover_its_special_tokens_and_image_placeholder(replica: Replica) -> None:
    assert set(TINY_SPECIAL) <= special_spellings(replica.processor)
    assert replica.processor.image_token in replica.guard.spellings


def test_other_architectures_spellings_are_collected_and_broken(foreign_processor: Any) -> None:
    guard = PromptGuard.for_processor(foreign_processor)
    assert set(FOREIGN) | set(TINY_SPECIAL) <= set(guard.spellings)
    tokenizer = foreign_processor.tokenizer
    hostile = " ".join(FOREIGN + TINY_SPECIAL)
    raw = tokenizer(hostile, add_special_tokens=False)["input_ids"]
    control = {tokenizer.convert_tokens_to_ids(s) for s in FOREIGN + TINY_SPECIAL}
    assert control <= set(raw)  # unescaped, each spelling is its control token
    cleaned = guard.clean(hostile)
    assert not control & set(tokenizer(cleaned, add_special_tokens=False)["input_ids"])
    assert cleaned.replace(WORD_JOINER, "") == hostile  # nothing else changed


def test_clean_leaves_ordinary_text_alone(replica: Replica) -> None:
    for text in ["Describe the image.", "a < b > c", "<img>", "[1] <b>bold</b>", "你好 😀"]:
        assert replica.guard.clean(text) == text


def test_nested_spellings_are_all_broken(replica: Replica) -> None:
    cleaned = replica.guard.clean("<<image>image>> <</s>s>")
    assert not any(s in cleaned for s in replica.guard.spellings)


def test_hostile_prompts_no_longer_fail_their_batch(replica: Replica, photo: Image.Image) -> None:
    """The two reproductions of the issue, beside a neighbour, on the real processor."""
    ends: dict[int, RowResult] = {}
    rows = [RowSpec(photo, NEIGHBOUR, 4), RowSpec(photo, "\ud800", 4)]
    rows.append(RowSpec(photo, "<image> what is this", 4))
    replica.generate(rows, lambda i, t: None, ends.__setitem__, lambda i: False)
    assert sorted(ends) == [0, 1, 2]
    assert all(r.reason in ("eos", "length") for r in ends.values())
    benign = special_counts(replica, NEIGHBOUR, photo)
    assert special_counts(replica, "<image> what is this", photo) == benign


# --------------------------------------------------------------------------- property-based

hostile_text = st.lists(
    st.one_of(
        st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
        st.sampled_from(TINY_SPECIAL + FOREIGN),
        st.sampled_from(CONTROL),
        st.sampled_from(["<", ">", "|", "/", "image", "s", "pad", "\ud800", "\udc00"]),
    ),
    max_size=10,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=hostile_text)
def test_no_control_token_survives_cleaning(text: str) -> None:
    guard = PromptGuard(TINY_SPECIAL + FOREIGN)
    cleaned = guard.clean(text)
    assert is_valid_text(cleaned)
    assert not any(s in cleaned for s in guard.spellings)
    if is_valid_text(text) and not any(s in text for s in guard.spellings):
        assert cleaned == text


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=hostile_text)
def test_hostile_text_never_fails_a_neighbour_row(
    replica: Replica, photo: Image.Image, text: str
) -> None:
    """Through the real processor and model, static ``generate`` and the continuous prefill:
    the neighbour row always ends normally and the hostile prompt adds no control token."""
    rows = [RowSpec(photo, NEIGHBOUR, 3), RowSpec(photo, text, 3)]
    ends: dict[int, RowResult] = {}
    replica.generate(rows, lambda i, t: None, ends.__setitem__, lambda i: False)
    assert ends[0].reason in ("eos", "length") and ends[0].completion_tokens >= 1
    assert 1 in ends
    assert special_counts(replica, text, photo) == special_counts(replica, NEIGHBOUR, photo)
    keys: dict[int, RowResult] = {}
    batch = RunningBatch(replica, lambda k, t: None, keys.__setitem__, lambda k: False)
    with replica.lock, torch.inference_mode():
        batch.admit([0, 1], rows)
        while len(batch):
            batch.step()
    assert keys[0].reason in ("eos", "length") and 1 in keys

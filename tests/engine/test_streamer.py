"""Per-row incremental decoding: no split characters, text adds up, rows stop independently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from engine.streamer import BatchStreamer, RowDecoder


@pytest.fixture(scope="module")
def tokenizer(tiny_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_path)


def _decode(tok: Any) -> Any:
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize(
    "text", ["Bonjour, 你好, こんにちは, привет — unicode", "plain ascii text", "😀🚀 ok"]
)
def test_row_decoder_never_splits_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = RowDecoder(_decode(tokenizer))
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_row_decoder_flushes_incomplete_bytes_at_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("猫", add_special_tokens=False)  # not in the corpus: raw bytes
    assert len(ids) > 1  # a byte-level piece per UTF-8 byte in this tiny vocabulary
    decoder = RowDecoder(_decode(tokenizer))
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == tokenizer.decode(ids[:1])


def test_batch_streamer_stops_rows_independently(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("a", "b", "c")]
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    ended: dict[int, str] = {}
    cancelled = {2: False}

    streamer = BatchStreamer(
        max_tokens=[10, 2, 10],
        eos_ids={eos},
        decode=_decode(tokenizer),
        on_text=lambda i, t: texts.__setitem__(i, texts[i] + t),
        on_end=lambda i, r: ended.__setitem__(i, r),
        should_stop=lambda i: cancelled.get(i, False),
    )
    assert streamer.step([words[0], words[1], words[2]]) == [False, False, False]
    cancelled[2] = True
    assert streamer.step([eos, words[1], words[2]]) == [True, True, True]
    # After a row ends, whatever the model pads it with is ignored.
    assert streamer.step([words[2], words[2], words[2]]) == [True, True, True]
    assert ended == {0: "eos", 1: "length", 2: "stopped"}
    assert texts == {0: "a", 1: "bb", 2: "c"}
    assert [r.produced for r in streamer.rows] == [2, 2, 1]

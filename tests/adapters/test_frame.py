"""The hand-written pbbp2 codec against bytes built by hand from the protobuf wire format."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.feishu.longconn.frame import (
    METHOD_DATA,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
)

# SeqID=1, LogID=2, service=33, method=1, one header type=event, payload "{}".
HAND_BUILT = bytes(
    [
        *(0x08, 0x01),  # field 1 varint 1
        *(0x10, 0x02),  # field 2 varint 2
        *(0x18, 0x21),  # field 3 varint 33
        *(0x20, 0x01),  # field 4 varint 1
        *(0x2A, 0x0D, 0x0A, 0x04, *b"type", 0x12, 0x05, *b"event"),  # field 5: Header{1,2}
        *(0x42, 0x02, *b"{}"),  # field 8 bytes
    ]
)


def test_decodes_hand_built_bytes() -> None:
    frame = decode_frame(HAND_BUILT)
    assert frame == Frame(
        seq_id=1,
        log_id=2,
        service=33,
        method=METHOD_DATA,
        headers=(("type", "event"),),
        payload=b"{}",
    )
    assert frame.header("type") == "event"


def test_encodes_to_the_same_bytes() -> None:
    frame = Frame(
        seq_id=1, log_id=2, service=33, method=1, headers=(("type", "event"),), payload=b"{}"
    )
    assert encode_frame(frame) == HAND_BUILT


def test_multibyte_varint_and_large_uint64() -> None:
    # 300 = 0xAC 0x02; 2**64 - 1 = ten bytes ending in 0x01.
    data = bytes([0x08, 0xAC, 0x02, 0x10, *([0xFF] * 9), 0x01, 0x18, 0x00, 0x20, 0x00])
    frame = decode_frame(data)
    assert frame.seq_id == 300
    assert frame.log_id == 2**64 - 1
    assert encode_frame(frame) == data


def test_negative_int32_is_sign_extended() -> None:
    frame = Frame(service=-1, method=0)
    data = encode_frame(frame)
    assert bytes([0x18, *([0xFF] * 9), 0x01]) in data
    assert decode_frame(data).service == -1


def test_unknown_fields_are_skipped() -> None:
    extra = bytes([0x50, 0x05])  # field 10 varint
    extra += bytes([0x5A, 0x03, *b"abc"])  # field 11 bytes
    extra += bytes([0x65, 1, 2, 3, 4])  # field 12 fixed32
    extra += bytes([0x69, *range(8)])  # field 13 fixed64
    frame = decode_frame(HAND_BUILT + extra)
    assert frame.payload == b"{}"


def test_optional_strings_round_trip() -> None:
    frame = Frame(
        seq_id=9,
        method=1,
        headers=(("a", "1"), ("a", "2"), ("ключ", "值")),
        payload_encoding="gzip",
        payload_type="json",
        payload=b"\x00\xff",
        log_id_new="log-9",
    )
    assert decode_frame(encode_frame(frame)) == frame
    assert frame.with_header("a", "3").headers == (("ключ", "值"), ("a", "3"))


@pytest.mark.parametrize(
    "data",
    [
        HAND_BUILT[:-1],  # payload runs past the end
        bytes([0x08]),  # truncated varint
        bytes([0x08, *([0x80] * 11)]),  # varint too long
        bytes([0x08, 0x01, 0x10, 0x01, 0x18, 0x01]),  # method missing
        bytes([0x0A, 0x00, 0x10, 0x01, 0x18, 0x01, 0x20, 0x01]),  # SeqID with wire type 2
        bytes([0x0B]),  # group start: unsupported wire type
        bytes([0x00, 0x00]),  # field number 0
        HAND_BUILT[:8] + bytes([0x2A, 0x02, 0x0A, 0x00]),  # header without value
        HAND_BUILT[:8] + bytes([0x2A, 0x04, 0x0A, 0x02, 0xC3, 0x28, 0x12]),  # truncated header
        HAND_BUILT[:8] + bytes([0x32, 0x02, 0xC3, 0x28]),  # payload_encoding not UTF-8
    ],
)
def test_malformed_frames_raise(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


_text = st.text(max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    seq_id=st.integers(0, 2**64 - 1),
    log_id=st.integers(0, 2**64 - 1),
    service=st.integers(-(2**31), 2**31 - 1),
    method=st.integers(0, 1),
    headers=st.lists(st.tuples(_text, _text), max_size=5).map(tuple),
    payload=st.binary(max_size=200),
    enc=_text,
)
def test_round_trip(
    seq_id: int,
    log_id: int,
    service: int,
    method: int,
    headers: tuple[tuple[str, str], ...],
    payload: bytes,
    enc: str,
) -> None:
    frame = Frame(seq_id, log_id, service, method, headers, enc, "", payload, "")
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_never_crashes_otherwise(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_frame(data)

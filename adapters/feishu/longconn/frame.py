"""A hand-written protobuf (proto2) codec for Feishu's ``pbbp2.Frame`` and ``pbbp2.Header``.

::

    message Header { required string key = 1; required string value = 2; }
    message Frame {
      required uint64 SeqID = 1;  required uint64 LogID = 2;
      required int32 service = 3; required int32 method = 4;
      repeated Header headers = 5;
      optional string payload_encoding = 6; optional string payload_type = 7;
      optional bytes payload = 8; optional string LogIDNew = 9;
    }

Two messages do not justify generated code or a protobuf runtime; the decoder is strict about
lengths and skips unknown fields as protobuf requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

METHOD_CONTROL = 0
METHOD_DATA = 1

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5
_MASK64 = (1 << 64) - 1


class FrameError(ValueError):
    """The bytes are not a well-formed ``pbbp2.Frame``."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One ``pbbp2.Frame``; ``headers`` keep their order and may repeat a key."""

    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = METHOD_CONTROL
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    payload_encoding: str = ""
    payload_type: str = ""
    payload: bytes = b""
    log_id_new: str = ""

    def header(self, key: str) -> str | None:
        """The first value of header ``key``, or None."""
        for k, v in self.headers:
            if k == key:
                return v
        return None

    def header_int(self, key: str, default: int) -> int:
        """Header ``key`` as an integer, or ``default`` when absent or not a number."""
        value = self.header(key)
        try:
            return int(value) if value is not None else default
        except ValueError:
            return default

    def with_header(self, key: str, value: str) -> Frame:
        """A copy with ``key`` set to ``value`` (replacing earlier values)."""
        kept = tuple((k, v) for k, v in self.headers if k != key)
        return replace(self, headers=(*kept, (key, value)))


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` (required fields always, optional ones when non-empty)."""
    out = bytearray()
    _field_varint(out, 1, frame.seq_id & _MASK64)
    _field_varint(out, 2, frame.log_id & _MASK64)
    _field_varint(out, 3, frame.service & _MASK64)  # int32: negatives sign-extend to 64 bits
    _field_varint(out, 4, frame.method & _MASK64)
    for key, value in frame.headers:
        inner = bytearray()
        _field_bytes(inner, 1, key.encode())
        _field_bytes(inner, 2, value.encode())
        _field_bytes(out, 5, bytes(inner))
    if frame.payload_encoding:
        _field_bytes(out, 6, frame.payload_encoding.encode())
    if frame.payload_type:
        _field_bytes(out, 7, frame.payload_type.encode())
    if frame.payload:
        _field_bytes(out, 8, frame.payload)
    if frame.log_id_new:
        _field_bytes(out, 9, frame.log_id_new.encode())
    return bytes(out)


def decode_frame(data: bytes) -> Frame:
    """Parse a ``pbbp2.Frame``.

    Raises:
        FrameError: truncated data, bad wire types, bad UTF-8, or a missing required field.
    """
    values: dict[str, object] = {}
    headers: list[tuple[str, str]] = []
    seen: set[int] = set()
    for number, wire, value in _fields(data):
        expected = _LEN if number >= 5 else _VARINT
        if number <= 9 and wire != expected:
            raise FrameError(f"field {number} has wire type {wire}")
        if number in (1, 2):
            values["seq_id" if number == 1 else "log_id"] = value
        elif number in (3, 4):
            assert isinstance(value, int)
            values["service" if number == 3 else "method"] = _int32(value)
        elif number == 5:
            assert isinstance(value, bytes)
            headers.append(_decode_header(value))
        elif number == 8:
            values["payload"] = value
        elif number in (6, 7, 9):
            assert isinstance(value, bytes)
            name = {6: "payload_encoding", 7: "payload_type", 9: "log_id_new"}[number]
            values[name] = _utf8(value, name)
        seen.add(number)
    missing = {1, 2, 3, 4} - seen
    if missing:
        raise FrameError(f"required fields missing: {sorted(missing)}")
    return Frame(headers=tuple(headers), **values)  # type: ignore[arg-type]


def _decode_header(data: bytes) -> tuple[str, str]:
    key: str | None = None
    value: str | None = None
    for number, wire, raw in _fields(data):
        if number in (1, 2):
            if wire != _LEN:
                raise FrameError(f"header field {number} has wire type {wire}")
            assert isinstance(raw, bytes)
            if number == 1:
                key = _utf8(raw, "header key")
            else:
                value = _utf8(raw, "header value")
    if key is None or value is None:
        raise FrameError("header lacks key or value")
    return key, value


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise FrameError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
            out.append((number, wire, value))
        elif wire == _LEN:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise FrameError("length-delimited field runs past the end")
            out.append((number, wire, bytes(data[pos : pos + length])))
            pos += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if size > end - pos:
                raise FrameError("fixed-width field runs past the end")
            out.append((number, wire, int.from_bytes(data[pos : pos + size], "little")))
            pos += size
        else:
            raise FrameError(f"unsupported wire type {wire}")
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise FrameError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _MASK64:
                raise FrameError("varint exceeds 64 bits")
            return result, pos
    raise FrameError("varint longer than 10 bytes")


def _write_varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _field_varint(out: bytearray, number: int, value: int) -> None:
    _write_varint(out, (number << 3) | _VARINT)
    _write_varint(out, value)


def _field_bytes(out: bytearray, number: int, value: bytes) -> None:
    _write_varint(out, (number << 3) | _LEN)
    _write_varint(out, len(value))
    out += value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FrameError(f"{what} is not UTF-8") from None

"""Argument checks shared by every store backend, so bad input fails alike everywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bridge.store.base import InboxEntry, StoredEvent

#: Longest key, entry id or session id accepted (ids we generate are far shorter).
MAX_KEY_LEN = 512
#: Largest inbox payload accepted (a platform event body; images are fetched later, not stored).
MAX_PAYLOAD_BYTES = 1 << 20
#: Largest small value accepted by ``set_value``.
MAX_VALUE_LEN = 64 * 1024
#: Largest single event frame kept for replay.
MAX_FRAME_LEN = 1 << 20


def check_key(key: str, what: str = "key") -> str:
    """Return ``key`` if it is a non-empty str of sane length without NUL; raise otherwise."""
    if not isinstance(key, str):
        raise TypeError(f"{what} must be str, not {type(key).__name__}")
    if not key:
        raise ValueError(f"{what} must not be empty")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"{what} longer than {MAX_KEY_LEN} characters")
    if "\x00" in key:
        raise ValueError(f"{what} must not contain NUL")
    return key


def check_ttl(ttl_s: float) -> float:
    """Return ``ttl_s`` if it is a finite positive number of seconds; raise ValueError otherwise."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
        raise TypeError("ttl_s must be a number of seconds")
    if not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ValueError(f"ttl_s must be a finite positive number, not {ttl_s!r}")
    return float(ttl_s)


def check_value(value: str) -> str:
    """Return ``value`` if it is a str within :data:`MAX_VALUE_LEN`; raise otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"value must be str, not {type(value).__name__}")
    if len(value) > MAX_VALUE_LEN:
        raise ValueError(f"value longer than {MAX_VALUE_LEN} characters")
    return value


def check_limit(limit: int) -> int:
    """Return ``limit`` if it is a positive int; raise ValueError otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit must be a positive int, not {limit!r}")
    return limit


def check_entry(entry: InboxEntry) -> InboxEntry:
    """Return ``entry`` if its id, payload and times are well-formed; raise otherwise."""
    check_key(entry.entry_id, "entry_id")
    if not isinstance(entry.payload, bytes):
        raise TypeError("payload must be bytes")
    if len(entry.payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    if not math.isfinite(entry.accepted_at):
        raise ValueError("accepted_at must be finite")
    return entry


def check_seq(seq: int, what: str = "seq") -> int:
    """Return ``seq`` if it is a non-negative int; raise ValueError otherwise."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"{what} must be a non-negative int, not {seq!r}")
    return seq


def check_events(events: Sequence[StoredEvent]) -> Sequence[StoredEvent]:
    """Return ``events`` if their seqs are positive and strictly ascending; raise otherwise."""
    prev = 0
    for ev in events:
        if check_seq(ev.seq) <= prev:
            raise ValueError("events must have positive, strictly ascending seq")
        if not isinstance(ev.frame, str) or len(ev.frame) > MAX_FRAME_LEN:
            raise ValueError(f"frame must be a str of at most {MAX_FRAME_LEN} characters")
        if not math.isfinite(ev.ts):
            raise ValueError("event ts must be finite")
        prev = ev.seq
    return events

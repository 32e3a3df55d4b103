"""The /ws wire format of docs/protocol.md: parse and validate client frames, build server frames.

Pure functions over strings: no I/O, no clock. Everything a client can send is checked here, so a
hostile frame becomes a :class:`FrameError` (an ``error`` frame) and never an exception elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from bridge.jobs.events import event_fields
from engine.sanitize import is_valid_text
from engine.types import JobEvent

# Close codes (docs/protocol.md, with 4005, our documented extension for a session taken over).
CLOSE_OPERATOR: Final = 4000
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_HEARTBEAT: Final = 4002
CLOSE_SLOW_CONSUMER: Final = 4003
CLOSE_TOO_LARGE: Final = 4004
CLOSE_TAKEN_OVER: Final = 4005
CLOSE_POLICY: Final = 4008
CLOSE_GOING_AWAY: Final = 1001

MAX_ID_CHARS: Final = 128
MAX_TOPIC_CHARS: Final = 256
MAX_TOKEN_CHARS: Final = 512
MAX_SESSION_CHARS: Final = 128
MAX_SEQ: Final = 2**53  # what a JavaScript client can hold exactly

_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_TOPIC_RE: Final = re.compile(r"chat:[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9._:@/+=-]{1,200}")


class FrameError(Exception):
    """A client frame that cannot be honoured; becomes ``{"type":"error",...}``."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame: authenticate and optionally resume ``session`` after ``last_seq``."""

    token: str
    session: str | None
    last_seq: int | None


@dataclass(frozen=True, slots=True)
class Submit:
    """Run a job; ``image_b64`` is still encoded (decoded and size-checked by the hub)."""

    id: str
    prompt: str
    image_b64: str
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a job of this session."""

    id: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Stream events of a topic (``chat:<platform>:<chat id>`` or ``ops``)."""

    topic: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop streaming a topic."""

    topic: str


@dataclass(frozen=True, slots=True)
class Ack:
    """The client holds every event up to ``seq``; the server may drop them from replay."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Client-initiated liveness check, answered with ``pong``."""

    ts: float | None


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a server ping, echoing its ``ts``."""

    ts: float | None


ClientFrame = Hello | Submit | Cancel | Subscribe | Unsubscribe | Ack | Ping | Pong


def parse_frame(text: str, *, max_prompt_chars: int, max_image_bytes: int) -> ClientFrame:
    """Parse one text frame into a typed client frame.

    Args:
        text: the frame's text (already valid UTF-8; the transport checks that).
        max_prompt_chars: longest prompt accepted.
        max_image_bytes: largest decoded image accepted (checked on the base64 length here).

    Returns:
        The frame.

    Raises:
        FrameError: ``bad_frame``, ``unknown_type`` or ``too_large`` with a human message.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise FrameError("bad_frame", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("bad_frame", "frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise FrameError("bad_frame", "frame needs a string 'type'")
    if kind == "submit":
        return _parse_submit(obj, max_prompt_chars, max_image_bytes)
    if kind == "pong":
        return Pong(_opt_number(obj, "ts"))
    if kind == "ack":
        return Ack(_seq(obj, "seq", required=True) or 0)
    if kind == "ping":
        return Ping(_opt_number(obj, "ts"))
    if kind == "cancel":
        return Cancel(_job_id(obj))
    if kind == "subscribe":
        return Subscribe(_topic(obj))
    if kind == "unsubscribe":
        return Unsubscribe(_topic(obj))
    if kind == "hello":
        return _parse_hello(obj)
    raise FrameError("unknown_type", f"unknown frame type {kind[:40]!r}")


def _parse_hello(obj: dict[str, Any]) -> Hello:
    token = obj.get("token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        # No token or a bad one: the caller closes with 4001; the value is never echoed.
        token = ""
    session = obj.get("session")
    if session is not None and (
        not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_CHARS
    ):
        raise FrameError("bad_frame", "'session' must be null or a session id string")
    return Hello(token=token, session=session, last_seq=_seq(obj, "last_seq", required=False))


def _parse_submit(obj: dict[str, Any], max_prompt_chars: int, max_image_bytes: int) -> Submit:
    job_id = _job_id(obj)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise FrameError("bad_frame", "'prompt' must be a string", job_id)
    if not is_valid_text(prompt):
        # JSON can spell a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode one.
        raise FrameError("bad_frame", "'prompt' is not valid Unicode (lone surrogate)", job_id)
    if len(prompt) > max_prompt_chars:
        raise FrameError("too_large", f"prompt exceeds {max_prompt_chars} characters", job_id)
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise FrameError("bad_image", "'image' must be a non-empty base64 string", job_id)
    # Four base64 characters carry three bytes; refuse before decoding anything large.
    if (len(image) // 4) * 3 > max_image_bytes + 3:
        raise FrameError("too_large", f"image exceeds {max_image_bytes} bytes", job_id)
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 0 < max_tokens <= 65_536
    ):
        raise FrameError("bad_frame", "'max_tokens' must be an integer in 1..65536", job_id)
    return Submit(id=job_id, prompt=prompt, image_b64=image, max_tokens=max_tokens)


def _job_id(obj: dict[str, Any]) -> str:
    job_id = obj.get("id")
    if not isinstance(job_id, str) or not job_id:
        raise FrameError("bad_frame", "'id' must be a non-empty string")
    if len(job_id) > MAX_ID_CHARS:
        raise FrameError("too_large", f"'id' exceeds {MAX_ID_CHARS} characters")
    if not _ID_RE.fullmatch(job_id):
        raise FrameError("bad_frame", "'id' may hold only letters, digits and ._:@/+=-")
    return job_id


def _topic(obj: dict[str, Any]) -> str:
    topic = obj.get("topic")
    if not isinstance(topic, str):
        raise FrameError("bad_frame", "'topic' must be a string")
    if len(topic) > MAX_TOPIC_CHARS:
        raise FrameError("too_large", f"'topic' exceeds {MAX_TOPIC_CHARS} characters")
    if topic != "ops" and not _TOPIC_RE.fullmatch(topic):
        raise FrameError("bad_frame", "'topic' must be 'ops' or 'chat:<platform>:<chat id>'")
    return topic


def _seq(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise FrameError("bad_frame", f"'{name}' must be a non-negative integer")
    return value


def _opt_number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FrameError("bad_frame", f"'{name}' must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise FrameError("bad_frame", f"'{name}' must be a finite number")
    return number


# --- server frames -----------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON text of a server frame."""
    return _dumps(obj)


def welcome(session: str, resumed: bool, heartbeat_s: float, missed: int) -> str:
    """The answer to a good hello."""
    return dumps(
        {
            "type": "welcome",
            "session": session,
            "resumed": resumed,
            "heartbeat": heartbeat_s,
            "missed": missed,
        }
    )


def error(code: str, message: str, job_id: str | None = None) -> str:
    """An error frame; the connection stays open."""
    return dumps({"type": "error", "code": code, "message": message, "id": job_id})


def ping(ts: float) -> str:
    """A server heartbeat ping."""
    return dumps({"type": "ping", "ts": ts})


def pong(ts: float | None) -> str:
    """The answer to a client ping (echoing its ``ts`` when it sent one)."""
    return dumps({"type": "pong"} if ts is None else {"type": "pong", "ts": ts})


def bye(reason: str) -> str:
    """Sent before closing with 1001 at shutdown."""
    return dumps({"type": "bye", "reason": reason})


def subscribed(topic: str) -> str:
    """Confirms a subscription."""
    return dumps({"type": "subscribed", "topic": topic})


def unsubscribed(topic: str) -> str:
    """Confirms an unsubscription."""
    return dumps({"type": "unsubscribed", "topic": topic})


def ops(payload: dict[str, Any]) -> str:
    """A live ops notice (not sequenced, not replayed)."""
    return dumps({"type": "ops", "data": payload})


def event_tail(job_id: str, event: JobEvent, topic: str | None = None) -> str:
    """The part of an event frame after ``seq``, shared by every session the event goes to.

    Building the tail once and prefixing each session's seq keeps fan-out to one JSON encode;
    the event's fields come from the one job-event encoding (:mod:`bridge.jobs.events`).
    """
    body: dict[str, Any] = {"id": job_id}
    body.update(event_fields(event))
    if topic is not None:
        body["topic"] = topic
    return dumps(body)[1:]


def event_frame(seq: int, tail: str) -> str:
    """A full event frame from a session's seq and a shared tail."""
    return '{"type":"event","seq":' + str(seq) + "," + tail

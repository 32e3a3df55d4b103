"""The I/O-free core of Feishu's long connection: pings, pong deadline, fragments, acks.

Bytes go in with :meth:`LongConnProtocol.receive`, frames to send come out of
:meth:`~LongConnProtocol.data_to_send`, complete events out of
:meth:`~LongConnProtocol.events_received`; :meth:`~LongConnProtocol.tick` advances time. Every
method takes ``now`` (monotonic seconds), so tests drive it with a fake clock and no socket.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from adapters.feishu.longconn.frame import (
    METHOD_CONTROL,
    METHOD_DATA,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
)

MAX_FRAGMENTS = 256


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The reconnect and ping settings Feishu sends (``ClientConfig``), in seconds.

    Attributes:
        ping_interval_s: how often to ping (``PingInterval``).
        reconnect_count: failed retries in a row before giving up, -1 for unlimited.
        reconnect_interval_s: wait between two failed tries (our backoff's base).
        reconnect_nonce_s: the first retry waits a random part of this (spreads a stampede).
    """

    ping_interval_s: float = 120.0
    reconnect_count: int = -1
    reconnect_interval_s: float = 120.0
    reconnect_nonce_s: float = 30.0

    def merged(self, data: Mapping[str, Any]) -> ClientConfig:
        """A copy updated with the valid fields of Feishu's JSON (others are kept)."""
        count = data.get("ReconnectCount")
        return ClientConfig(
            ping_interval_s=_positive(data.get("PingInterval"), self.ping_interval_s),
            reconnect_count=(
                count
                if isinstance(count, int) and not isinstance(count, bool) and count >= -1
                else self.reconnect_count
            ),
            reconnect_interval_s=_positive(
                data.get("ReconnectInterval"), self.reconnect_interval_s
            ),
            reconnect_nonce_s=_positive(data.get("ReconnectNonce"), self.reconnect_nonce_s),
        )


def _positive(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


@dataclass(frozen=True, slots=True)
class EventDelivery:
    """One complete event (fragments joined) waiting for its ack.

    Attributes:
        message_id: the frame header ``message_id`` (one delivery; not the IM message id).
        kind: header ``type`` (``event`` or ``card``).
        trace_id: header ``trace_id``, for logs.
        payload: the event JSON bytes (empty when ``error`` is set).
        frame: the frame to answer (the last fragment received).
        error: why the event could not be assembled (``too_large``), else None.
    """

    message_id: str
    kind: str
    trace_id: str
    payload: bytes
    frame: Frame
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """The server sent a new ClientConfig (in a pong)."""

    config: ClientConfig


ProtocolEvent = EventDelivery | ConfigChanged


@dataclass(slots=True)
class _Partial:
    parts: list[bytes | None]
    first_at: float
    size: int = 0
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class LongConnProtocol:
    """State of one long connection, from the first frame to its failure."""

    def __init__(
        self,
        *,
        service_id: int,
        config: ClientConfig,
        now: float,
        pong_timeout_s: float,
        fragment_ttl_s: float = 10.0,
        max_event_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.service_id = service_id
        self.config = config
        self._pong_timeout = pong_timeout_s
        self._fragment_ttl = fragment_ttl_s
        self._max_event_bytes = max_event_bytes
        self._next_ping_at = now  # ping at once: it proves the link and fetches a fresh config
        self._awaiting_since: float | None = None
        self._last_ping_at: float | None = None
        self._partials: dict[str, _Partial] = {}
        self._out: list[bytes] = []
        self._events: list[ProtocolEvent] = []
        self.failure: str | None = None
        self.last_received_at = now
        self.bad_frames = 0
        self.dropped_fragments = 0

    # --- inputs ------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> None:
        """Take one WebSocket binary message; undecodable frames are counted and dropped."""
        if self.failure is not None:
            return
        self.last_received_at = now
        self._awaiting_since = None  # any frame proves the link is alive
        try:
            frame = decode_frame(data)
        except FrameError:
            self.bad_frames += 1
            return
        if frame.method == METHOD_CONTROL:
            self._control(frame)
        elif frame.method == METHOD_DATA:
            self._data(frame, now)
        else:
            self.bad_frames += 1

    def tick(self, now: float) -> None:
        """Advance time: fail on a missed pong deadline, send a due ping, expire fragments."""
        if self.failure is not None:
            return
        if self._awaiting_since is not None and now >= self._awaiting_since + self._pong_timeout:
            self.failure = "pong_timeout"
            return
        if now >= self._next_ping_at:
            self._out.append(encode_frame(self.ping_frame()))
            self._last_ping_at = now
            self._next_ping_at = now + self.config.ping_interval_s
            if self._awaiting_since is None:
                self._awaiting_since = now
        for key, partial in list(self._partials.items()):
            if now - partial.first_at >= self._fragment_ttl:
                del self._partials[key]
                self.dropped_fragments += 1

    def ack(self, delivery: EventDelivery, code: int, *, biz_rt_ms: int = 0) -> None:
        """Queue the answer to ``delivery``: its frame with ``{"code":code}`` as payload.

        That is the payload Feishu's SDKs send for an event (no ``headers``, no ``data``), with
        the handling time in a ``biz_rt`` header. Card frames are never answered (the SDKs
        ignore them too), so callers ack only ``kind == "event"`` deliveries.
        """
        if self.failure is not None:
            return
        body = json.dumps({"code": code}, separators=(",", ":")).encode()
        frame = replace(delivery.frame, payload=body).with_header("biz_rt", str(biz_rt_ms))
        self._out.append(encode_frame(frame))

    def fail(self, reason: str) -> None:
        """Mark the connection failed (the socket closed or errored)."""
        if self.failure is None:
            self.failure = reason

    # --- outputs -----------------------------------------------------------------------------
    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order (drains the queue)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[ProtocolEvent]:
        """Complete events and config changes since the last call (drains the queue)."""
        out, self._events = self._events, []
        return out

    def next_wakeup(self) -> float:
        """When :meth:`tick` must run next (monotonic seconds)."""
        times = [self._next_ping_at]
        if self._awaiting_since is not None:
            times.append(self._awaiting_since + self._pong_timeout)
        times.extend(p.first_at + self._fragment_ttl for p in self._partials.values())
        return min(times)

    def ping_frame(self) -> Frame:
        """The CONTROL ping Feishu expects (``service`` = the URL's service_id)."""
        return Frame(service=self.service_id, method=METHOD_CONTROL, headers=(("type", "ping"),))

    # --- internals ---------------------------------------------------------------------------
    def _control(self, frame: Frame) -> None:
        if frame.header("type") != "pong" or not frame.payload:
            return
        try:
            data = json.loads(frame.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        config = self.config.merged(data)
        if config != self.config:
            if config.ping_interval_s != self.config.ping_interval_s and (
                self._last_ping_at is not None
            ):
                self._next_ping_at = self._last_ping_at + config.ping_interval_s
            self.config = config
            self._events.append(ConfigChanged(config))

    def _data(self, frame: Frame, now: float) -> None:
        message_id = frame.header("message_id") or ""
        kind = frame.header("type") or ""
        trace_id = frame.header("trace_id") or ""
        total = frame.header_int("sum", 1)
        seq = frame.header_int("seq", 0)
        if total <= 1:
            self._deliver(message_id, kind, trace_id, frame.payload, frame)
            return
        if total > MAX_FRAGMENTS or not 0 <= seq < total:
            self.bad_frames += 1
            self._events.append(
                EventDelivery(message_id, kind, trace_id, b"", frame, error="bad_fragment")
            )
            return
        partial = self._partials.get(message_id)
        if partial is None or len(partial.parts) != total:
            partial = _Partial(parts=[None] * total, first_at=now)
            self._partials[message_id] = partial
        if partial.parts[seq] is None:
            partial.parts[seq] = frame.payload
            partial.size += len(frame.payload)
        if partial.size > self._max_event_bytes:
            del self._partials[message_id]
            self._events.append(
                EventDelivery(message_id, kind, trace_id, b"", frame, error="too_large")
            )
            return
        if all(p is not None for p in partial.parts):
            del self._partials[message_id]
            payload = b"".join(p for p in partial.parts if p is not None)
            self._deliver(message_id, kind, trace_id, payload, frame)

    def _deliver(
        self, message_id: str, kind: str, trace_id: str, payload: bytes, frame: Frame
    ) -> None:
        if len(payload) > self._max_event_bytes:
            self._events.append(
                EventDelivery(message_id, kind, trace_id, b"", frame, error="too_large")
            )
            return
        self._events.append(EventDelivery(message_id, kind, trace_id, payload, frame))

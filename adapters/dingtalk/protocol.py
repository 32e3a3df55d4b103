"""The I/O-free core of one DingTalk stream connection: pings, disconnects, acks, our deadline.

Text goes in with :meth:`StreamProtocol.receive`, frames to send come out of
:meth:`~StreamProtocol.data_to_send`, callbacks to handle out of
:meth:`~StreamProtocol.events_received`; :meth:`~StreamProtocol.tick` advances time. Every method
takes ``now`` (monotonic seconds), so tests drive it with a fake clock and no socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.dingtalk.frames import (
    TOPIC_DISCONNECT,
    TOPIC_PING,
    TYPE_CALLBACK,
    TYPE_EVENT,
    TYPE_SYSTEM,
    Frame,
    FrameError,
    ack_text,
    callback_ack,
    parse_frame,
    system_ack,
)


@dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """A CALLBACK frame waiting for the sink; it is acked only after the sink recorded it."""

    frame: Frame

    @property
    def message_id(self) -> str:
        """The delivery id the ack must carry."""
        return self.frame.message_id


@dataclass(frozen=True, slots=True)
class DisconnectRequested:
    """The server asked us to move to a new connection (SYSTEM ``disconnect``)."""


StreamEvent = CallbackDelivery | DisconnectRequested


class StreamProtocol:
    """State of one stream connection, from its first frame to its failure."""

    def __init__(self, *, now: float, silent_timeout_s: float) -> None:
        self._silent = silent_timeout_s
        self.last_received_at = now
        self._out: list[str] = []
        self._events: list[StreamEvent] = []
        self.failure: str | None = None
        self.draining = False  # a disconnect came: take no new callbacks, finish the acks
        self.bad_frames = 0
        self.pings = 0

    # --- inputs ------------------------------------------------------------------------------
    def receive(self, raw: str | bytes, now: float) -> None:
        """Take one WebSocket message; undecodable frames are counted and dropped."""
        if self.failure is not None:
            return
        self.last_received_at = now
        try:
            frame = parse_frame(raw)
        except FrameError:
            self.bad_frames += 1
            return
        if frame.type == TYPE_SYSTEM:
            self._system(frame)
        elif frame.type == TYPE_CALLBACK:
            if not frame.message_id:
                self.bad_frames += 1
            elif not self.draining:
                self._events.append(CallbackDelivery(frame))
        elif frame.type == TYPE_EVENT:
            # Not subscribed to; acked so the server does not hold it for us.
            if frame.message_id:
                self._out.append(ack_text(frame.message_id, frame.data or "{}"))
        else:
            self.bad_frames += 1

    def tick(self, now: float) -> None:
        """Advance time: a socket silent past our deadline has failed."""
        if self.failure is None and now >= self.last_received_at + self._silent:
            self.failure = "silent"

    def ack(self, delivery: CallbackDelivery) -> None:
        """Queue the ack of ``delivery`` (call only after the sink recorded it)."""
        if self.failure is None:
            self._out.append(callback_ack(delivery.message_id))

    def fail(self, reason: str) -> None:
        """Mark the connection failed (the socket closed or errored)."""
        if self.failure is None:
            self.failure = reason

    # --- outputs -----------------------------------------------------------------------------
    def data_to_send(self) -> list[str]:
        """Frames to write, in order (drains the queue)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[StreamEvent]:
        """Callbacks and disconnect requests since the last call (drains the queue)."""
        out, self._events = self._events, []
        return out

    def next_wakeup(self) -> float:
        """When :meth:`tick` must run next (monotonic seconds)."""
        return self.last_received_at + self._silent

    # --- internals ---------------------------------------------------------------------------
    def _system(self, frame: Frame) -> None:
        if frame.topic == TOPIC_PING:
            self.pings += 1
            self._out.append(system_ack(frame))
        elif frame.topic == TOPIC_DISCONNECT:
            self._out.append(system_ack(frame))
            if not self.draining:
                self.draining = True
                self._events.append(DisconnectRequested())
        elif frame.message_id:
            self._out.append(system_ack(frame))

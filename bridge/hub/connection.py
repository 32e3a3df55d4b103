"""The I/O-free protocol core of one /ws connection: hello gate, heartbeats, inbound limits.

Frames and clock readings go in; actions (frames to send, a close) and validated client frames come
out. The aiohttp handler only moves bytes, so every rule here is tested with a fake clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridge.hub import protocol as p
from bridge.hub.config import HubConfig
from bridge.hub.ratelimit import TokenBucket


class Phase(enum.Enum):
    """Where a connection stands."""

    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Send:
    """Send this text frame."""

    frame: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``; nothing more is read or sent."""

    code: int
    reason: str


Action = Send | Close


class ConnectionCore:
    """Protocol state of one connection, driven by :meth:`receive` and :meth:`on_timer`."""

    __slots__ = (
        "_frames",
        "_submits",
        "cfg",
        "close_code",
        "conn_id",
        "connected_at",
        "hello_deadline",
        "last_pong_at",
        "next_ping_at",
        "phase",
        "ping_deadline",
        "ping_sent_at",
        "ping_ts",
        "received",
        "rtt_s",
    )

    def __init__(self, conn_id: str, cfg: HubConfig, now: float) -> None:
        self.conn_id = conn_id
        self.cfg = cfg
        self.phase = Phase.AWAIT_HELLO
        self.connected_at = now
        self.hello_deadline = now + cfg.hello_timeout_s
        self.next_ping_at = 0.0
        self.ping_ts: float | None = None
        self.ping_sent_at = 0.0
        self.ping_deadline = 0.0
        self.last_pong_at: float | None = None
        self.rtt_s: float | None = None
        self.received = 0
        self.close_code: int | None = None
        self._frames = TokenBucket(cfg.frame_rate, cfg.frame_burst, now)
        # Made at the first submit, full (as one made now would have refilled to by then): most
        # connections (topic followers, idle clients) never submit.
        self._submits: TokenBucket | None = None

    # --- inbound ---------------------------------------------------------------------------
    def receive(self, text: str, now: float) -> tuple[list[Action], p.ClientFrame | None]:
        """Take one inbound text frame.

        Returns:
            Actions to perform now, and the validated frame the hub must act on (or None when the
            core answered it itself: pings, pongs, errors, rate limits).
        """
        if self.phase is Phase.CLOSED:
            return [], None
        self.received += 1
        if not self._frames.take(now):
            return [self._close(p.CLOSE_POLICY, "too many frames")], None
        try:
            frame = p.parse_frame(
                text,
                max_prompt_chars=self.cfg.max_prompt_chars,
                max_image_bytes=self.cfg.max_image_bytes,
            )
        except p.FrameError as exc:
            if self.phase is Phase.AWAIT_HELLO:
                return [self._close(p.CLOSE_UNAUTHORIZED, "hello expected")], None
            return [Send(p.error(exc.code, exc.message, exc.job_id))], None
        if self.phase is Phase.AWAIT_HELLO:
            if not isinstance(frame, p.Hello):
                return [self._close(p.CLOSE_UNAUTHORIZED, "hello expected")], None
            return [], frame
        if isinstance(frame, p.Pong):
            self._on_pong(frame.ts, now)
            return [], None
        if isinstance(frame, p.Ping):
            return [Send(p.pong(frame.ts))], None
        if isinstance(frame, p.Hello):
            return [Send(p.error("bad_frame", "hello was already accepted"))], None
        if isinstance(frame, p.Submit) and not self._submit_bucket(now).take(now):
            wait = self._submit_bucket(now).retry_after()
            msg = f"too many submits; retry in {wait:.2f}s"
            return [Send(p.error("rate_limited", msg, frame.id))], None
        return [], frame

    def _submit_bucket(self, now: float) -> TokenBucket:
        bucket = self._submits
        if bucket is None:
            cfg = self.cfg
            self._submits = bucket = TokenBucket(cfg.submit_rate, cfg.submit_burst, now)
        return bucket

    def _on_pong(self, ts: float | None, now: float) -> None:
        if self.ping_ts is None:
            return
        if ts is not None and ts != self.ping_ts:
            return  # an answer to an older ping: the current one is still owed
        self.rtt_s = now - self.ping_sent_at
        self.last_pong_at = now
        self.ping_ts = None

    # --- lifecycle -------------------------------------------------------------------------
    def welcomed(self, now: float) -> None:
        """The hub accepted the hello: start the heartbeat with a ping due at once.

        That first ping goes out right after ``welcome`` (on the next timer slot, once the welcome
        and any replay are queued), so the RTT and last pong are known within one round trip
        instead of after a whole interval; the cadence then continues ``heartbeat_s`` apart.
        """
        self.phase = Phase.OPEN
        self.next_ping_at = now

    def closed(self, code: int) -> None:
        """The connection was closed (by us or the peer)."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self.close_code = code

    def _close(self, code: int, reason: str) -> Close:
        self.closed(code)
        return Close(code, reason)

    # --- timers ----------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run next (None once closed)."""
        if self.phase is Phase.AWAIT_HELLO:
            return self.hello_deadline
        if self.phase is Phase.CLOSED:
            return None
        if self.ping_ts is not None:
            return self.ping_deadline
        return self.next_ping_at

    def on_timer(self, now: float) -> list[Action]:
        """Fire what is due at ``now``: the hello deadline, the pong deadline or the next ping."""
        if self.phase is Phase.AWAIT_HELLO:
            if now >= self.hello_deadline:
                return [self._close(p.CLOSE_UNAUTHORIZED, "no hello in time")]
            return []
        if self.phase is Phase.CLOSED:
            return []
        if self.ping_ts is not None:
            if now >= self.ping_deadline:
                return [self._close(p.CLOSE_HEARTBEAT, "heartbeat timeout")]
            return []
        if now >= self.next_ping_at:
            # Round so the echoed number survives any client's float formatting unchanged.
            ts = round(now, 6)
            self.ping_ts = ts
            self.ping_sent_at = now
            self.ping_deadline = now + self.cfg.heartbeat_timeout_s
            # A fixed cadence from the due time, so timer lateness never stretches the interval;
            # after a long stall (a blocked loop) start afresh instead of sending a burst.
            interval = self.cfg.heartbeat_s
            due = self.next_ping_at
            self.next_ping_at = due + interval if now - due < interval else now + interval
            return [Send(p.ping(ts))]
        return []

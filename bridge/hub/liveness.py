"""Connection liveness on one wheel timer: hello and pong deadlines, pings, slow consumers.

The rules are :class:`~bridge.hub.connection.ConnectionCore`'s; this module keeps every
connection's next deadline on a single :class:`~bridge.hub.heartbeat.WheelTimer` and carries out
the actions a core decides (a send, or a close with its metrics), for the hub and its helpers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import structlog

from bridge.hub import protocol as p
from bridge.hub.config import HubConfig
from bridge.hub.connection import Action, Phase, Send
from bridge.hub.heartbeat import WheelTimer
from bridge.hub.ws import Connection
from bridge.metrics import Metrics

log = structlog.get_logger(__name__)

PING_LATENESS_SAMPLES = 200_000
MAX_RESOLUTION_S = 0.02


class Liveness:
    """Schedules each connection's next deadline and applies what its core decides when it fires.

    Args:
        cfg: the hub's settings (heartbeat interval and deadlines, send timeout).
        metrics: Prometheus metrics to update (heartbeat timeouts).
        clock: monotonic seconds, the timer's base.

    Attributes:
        timer: the wheel timer, None until :meth:`start` (the hub refuses connections until then).
        ping_lateness: recent heartbeat lateness (ping sent minus ping due, seconds; bounded), for
            benchmarks.
    """

    def __init__(self, cfg: HubConfig, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._clock = clock
        # Fine slots keep pings punctual (a key fires up to one slot late); the wheel's heap
        # makes each firing cost the same whatever the slot count.
        self.resolution = max(
            0.005, min(MAX_RESOLUTION_S, cfg.heartbeat_timeout_s / 20, cfg.heartbeat_s / 20)
        )
        self.timer: WheelTimer[Connection] | None = None
        self.ping_lateness: deque[float] = deque(maxlen=PING_LATENESS_SAMPLES)

    def start(self) -> None:
        """Create the timer; until then :meth:`schedule` does nothing."""
        self.timer = WheelTimer(self.resolution, self._on_due, self._clock)

    def close(self) -> None:
        """Stop firing (shutdown)."""
        if self.timer is not None:
            self.timer.close()

    def schedule(self, conn: Connection) -> None:
        """Put ``conn`` on the wheel at its core's next deadline (none once it is closed)."""
        when = conn.core.next_deadline()
        if when is not None and self.timer is not None:
            self.timer.schedule(conn, when)

    def cancel(self, conn: Connection) -> None:
        """Take ``conn`` off the wheel (it closed)."""
        if self.timer is not None:
            self.timer.cancel(conn)

    def _on_due(self, conns: list[Connection], now: float) -> None:
        for conn in conns:
            if conn.closing:
                continue
            if conn.stalled_for(now) > self.cfg.send_timeout_s:
                conn.close(p.CLOSE_SLOW_CONSUMER, "slow consumer")
                continue
            core = conn.core
            ping_due = core.phase is Phase.OPEN and core.ping_ts is None
            due_at = core.next_ping_at
            for action in core.on_timer(now):
                if ping_due and isinstance(action, Send):
                    self.ping_lateness.append(self._clock() - due_at)
                self.apply(conn, action)
            self.schedule(conn)

    def apply(self, conn: Connection, action: Action) -> None:
        """Carry out a core's decision on ``conn``: send its frame, or close with its code."""
        if isinstance(action, Send):
            conn.send(action.frame)
            return
        if action.code == p.CLOSE_HEARTBEAT:
            self.metrics.ws_heartbeat_timeouts.inc()
            session = conn.session.id if conn.session is not None else None
            log.info("ws_heartbeat_timeout", conn_id=conn.id, session=session)
        elif action.code != p.CLOSE_GOING_AWAY:
            log.info("ws_closing", conn_id=conn.id, code=action.code, reason=action.reason)
        conn.close(action.code, action.reason)

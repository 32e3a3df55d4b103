"""The frames a /ws client sends: read, counted, checked by the core, dispatched to the hub's parts.

The rules of one frame (parse, phase, rate) are the
:class:`~bridge.hub.connection.ConnectionCore`'s; this module reads the socket, counts frames for
``ws_frames`` and routes each accepted frame to what handles it: ``hello`` to
:mod:`bridge.hub.resume`, jobs to :mod:`bridge.hub.jobs`, topics and acks to the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog
from aiohttp import WSMsgType

from bridge.hub import protocol as p
from bridge.hub.config import HubConfig
from bridge.hub.connection import Phase
from bridge.hub.frame_gate import RETRY_AFTER_S, Refused
from bridge.hub.jobs import SessionJobs
from bridge.hub.liveness import Liveness
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.resume import Resumer
from bridge.hub.session import Session
from bridge.hub.submitlimit import SharedSubmitLimit
from bridge.hub.ws import Connection
from bridge.metrics import Metrics

log = structlog.get_logger(__name__)


class FrameMeter:
    """Counts frames for the ``ws_frames`` metric, which gets them in deltas (see :meth:`report`).

    Received frames are counted as they come; sent ones are each connection's own count, plus
    those of connections gone since (:attr:`sent_closed`).

    Args:
        metrics: Prometheus metrics to update.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.received = 0
        self.sent_closed = 0
        self._sent_reported = 0

    def report(self, conns: Iterable[Connection]) -> None:
        """Add the frames sent and received since the last report (``conns``: the live ones)."""
        sent = self.sent_closed + sum(c.sent for c in conns)
        delta = sent - self._sent_reported
        if delta > 0:
            self.metrics.ws_frames.labels(direction="out").inc(delta)
            self._sent_reported = sent
        if self.received:
            self.metrics.ws_frames.labels(direction="in").inc(self.received)
            self.received = 0


class FrameHandler:
    """Handles every frame a client sends, from its ``hello`` to its last ``ack``.

    Args:
        cfg: the hub's settings (topic cap).
        liveness: applies the core's actions and reschedules the heartbeat after a pong.
        resumer: answers ``hello``.
        jobs: submits and cancels jobs.
        registry: the sessions and their topics.
        writes: the write-behind queue (acks and opened jobs change the stored session).
        shared_limit: the cluster-wide submit limit of each token.
        meter: counts received frames.
        metrics: Prometheus metrics to update (heartbeat round trips).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        cfg: HubConfig,
        *,
        liveness: Liveness,
        resumer: Resumer,
        jobs: SessionJobs,
        registry: SessionRegistry,
        writes: WriteBehind,
        shared_limit: SharedSubmitLimit,
        meter: FrameMeter,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self._liveness = liveness
        self._resumer = resumer
        self._jobs = jobs
        self._registry = registry
        self._writes = writes
        self._shared_limit = shared_limit
        self._meter = meter
        self.metrics = metrics
        self._clock = clock

    async def read(self, conn: Connection) -> None:
        """Handle the client's frames until its socket closes or fails (frames after a decided
        close are ignored).

        Each data message's bytes are released from the inflight budget once it is handled, and
        no reference to it outlives that: ``async for`` would keep the last message alive while
        waiting for the next, pinning a 15 MiB submit of an idle client.
        """
        ws = conn.ws
        gate = ws.gate
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            if kind is WSMsgType.ERROR:
                log.info("ws_error", conn_id=conn.id, error=repr(ws.exception()))
                break
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                data = msg.data
                del msg
                try:
                    if conn.closing:
                        continue
                    if kind is WSMsgType.TEXT:
                        await self.on_text(conn, data)
                    else:
                        self._meter.received += 1
                        if conn.core.phase is Phase.AWAIT_HELLO:
                            conn.close(p.CLOSE_UNAUTHORIZED, "hello expected")
                        else:
                            conn.send(p.error("bad_frame", "binary frames are not accepted"))
                finally:
                    del data
                    if gate is not None:
                        gate.done()
            else:
                del msg

    def on_refused(self, conn: Connection, refused: Refused) -> None:
        """A frame did not fit the inflight budget and was dropped unread: answer ``busy``."""
        self._meter.received += 1
        self.metrics.ws_inflight_refused.inc()
        log.info(
            "ws_frame_over_budget",
            conn_id=conn.id,
            job_id=refused.job_id,
            frame_type=refused.kind,
            declared_bytes=refused.declared,
        )
        if conn.closing:
            return
        wait = RETRY_AFTER_S
        message = f"the server is receiving too much at once; retry in {wait:g}s"
        conn.send(
            p.dumps(
                {
                    "type": "error",
                    "code": "busy",
                    "message": message,
                    "id": refused.job_id,
                    "retry_after": wait,
                }
            )
        )

    async def on_text(self, conn: Connection, text: str) -> None:
        """Handle one text frame: the core's checks and actions first, then its handler.

        A handler that fails answers an ``internal`` error frame; the connection stays open.
        """
        self._meter.received += 1
        core = conn.core
        had_pong = core.last_pong_at
        actions, frame = core.receive(text, self._clock())
        for action in actions:
            self._liveness.apply(conn, action)
        if core.last_pong_at is not had_pong:
            # The pong deadline is gone: the next ping is due earlier than the wheel has it.
            self._liveness.schedule(conn)
            if core.rtt_s is not None:
                self.metrics.ws_heartbeat_rtt.observe(core.rtt_s)
        if frame is None or conn.closing:
            return
        try:
            if isinstance(frame, p.Hello):
                await self._resumer.hello(conn, frame)
            elif isinstance(frame, p.Submit) and conn.session is not None:
                await self._submit(conn, conn.session, frame)
            elif isinstance(frame, p.Cancel) and conn.session is not None:
                self._jobs.cancel(conn, conn.session, frame)
            elif isinstance(frame, p.Subscribe):
                self._subscribe(conn, frame.topic)
            elif isinstance(frame, p.Unsubscribe):
                self._unsubscribe(conn, frame.topic)
            elif isinstance(frame, p.Ack):
                self._ack(conn, frame.seq)
        except Exception:
            log.exception("ws_frame_failed", conn_id=conn.id)
            conn.send(p.error("internal", "the server failed to handle this frame"))

    async def _submit(self, conn: Connection, session: Session, frame: p.Submit) -> None:
        """Apply the token's cluster-wide submit limit, then hand the job to the runner."""
        label = conn.token_label
        if label is not None and not session.knows_job(frame.id):
            allowed = await self._shared_limit.allow(label)
            if conn.closing:
                return
            if not allowed:
                log.info("ws_token_rate_limited", conn_id=conn.id, job_id=frame.id, token=label)
                msg = "too many submits for this token; retry in 1s"
                conn.send(p.error("rate_limited", msg, frame.id))
                return
        self._jobs.submit(conn, session, frame)
        if session.header_dirty:
            # An accepted job is open: written at once (not at the next interval), so a crash
            # right after it can still end it on resume (see bridge.hub.orphans).
            self._writes.mark_soon(session)

    def _subscribe(self, conn: Connection, topic: str) -> None:
        session = conn.session
        assert session is not None
        if not self.cfg.may_follow(session.owner, session.admin, topic):
            log.info("ws_subscribe_forbidden", conn_id=conn.id, session=session.id, topic=topic)
            if topic == "ops":
                conn.send(p.error("forbidden", "only admin tokens may subscribe to 'ops'"))
            else:
                msg = "this token holds no grant for that topic (see --topic-grant)"
                conn.send(p.error("forbidden", msg))
            return
        if topic not in session.topics and len(session.topics) >= self.cfg.max_topics:
            conn.send(p.error("too_large", f"at most {self.cfg.max_topics} topics"))
            return
        self._registry.add_topic(session, topic)
        conn.send(p.subscribed(topic))

    def _unsubscribe(self, conn: Connection, topic: str) -> None:
        session = conn.session
        assert session is not None
        self._registry.remove_topic(session, topic)
        conn.send(p.unsubscribed(topic))

    def _ack(self, conn: Connection, seq: int) -> None:
        session = conn.session
        assert session is not None
        if seq > session.last_seq:
            conn.send(p.error("bad_frame", "ack beyond the last seq sent"))
            return
        session.ack(seq)
        self._writes.mark(session)

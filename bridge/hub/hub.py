"""The WebSocket hub of SPEC §3: sessions, jobs, topics, heartbeats and shutdown for /ws.

The per-connection rules live in :class:`~bridge.hub.connection.ConnectionCore`, the per-session
state in :class:`~bridge.hub.session.Session`; this class wires them to aiohttp, the engine, the
store and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from bridge.cluster.bus import Bus
from bridge.hub import protocol as p
from bridge.hub.auth import TokenGate
from bridge.hub.config import HubConfig
from bridge.hub.connection import Action, Close, ConnectionCore, Phase, Send
from bridge.hub.heartbeat import WheelTimer
from bridge.hub.info import ConnectionInfo, connection_info
from bridge.hub.jobs import JobRunner
from bridge.hub.moves import SessionMoves
from bridge.hub.orphans import closed_job, settle
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.session import Session
from bridge.hub.submitlimit import SharedSubmitLimit
from bridge.hub.ws import Connection, HubWebSocket
from bridge.metrics import Metrics
from bridge.store.base import Store
from engine.types import (
    EngineLike,
    JobEvent,
)

log = structlog.get_logger(__name__)

__all__ = ["ConnectionInfo", "Hub"]

SWEEP_INTERVAL_S = 1.0
PING_LATENESS_SAMPLES = 200_000
MAX_RESOLUTION_S = 0.02
#: A resume whose ``last_seq`` is more than this (plus the replay bound) past the session's own
#: last seq cannot come from seqs lost in a crash (one flush interval holds far fewer): the resume
#: is refused and the client gets a new session (``resumed: false``).
MAX_SEQ_AHEAD = 1_000_000


class Hub:
    """Serves /ws: authenticates clients, runs their jobs, streams topics, keeps sessions resumable.

    Args:
        cfg: the hub's settings.
        engine: runs jobs (:class:`engine.types.EngineLike`).
        store: keeps sessions and replay buffers (write-behind).
        metrics: Prometheus metrics to update.
        clock: monotonic seconds (injectable for tests).
        wall: wall-clock seconds since the epoch (replay ages, dashboard times).
        bus: the cluster bus; with one, sessions move between nodes (claim, release, forwarded
            job events, see :mod:`bridge.hub.moves`). None keeps the single-node behaviour.
        node_id: this node's id in the cluster, unique and stable across restarts where possible
            (a random one when not given).
    """

    def __init__(
        self,
        cfg: HubConfig,
        *,
        engine: EngineLike,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        bus: Bus | None = None,
        node_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._gate = TokenGate(cfg)
        self._conns: dict[str, Connection] = {}
        self._jobs = JobRunner(engine, cfg.max_image_bytes, self._emit)
        self.node_id = node_id or "n-" + secrets.token_hex(6)
        cluster_id = self.node_id if bus is not None else None
        self._writes = WriteBehind(store, cfg.session_ttl_s, wall, cluster_id)
        self._registry = SessionRegistry(cfg, store, self._writes, clock, wall)
        self._moves: SessionMoves | None = None
        if bus is not None:
            self._moves = SessionMoves(
                bus,
                self.node_id,
                cfg,
                self._registry,
                self._writes,
                clock,
                self._emit_forwarded,
                self._taken_elsewhere,
                self._jobs.is_live,
                self._jobs.live,
            )
            self._jobs.forward_cancel = self._moves.cancel_elsewhere
        self._shared_limit = SharedSubmitLimit(store, cfg.token_submit_rate, clock)
        # Fine slots keep pings punctual (a key fires up to one slot late); the wheel's heap
        # makes each firing cost the same whatever the slot count.
        resolution = max(
            0.005, min(MAX_RESOLUTION_S, cfg.heartbeat_timeout_s / 20, cfg.heartbeat_s / 20)
        )
        self._timer: WheelTimer[Connection] | None = None
        self._resolution = resolution
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._idle = asyncio.Event()
        self._frames_in = 0
        self._frames_out_reported = 0
        self._sent_closed = 0
        #: Recent heartbeat lateness (ping sent minus ping due, seconds; bounded) for benchmarks.
        self.ping_lateness: deque[float] = deque(maxlen=PING_LATENESS_SAMPLES)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the heartbeat timer and the write-behind/sweep task."""
        self._timer = WheelTimer(self._resolution, self._on_due, self._clock)
        task = asyncio.get_running_loop().create_task(self._background(), name="hub-background")
        self._tasks.add(task)
        self._idle.set()
        if self._moves is not None:
            await self._moves.start()
        await self._registry.preload()
        if not self._gate.configured:
            log.warning("hub_no_tokens", detail="no client tokens: every hello gets 4001")

    async def shutdown(
        self,
        reason: str = "shutdown",
        grace_s: float = 5.0,
        drain: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """Stop accepting, send ``bye`` and close 1001 to all, persist sessions, cancel tasks.

        Args:
            reason: the text of the ``bye`` frame.
            grace_s: how long clients get to receive ``bye`` and jobs get to finish.
            drain: other work that publishes into the hub (the relay's IM jobs), given the time
                left and awaited beside this hub's jobs, so what it publishes is in the last
                store write too.
        """
        if self._stopping:
            return
        self._stopping = True
        deadline = self._clock() + grace_s
        log.info("hub_shutdown", reason=reason, connections=len(self._conns))
        for conn in list(self._conns.values()):
            conn.send(p.bye(reason), force=True)
            conn.close(p.CLOSE_GOING_AWAY, reason, flush_s=min(1.0, grace_s))
        # Write what the store lacks while the clients go: the closes wait on the network.
        self._registry.mark_unsaved()
        early = asyncio.get_running_loop().create_task(self._writes.flush_all())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - self._clock()))
        left = deadline - self._clock()
        if drain is None:
            await self._jobs.stop(left)
        else:
            await asyncio.gather(self._jobs.stop(left), drain(max(0.0, left)))
        if self._moves is not None:
            # After the jobs, so their last events forwarded to moved sessions go out too.
            await self._moves.stop(min(2.0, deadline - self._clock()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await early
        unsaved = self._registry.mark_unsaved()
        log.info("hub_shutdown_flush", sessions=len(self._registry), unsaved=unsaved)
        await self._writes.flush_all()
        await self._registry.save_subscribed()
        if self._timer is not None:
            self._timer.close()

    async def _background(self) -> None:
        """Write-behind flushes, replay age trims, session expiry and metric deltas."""
        next_sweep = self._clock() + SWEEP_INTERVAL_S
        while True:
            await self._writes.wait_due(self.cfg.flush_interval_s)
            try:
                await self._writes.flush()
                if self._registry.subs_dirty:
                    await self._registry.save_subscribed()
                self._report_frames()
                if self._clock() >= next_sweep:
                    next_sweep = self._clock() + SWEEP_INTERVAL_S
                    self._registry.sweep()
                    if self._moves is not None:
                        self._moves.sweep()
            except Exception:
                log.exception("hub_background_failed")

    def _report_frames(self) -> None:
        sent = self._sent_closed + sum(c.sent for c in self._conns.values())
        delta = sent - self._frames_out_reported
        if delta > 0:
            self.metrics.ws_frames.labels(direction="out").inc(delta)
            self._frames_out_reported = sent
        if self._frames_in:
            self.metrics.ws_frames.labels(direction="in").inc(self._frames_in)
            self._frames_in = 0

    # --- the aiohttp handler ---------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``: run one WebSocket connection until it closes."""
        if self._stopping or self._timer is None:
            return web.json_response(
                {"error": {"code": "unavailable", "message": "the hub is not running"}},
                status=503,
            )
        ws = HubWebSocket(
            max_msg_size=self.cfg.max_frame_bytes, compress=False, autoping=True, timeout=2.0
        )
        await ws.prepare(request)
        conn_id = "c_" + secrets.token_hex(6)
        core = ConnectionCore(conn_id, self.cfg, self._clock())
        transport = request.transport
        conn = Connection(
            conn_id,
            ws,
            core,
            request.remote or "?",
            self.cfg.send_queue_max,
            transport if isinstance(transport, asyncio.Transport) else None,
        )
        conn.on_closing = self._on_closing
        self._register(conn)
        try:
            async for msg in ws:
                if conn.closing:
                    continue
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self._frames_in += 1
                    if conn.core.phase is Phase.AWAIT_HELLO:
                        conn.close(p.CLOSE_UNAUTHORIZED, "hello expected")
                    else:
                        conn.send(p.error("bad_frame", "binary frames are not accepted"))
                elif msg.type is WSMsgType.ERROR:
                    log.info("ws_error", conn_id=conn_id, error=repr(ws.exception()))
                    break
        finally:
            try:
                await conn.wait_closed()
            finally:
                # Also when aiohttp cancels this handler because the peer vanished.
                self._unregister(conn)
        return ws

    def _register(self, conn: Connection) -> None:
        self._conns[conn.id] = conn
        self._idle.clear()
        self.metrics.ws_connections.inc()
        self._schedule(conn)
        log.debug("ws_open", conn_id=conn.id, remote=conn.remote)

    def _unregister(self, conn: Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        code = conn.core.close_code or conn.ws.close_code or 1006
        conn.core.closed(code)
        self._sent_closed += conn.sent
        if self._timer is not None:
            self._timer.cancel(conn)
        self.metrics.ws_connections.dec()
        self.metrics.ws_closes.labels(code=str(code)).inc()
        self._detach(conn)
        if not self._conns:
            self._idle.set()
        log.info("ws_closed", conn_id=conn.id, code=code, session=_sid(conn))

    def _on_closing(self, conn: Connection, code: int) -> None:
        """A close was decided: stop routing this session's events to the dying socket."""
        self._detach(conn)

    def _detach(self, conn: Connection) -> None:
        label = conn.token_label
        if label is not None and conn.counted:
            conn.counted = False
            self._gate.release(label)
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            session.detached_at = self._clock()

    def _schedule(self, conn: Connection) -> None:
        when = conn.core.next_deadline()
        if when is not None and self._timer is not None:
            self._timer.schedule(conn, when)

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
                self._apply(conn, action)
            self._schedule(conn)

    def _apply(self, conn: Connection, action: Action) -> None:
        if isinstance(action, Send):
            conn.send(action.frame)
            return
        if action.code == p.CLOSE_HEARTBEAT:
            self.metrics.ws_heartbeat_timeouts.inc()
            log.info("ws_heartbeat_timeout", conn_id=conn.id, session=_sid(conn))
        elif action.code != p.CLOSE_GOING_AWAY:
            log.info("ws_closing", conn_id=conn.id, code=action.code, reason=action.reason)
        conn.close(action.code, action.reason)

    async def _on_text(self, conn: Connection, text: str) -> None:
        self._frames_in += 1
        core = conn.core
        had_pong = core.last_pong_at
        actions, frame = core.receive(text, self._clock())
        for action in actions:
            self._apply(conn, action)
        if core.last_pong_at is not had_pong:
            # The pong deadline is gone: the next ping is due earlier than the wheel has it.
            self._schedule(conn)
            if core.rtt_s is not None:
                self.metrics.ws_heartbeat_rtt.observe(core.rtt_s)
        if frame is None or conn.closing:
            return
        try:
            if isinstance(frame, p.Hello):
                await self._hello(conn, frame)
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
        if session.header_dirty:  # an accepted job is open: the header says so next flush
            self._writes.mark(session)

    # --- hello and sessions ----------------------------------------------------------------
    async def _hello(self, conn: Connection, hello: p.Hello) -> None:
        valid, admin = self._gate.authenticate(hello.token)
        if not valid:
            log.info("ws_unauthorized", conn_id=conn.id, remote=conn.remote)
            self._apply(conn, Close(p.CLOSE_UNAUTHORIZED, "unauthorized"))
            return
        label = self.cfg.label_of(hello.token)
        if not self._gate.acquire(label):
            log.info("ws_token_cap", conn_id=conn.id, token=label)
            self._apply(conn, Close(p.CLOSE_POLICY, "too many connections for this token"))
            return
        conn.token_label = label
        conn.counted = True
        session: Session | None = None
        if hello.session is not None:
            session = await self._find(conn, hello.session, label, admin)
            if conn.closing:
                return
        last_seq = hello.last_seq or 0
        if session is not None and not self._plausible(conn, session, last_seq):
            session = None
        resumed = session is not None
        missed = 0
        replay: list[str] = []
        if session is None:
            session = self._registry.new_session(label, admin)
        else:
            if session.advance(last_seq):
                # The store was behind what the client saw (a crash): never reuse those seqs.
                self._writes.mark(session)
                log.warning("ws_seq_advanced", conn_id=conn.id, session=session.id, seq=last_seq)
            # Jobs that died with the node that ran them end now: above the client's last_seq
            # (the seq rule just applied) and in the replay below (see bridge.hub.orphans).
            if session.pending_orphans and settle(session, self._jobs.is_live, self._wall()):
                self._writes.mark(session)
            replay, missed = session.resume_from(last_seq)
            old = session.conn
            if old is not None and old is not conn:
                log.info("ws_session_taken_over", conn_id=old.id, by=conn.id, session=session.id)
                self._apply(old, Close(p.CLOSE_TAKEN_OVER, "session taken over"))
        # From here to the last replayed frame nothing awaits, so no live event can slip between.
        session.conn = conn
        session.detached_at = None
        conn.session = session
        conn.core.welcomed(self._clock())
        self._schedule(conn)
        conn.send(p.welcome(session.id, resumed, self.cfg.heartbeat_s, missed), force=True)
        for frame in replay:
            conn.send(frame, force=True)
        log.info(
            "ws_welcome",
            conn_id=conn.id,
            session=session.id,
            resumed=resumed,
            replayed=len(replay),
            missed=missed,
            token=label,
        )

    async def _find(
        self, conn: Connection, session_id: str, label: str, admin: bool
    ) -> Session | None:
        """The session to resume; in a cluster, first taken over from the node holding it."""
        moves = self._moves
        if moves is None or session_id in self._registry.sessions:
            return await self._registry.find(session_id, label, admin, conn.id)
        answer = await moves.claim(session_id, label, conn.id)
        session = await self._registry.find(session_id, label, admin, conn.id)
        moves.adopted(session_id, session, answer)  # no await between the load and this
        if session is not None:
            await moves.hold(session)
        return session

    def _plausible(self, conn: Connection, session: Session, last_seq: int) -> bool:
        """Whether a resume's ``last_seq`` can be real (see :data:`MAX_SEQ_AHEAD`)."""
        limit = session.last_seq + self.cfg.replay_max_events + MAX_SEQ_AHEAD
        if last_seq <= limit:
            return True
        log.warning(
            "ws_resume_refused",
            conn_id=conn.id,
            session=session.id,
            last_seq=last_seq,
            session_last_seq=session.last_seq,
        )
        return False

    def _taken_elsewhere(self, session: Session) -> None:
        """Another node resumed ``session``: close its connection here (4005)."""
        conn = session.conn
        if conn is not None:
            log.info("ws_session_moved", conn_id=conn.id, session=session.id, to=session.moved_to)
            self._apply(conn, Close(p.CLOSE_TAKEN_OVER, "session taken over by another node"))

    # --- frames of an open connection ------------------------------------------------------
    def _emit(self, session: Session, tail: str, closes: str | None = None) -> None:
        """Number an event in the session holding it now and send it (``closes``: the own job
        the event ends, see :meth:`Session.emit`)."""
        if session.moved_to is not None:
            # A job that outlived its session's move: the node holding it now numbers the event.
            current = self._moves.route(session, tail) if self._moves is not None else None
            if current is None:
                return
            session = current
        frame = session.emit(tail, self._wall(), closes)
        if closes is None:
            self._writes.dirty.add(session)
        else:
            self._writes.mark_soon(session)  # a job's end is stored at once, not in 500 ms
        conn = session.conn
        if conn is not None:
            conn.send(frame)

    def _emit_forwarded(self, session: Session, tail: str) -> None:
        """An event of a job on another node (or held during a claim): it may end an open job."""
        self._emit(session, tail, closed_job(tail))

    def _subscribe(self, conn: Connection, topic: str) -> None:
        session = conn.session
        assert session is not None
        if topic == "ops" and not session.admin:
            conn.send(p.error("forbidden", "only admin tokens may subscribe to 'ops'"))
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

    # --- the lead's API --------------------------------------------------------------------
    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        """Stream an IM job's event to every session subscribed to ``topic`` (frames carry it)."""
        members = self._registry.members(topic)
        if not members:
            return
        tail = p.event_tail(job_id, event, topic)
        for session in list(members):
            self._emit(session, tail)

    async def publish_ops(self, payload: dict[str, Any]) -> None:
        """Send a live ops notice to connected sessions subscribed to ``ops`` (not replayed)."""
        members = self._registry.members("ops")
        if not members:
            return
        frame = p.ops(payload)
        for session in members:
            if session.conn is not None:
                session.conn.send(frame)

    def connections(self) -> list[ConnectionInfo]:
        """Every live connection, for the dashboard and ``/api/connections``."""
        now, wall = self._clock(), self._wall()
        return [connection_info(conn, now, wall) for conn in self._conns.values()]

    async def kick(self, conn_id: str) -> bool:
        """Close a connection with 4000 (operator); False if there is no such connection."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing:
            return False
        log.info("ws_kicked", conn_id=conn_id)
        self._apply(conn, Close(p.CLOSE_OPERATOR, "closed by operator"))
        return True

    @property
    def session_count(self) -> int:
        """Sessions held in memory (attached or waiting for a resume)."""
        return len(self._registry)

    async def flush(self) -> None:
        """Write every pending session change to the store now (tests, shutdown)."""
        await self._writes.flush()


def _sid(conn: Connection) -> str | None:
    return conn.session.id if conn.session is not None else None

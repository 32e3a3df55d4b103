"""The WebSocket hub of docs/protocol.md: sessions, jobs, topics, heartbeats and shutdown for /ws.

The per-connection rules live in :class:`~bridge.hub.connection.ConnectionCore`, the per-session
state in :class:`~bridge.hub.session.Session`; the hello and resume path in
:mod:`bridge.hub.resume`, the frames of an open connection in :mod:`bridge.hub.frames`, the
heartbeat timer in :mod:`bridge.hub.liveness` and the background task in
:mod:`bridge.hub.maintenance`. This class wires them to aiohttp, the engine, the store and the
metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from bridge.cluster.bus import Bus
from bridge.cluster.eventlog import EventLog
from bridge.fanout import ClusterFanout
from bridge.hub import protocol as p
from bridge.hub.auth import TokenGate
from bridge.hub.config import HubConfig
from bridge.hub.connection import Close, ConnectionCore
from bridge.hub.frames import FrameHandler, FrameMeter
from bridge.hub.heartbeat import WheelTimer
from bridge.hub.inflight import InflightBudget
from bridge.hub.info import ConnectionInfo, connection_info
from bridge.hub.jobs import LiveSessionJobs, SessionJobs
from bridge.hub.liveness import Liveness
from bridge.hub.maintenance import maintain
from bridge.hub.moves import SessionMoves
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.resume import MAX_SEQ_AHEAD, Resumer
from bridge.hub.session import Session
from bridge.hub.submitlimit import SharedSubmitLimit
from bridge.hub.ws import Connection, HubWebSocket
from bridge.jobs.runner import JobRunner
from bridge.metrics import Metrics
from bridge.store.base import Store
from engine.types import EngineLike, JobEvent

log = structlog.get_logger(__name__)

# MAX_SEQ_AHEAD lives in bridge.hub.resume; it is re-exported for callers that import it here.
__all__ = ["MAX_SEQ_AHEAD", "ConnectionInfo", "Hub"]


class Hub:
    """Serves /ws: authenticates clients, runs their jobs, streams topics, keeps sessions resumable.

    Args:
        cfg: the hub's settings.
        engine: runs jobs (:class:`engine.types.EngineLike`).
        store: keeps sessions and replay buffers (write-behind).
        metrics: Prometheus metrics to update.
        clock: monotonic seconds (injectable for tests).
        wall: wall-clock seconds since the epoch (replay ages, dashboard times).
        bus: the cluster bus; with one, sessions move between nodes (claims and releases, see
            :mod:`bridge.hub.moves`). None keeps the single-node behaviour.
        events: the cluster's event log (required with ``bus``): IM topic events of every node,
            and the events and cancels of jobs whose session moved, travel on it.
        node_id: this node's id in the cluster, unique and stable across restarts where possible
            (a random one when not given).
        runner: the bridge's job runner, shared with its other entry points (a new one on
            ``engine`` when not given).
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
        events: EventLog | None = None,
        node_id: str | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._gate = TokenGate(cfg)
        self._conns: dict[str, Connection] = {}
        #: Bytes of inbound frames held now, over every connection (``--max-inflight-bytes``).
        self.inflight = InflightBudget(cfg.max_inflight_bytes)
        self.runner = runner or JobRunner(engine)
        self.node_id = node_id or "n-" + secrets.token_hex(6)
        cluster_id = self.node_id if bus is not None else None
        self._writes = WriteBehind(store, cfg.session_ttl_s, wall, cluster_id)
        self._registry = SessionRegistry(cfg, store, self._writes, clock, wall)
        self._live = live = LiveSessionJobs(self.runner)
        #: With a cluster: the event log's fan-out (IM topic events, moved sessions' events and
        #: cancels); the relay publishes through it.
        self.fanout: ClusterFanout | None = None
        self._moves: SessionMoves | None = None
        if bus is not None:
            if events is None:
                raise ValueError("a hub on a cluster bus needs the cluster's event log")
            self.fanout = ClusterFanout(events, self, self.node_id, sessions=self)
            self._moves = SessionMoves(
                bus,
                self.node_id,
                cfg,
                registry=self._registry,
                writes=self._writes,
                clock=clock,
                host=self,
                jobs=live,
                events=self.fanout,
            )
        self._jobs = SessionJobs(
            self.runner,
            cfg.max_image_bytes,
            host=self,
            budget=self.inflight,
            remote=self._moves,
        )
        self._liveness = Liveness(cfg, metrics, clock)
        self._meter = FrameMeter(metrics)
        self._frames = FrameHandler(
            cfg,
            liveness=self._liveness,
            resumer=Resumer(
                cfg,
                gate=self._gate,
                registry=self._registry,
                writes=self._writes,
                moves=self._moves,
                jobs=live,
                liveness=self._liveness,
                clock=clock,
                wall=wall,
            ),
            jobs=self._jobs,
            registry=self._registry,
            writes=self._writes,
            shared_limit=SharedSubmitLimit(store, cfg.token_submit_rate, clock),
            meter=self._meter,
            metrics=metrics,
            clock=clock,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._idle = asyncio.Event()
        #: Recent heartbeat lateness (ping sent minus ping due, seconds; bounded) for benchmarks.
        self.ping_lateness = self._liveness.ping_lateness

    @property
    def _timer(self) -> WheelTimer[Connection] | None:
        """The heartbeat wheel timer (None until :meth:`start`); tests and benchmarks read it."""
        return self._liveness.timer

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the heartbeat timer and the write-behind/sweep task."""
        self._liveness.start()
        background = maintain(
            self.cfg,
            writes=self._writes,
            registry=self._registry,
            moves=self._moves,
            meter=self._meter,
            conns=self._conns,
            clock=self._clock,
        )
        task = asyncio.get_running_loop().create_task(background, name="hub-background")
        self._tasks.add(task)
        self._idle.set()
        if self._moves is not None:
            await self._moves.start()
        if self.fanout is not None:
            await self.fanout.start()
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
            await self.runner.stop(left)
        else:
            await asyncio.gather(self.runner.stop(left), drain(max(0.0, left)))
        if self._moves is not None:
            # After the jobs, so the releases they raced with finish too.
            await self._moves.stop(min(2.0, deadline - self._clock()))
        if self.fanout is not None:  # last: it carries the final events of jobs and the relay
            await self.fanout.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await early
        unsaved = self._registry.mark_unsaved()
        log.info("hub_shutdown_flush", sessions=len(self._registry), unsaved=unsaved)
        await self._writes.flush_all()
        await self._registry.save_subscribed()
        self._liveness.close()

    # --- the aiohttp handler ---------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``: run one WebSocket connection until it closes."""
        if self._stopping or self._liveness.timer is None:
            return web.json_response(
                {"error": {"code": "unavailable", "message": "the hub is not running"}},
                status=503,
            )
        ws = HubWebSocket(
            budget=self.inflight,
            max_msg_size=self.cfg.max_frame_bytes,
            compress=False,
            autoping=True,
            timeout=2.0,
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
            self.cfg.send_buffer_max_bytes,
        )
        conn.on_closing = self._on_closing
        gate = ws.gate
        if gate is not None:
            gate.attach(lambda refused: self._frames.on_refused(conn, refused))
        self._register(conn)
        try:
            await self._frames.read(conn)
        finally:
            try:
                await conn.wait_closed()
            finally:
                # Also when aiohttp cancels this handler because the peer vanished.
                if gate is not None:
                    gate.close()
                self._unregister(conn)
        return ws

    def _register(self, conn: Connection) -> None:
        self._conns[conn.id] = conn
        self._idle.clear()
        self.metrics.ws_connections.inc()
        self._liveness.schedule(conn)
        log.debug("ws_open", conn_id=conn.id, remote=conn.remote)

    def _unregister(self, conn: Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        code = conn.core.close_code or conn.ws.close_code or 1006
        conn.core.closed(code)
        self._meter.sent_closed += conn.sent
        self._liveness.cancel(conn)
        self.metrics.ws_connections.dec()
        self.metrics.ws_closes.labels(code=str(code)).inc()
        self._detach(conn)
        if not self._conns:
            self._idle.set()
        session = conn.session.id if conn.session is not None else None
        log.info("ws_closed", conn_id=conn.id, code=code, session=session)

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

    def taken_elsewhere(self, session: Session) -> None:
        """Another node resumed ``session``: close its connection here (4005)."""
        conn = session.conn
        if conn is not None:
            log.info("ws_session_moved", conn_id=conn.id, session=session.id, to=session.moved_to)
            self._liveness.apply(
                conn, Close(p.CLOSE_TAKEN_OVER, "session taken over by another node")
            )

    # --- events into sessions --------------------------------------------------------------
    def emit_into(self, session: Session, tail: str, closes: str | None = None) -> None:
        """Number an event in the session and send it (``closes``: the own job the event ends,
        see :meth:`Session.emit`); a job that outlived its session's move sends it through the
        cluster's event log to the node holding the session now."""
        if session.moved_to is not None:
            if self._moves is not None:
                self._moves.route(session, tail)
            return
        frame = session.emit(tail, self._wall(), closes)
        if closes is None:
            self._writes.dirty.add(session)
        else:
            self._writes.mark_soon(session)  # a job's end is stored at once, not in 500 ms
        conn = session.conn
        if conn is not None:
            conn.send(frame)

    def logged_event(self, entry_id: str, session_id: str, tail: str) -> None:
        """A moved session's job event read from the event log (see :mod:`bridge.hub.moves`)."""
        if self._moves is not None:
            self._moves.logged_event(entry_id, session_id, tail)

    def logged_cancel(self, session_id: str, job_id: str, owner: str, node: str) -> None:
        """Another node's cancel read from the event log, for a job that may run here."""
        if self._moves is not None:
            self._moves.logged_cancel(session_id, job_id, owner, node)

    # --- the lead's API --------------------------------------------------------------------
    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        """Stream an IM job's event to every session subscribed to ``topic`` (frames carry it)."""
        members = self._registry.members(topic)
        if not members:
            return
        tail = p.event_tail(job_id, event, topic)
        for session in list(members):
            self.emit_into(session, tail)

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
        self._liveness.apply(conn, Close(p.CLOSE_OPERATOR, "closed by operator"))
        return True

    @property
    def session_count(self) -> int:
        """Sessions held in memory (attached or waiting for a resume)."""
        return len(self._registry)

    async def flush(self) -> None:
        """Write every pending session change to the store now (tests, shutdown)."""
        await self._writes.flush()

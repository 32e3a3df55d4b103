"""The ``hello`` of a /ws connection: authenticate, resume or create its session, welcome, replay.

Kept in one place because its order is the delicate part of resuming (docs/protocol.md): the seq
rule, then the orphan settlement, then the replay, and no await from the session's adoption to the
last replayed frame, so no live event can slip between them.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from bridge.hub import protocol as p
from bridge.hub.auth import TokenGate
from bridge.hub.config import HubConfig
from bridge.hub.connection import Close
from bridge.hub.liveness import Liveness
from bridge.hub.moves import LiveJobs, SessionMoves
from bridge.hub.orphans import settle
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.session import Session
from bridge.hub.ws import Connection

log = structlog.get_logger(__name__)

#: A resume whose ``last_seq`` is more than this (plus the replay bound) past the session's own
#: last seq cannot come from seqs lost in a crash (one flush interval holds far fewer): the resume
#: is refused and the client gets a new session (``resumed: false``).
MAX_SEQ_AHEAD = 1_000_000


class Resumer:
    """Answers ``hello`` frames: the token checks, the session lookup (or claim), the welcome.

    Args:
        cfg: the hub's settings (token labels, heartbeat interval, replay bound).
        gate: checks tokens and counts each token's connections.
        registry: the sessions this node holds.
        writes: the write-behind queue (a changed session is scheduled there).
        moves: in a cluster, claims sessions held by other nodes (None: a single node).
        jobs: the /ws jobs running on this node (a session's orphans are the others).
        liveness: applies closes and schedules the heartbeat of a welcomed connection.
        clock: monotonic seconds.
        wall: wall-clock seconds (the time of orphan error events).
    """

    def __init__(
        self,
        cfg: HubConfig,
        *,
        gate: TokenGate,
        registry: SessionRegistry,
        writes: WriteBehind,
        moves: SessionMoves | None,
        jobs: LiveJobs,
        liveness: Liveness,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self._gate = gate
        self._registry = registry
        self._writes = writes
        self._moves = moves
        self._jobs = jobs
        self._liveness = liveness
        self._clock = clock
        self._wall = wall

    async def hello(self, conn: Connection, hello: p.Hello) -> None:
        """Accept ``hello`` on ``conn``: attach the resumed (or a new) session, welcome, replay.

        A refused token, or one at its connection cap, closes the connection instead; a resume
        of an unknown or foreign session, or with an implausible ``last_seq``, gets a new session
        (``resumed: false``). A connection holding the resumed session is closed (taken over).
        """
        valid, admin = self._gate.authenticate(hello.token)
        if not valid:
            log.info("ws_unauthorized", conn_id=conn.id, remote=conn.remote)
            self._liveness.apply(conn, Close(p.CLOSE_UNAUTHORIZED, "unauthorized"))
            return
        label = self.cfg.label_of(hello.token)
        if not self._gate.acquire(label):
            log.info("ws_token_cap", conn_id=conn.id, token=label)
            self._liveness.apply(conn, Close(p.CLOSE_POLICY, "too many connections for this token"))
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
                self._liveness.apply(old, Close(p.CLOSE_TAKEN_OVER, "session taken over"))
        # From here to the last replayed frame nothing awaits, so no live event can slip between.
        session.conn = conn
        session.detached_at = None
        conn.session = session
        conn.core.welcomed(self._clock())
        self._liveness.schedule(conn)
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

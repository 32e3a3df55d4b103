"""What the dashboard and ``/api/connections`` see of a live /ws connection (never its token)."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.hub.ws import Connection


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A live connection as the dashboard and ``/api/connections`` show it (never the token)."""

    id: str
    session: str | None
    remote: str
    connected_at: float
    last_pong_at: float | None
    rtt_ms: float | None
    topics: list[str]
    sent: int
    received: int
    state: str
    token_label: str | None


def connection_info(conn: Connection, now: float, wall: float) -> ConnectionInfo:
    """Snapshot ``conn``, turning monotonic times into wall-clock ones (``now`` ↔ ``wall``)."""
    core = conn.core
    session = conn.session
    return ConnectionInfo(
        id=conn.id,
        session=session.id if session else None,
        remote=conn.remote,
        connected_at=wall - (now - core.connected_at),
        last_pong_at=None if core.last_pong_at is None else wall - (now - core.last_pong_at),
        rtt_ms=None if core.rtt_s is None else round(core.rtt_s * 1000, 3),
        topics=sorted(session.topic_names) if session else [],
        sent=conn.sent,
        received=core.received,
        state="closing" if conn.closing else core.phase.value,
        token_label=conn.token_label,
    )

"""Jobs that died with their node: each ends with one ``internal`` error event when resumed.

A /ws job runs on the node that accepted it. If that node dies (``kill -9``, power loss) the job
dies with it and its terminal event is never numbered, yet the protocol promises every accepted job
exactly one ``done`` or ``error``. The session header in the store lists the jobs still open at its
last write (:attr:`~bridge.store.base.SessionRecord.open_jobs`); a node that rebuilds the session
from the store keeps them as candidates (:attr:`~bridge.hub.session.Session.pending_orphans`) and
ends each one, once, at the first resume: after the seq rule moved the counter past the client's
``last_seq`` (so a correct client never drops the error as a duplicate) and before the replay (so
the error is part of it). Candidates are dropped when the session came through a graceful release:
those jobs still run on the old node and their events follow the session.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import structlog

from bridge.hub.protocol import event_tail
from bridge.hub.session import Session
from engine.types import TERMINAL_KINDS, Failed

log = structlog.get_logger(__name__)

ORPHAN_CODE = "internal"
ORPHAN_MESSAGE = "the node running this job stopped before it finished; submit it again"
#: What a terminal tail must contain (JSON escapes every quote inside strings, so these can only
#: be the ``kind`` member): a cheap test before parsing a logged tail.
_TERMINAL_MARKS = ('"kind":"done"', '"kind":"error"')

#: ``is_live(session_id, job_id)``: whether this node runs that job of that session now.
IsLive = Callable[[str, str], bool]


def closed_job(tail: str) -> str | None:
    """The client id of the own job whose terminal event ``tail`` is, else None.

    For a moved session's events read from the cluster log, which arrive as bare tails; local
    jobs pass their id along instead, so the hot path never parses. Topic events close nothing.
    """
    if not any(mark in tail for mark in _TERMINAL_MARKS):
        return None
    try:
        obj = json.loads("{" + tail)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "topic" in obj or obj.get("kind") not in TERMINAL_KINDS:
        return None
    job_id = obj.get("id")
    return job_id if isinstance(job_id, str) else None


def unsettled(session: Session, is_live: IsLive) -> list[str]:
    """The session's orphan candidates that are still open and not running on this node."""
    return sorted(
        job_id
        for job_id in session.pending_orphans
        if job_id in session.open_jobs and not is_live(session.id, job_id)
    )


def settle(session: Session, is_live: IsLive, wall_now: float) -> list[str]:
    """End every orphan of ``session`` with one ``internal`` error event; the ids ended.

    Call at the first resume that attaches a session rebuilt from the store, after
    :meth:`Session.advance` and before :meth:`Session.resume_from`. The candidates are cleared and
    the ended ids leave ``open_jobs`` (the header write that follows stores that), so neither a
    later resume nor another node loading the session ends them again. The caller schedules the
    session for the store when anything was ended.
    """
    ended = unsettled(session, is_live)
    session.pending_orphans.clear()
    for job_id in ended:
        tail = event_tail(job_id, Failed(ORPHAN_CODE, ORPHAN_MESSAGE))
        session.emit(tail, wall_now, closes=job_id)
        session.remember_job(job_id)  # ids stay unique: a resubmit needs a new one
        log.warning("ws_job_orphaned", session=session.id, job_id=job_id, seq=session.last_seq)
    return ended

"""Session events read from the cluster's event log for sessions this node does not hold.

Every node reads every entry of the log. The events of a job whose session moved to another node
are appended there (``sid`` entries, :mod:`bridge.fanout`), and the node holding the session
numbers them. A node that does not hold the session keeps them here for a while: if it adopts the
session soon after (a claim in progress, or its reader was ahead of the releasing node's), it
applies the ones the old holder had not read when it let go, so no event is lost or doubled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bridge.cluster.eventlog import parse_entry_id

#: Entries kept at most (beyond, the oldest go; they are logged by the hub when needed).
MAX_KEPT = 50_000

EntryId = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Unheld:
    """One event entry of a session not held here when it was read."""

    entry: EntryId
    session: str
    tail: str
    at: float


class UnheldEvents:
    """A bounded, time-limited buffer of :class:`Unheld` entries, by session, in log order.

    Args:
        keep_s: how long an entry stays (longer than a handoff takes).
        clock: monotonic seconds.
        max_kept: most entries kept over all sessions (beyond, the oldest go).
    """

    def __init__(self, keep_s: float, clock: Callable[[], float], max_kept: int = MAX_KEPT) -> None:
        self.keep_s = keep_s
        self._clock = clock
        self._max_kept = max_kept
        self._by_session: dict[str, deque[Unheld]] = {}
        self._order: deque[Unheld] = deque()  # every kept entry, oldest first, for trimming
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, entry_id: str, session: str, tail: str) -> None:
        """Keep an event of ``session`` read at log position ``entry_id``."""
        item = Unheld(parse_entry_id(entry_id), session, tail, self._clock())
        self._by_session.setdefault(session, deque()).append(item)
        self._order.append(item)
        self._count += 1
        while self._count > self._max_kept:
            self._drop_oldest()

    def take(self, session: str, after: EntryId | None, since: float | None = None) -> list[Unheld]:
        """Remove and return the kept events of ``session`` past log position ``after`` (or,
        with no position known, those read at or after ``since``), in log order."""
        items = self._by_session.pop(session, None)
        if not items:
            return []
        self._count -= len(items)  # their places in _order are skipped when trimmed
        return [item for item in items if _unapplied(item, after, since)]

    def trim(self) -> None:
        """Forget entries older than ``keep_s``."""
        horizon = self._clock() - self.keep_s
        while self._order and self._order[0].at < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        item = self._order.popleft()
        items = self._by_session.get(item.session)
        if items and items[0] is item:  # not already taken
            items.popleft()
            self._count -= 1
            if not items:
                del self._by_session[item.session]


def _unapplied(item: Unheld, after: EntryId | None, since: float | None) -> bool:
    """Whether the old holder cannot have applied ``item``: past its position, or (position
    unknown: its answer was lost) read since the claim began."""
    if after is not None:
        return item.entry > after
    return since is not None and item.at >= since

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
    """A bounded, time-limited buffer of :class:`Unheld` entries in log order.

    Args:
        keep_s: how long an entry stays (longer than a handoff takes).
        clock: monotonic seconds.
    """

    def __init__(self, keep_s: float, clock: Callable[[], float], max_kept: int = MAX_KEPT) -> None:
        self.keep_s = keep_s
        self._clock = clock
        self._entries: deque[Unheld] = deque(maxlen=max_kept)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry_id: str, session: str, tail: str) -> None:
        """Keep an event of ``session`` read at log position ``entry_id``."""
        self._entries.append(Unheld(parse_entry_id(entry_id), session, tail, self._clock()))

    def take(self, session: str, after: EntryId | None, since: float | None = None) -> list[Unheld]:
        """Remove and return the kept events of ``session`` past log position ``after`` (or,
        with no position known, those read at or after ``since``), in log order."""
        taken: list[Unheld] = []
        kept: deque[Unheld] = deque(maxlen=self._entries.maxlen)
        for item in self._entries:
            if item.session != session:
                kept.append(item)
            elif _unapplied(item, after, since):
                taken.append(item)
        self._entries = kept
        return taken

    def trim(self) -> None:
        """Forget entries older than ``keep_s``."""
        horizon = self._clock() - self.keep_s
        entries = self._entries
        while entries and entries[0].at < horizon:
            entries.popleft()


def _unapplied(item: Unheld, after: EntryId | None, since: float | None) -> bool:
    """Whether the old holder cannot have applied ``item``: past its position, or (position
    unknown: its answer was lost) read since the claim began."""
    if after is not None:
        return item.entry > after
    return since is not None and item.at >= since

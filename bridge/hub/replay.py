"""A session's replay buffer: the last events it was sent, bounded by count, bytes and age."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from bridge.store.base import StoredEvent


class ReplayBuffer:
    """Events in seq order with no gaps; the oldest fall out when a bound is exceeded.

    ``first_seq`` is the lowest seq still kept (``last_seq + 1`` when empty), so a client that
    resumes after ``n`` can be told exactly how many events it missed.
    """

    __slots__ = (
        "_events",
        "bytes",
        "first_seq",
        "last_seq",
        "max_age_s",
        "max_bytes",
        "max_events",
    )

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        max_age_s: float,
        *,
        last_seq: int = 0,
        first_seq: int | None = None,
    ) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._events: deque[StoredEvent] = deque()
        self.bytes = 0
        self.last_seq = last_seq
        self.first_seq = last_seq + 1 if first_seq is None else first_seq

    def __len__(self) -> int:
        return len(self._events)

    def restore(self, events: Sequence[StoredEvent], last_seq: int) -> None:
        """Load kept events (from the store): the longest gap-free run that ends at ``last_seq``.

        Anything older than a gap is unusable for a lossless replay, so it counts as missed.
        """
        self._events.clear()
        self.bytes = 0
        self.last_seq = last_seq
        expected = last_seq
        run: list[StoredEvent] = []
        for ev in reversed(events):
            if ev.seq != expected:
                if ev.seq > expected:
                    continue
                break
            run.append(ev)
            expected -= 1
        run.reverse()
        for ev in run:
            self._events.append(ev)
            self.bytes += len(ev.frame)
        self.first_seq = run[0].seq if run else last_seq + 1
        while self._events and (len(self._events) > self.max_events or self.bytes > self.max_bytes):
            self._drop_oldest()

    def append(self, ev: StoredEvent) -> None:
        """Keep ``ev`` (its seq must be ``last_seq + 1``); enforce the count and byte bounds."""
        if ev.seq != self.last_seq + 1:
            raise ValueError(f"seq {ev.seq} does not follow {self.last_seq}")
        self._events.append(ev)
        self.bytes += len(ev.frame)
        self.last_seq = ev.seq
        while self._events and (len(self._events) > self.max_events or self.bytes > self.max_bytes):
            self._drop_oldest()

    def trim_age(self, now: float) -> None:
        """Drop events older than ``max_age_s``."""
        horizon = now - self.max_age_s
        while self._events and self._events[0].ts < horizon:
            self._drop_oldest()

    def ack(self, seq: int) -> None:
        """Drop everything up to ``seq`` (the client has it)."""
        seq = min(seq, self.last_seq)
        while self._events and self._events[0].seq <= seq:
            self._drop_oldest()
        self.first_seq = max(self.first_seq, seq + 1)

    def since(self, last_seq: int) -> tuple[list[StoredEvent], int]:
        """The kept events after ``last_seq`` and how many after it are no longer kept.

        Returns:
            ``(events, missed)``: ``events`` in seq order, contiguous to the buffer's end;
            ``missed`` counts the seqs in ``last_seq+1 .. first_seq-1`` that were dropped.
        """
        if last_seq >= self.last_seq:
            return [], 0
        missed = max(0, self.first_seq - 1 - last_seq)
        start = max(last_seq + 1, self.first_seq)
        if not self._events:
            return [], missed
        offset = start - self._events[0].seq
        return [self._events[i] for i in range(offset, len(self._events))], missed

    def advance(self, seq: int) -> None:
        """Move ``last_seq`` up to ``seq`` without events (seqs a crashed writer already used).

        Every kept event is older than ``seq`` and the buffer must stay gap-free, so they are
        dropped; a resume from below ``seq`` then reports the difference as ``missed``.
        """
        if seq <= self.last_seq:
            return
        self._events.clear()
        self.bytes = 0
        self.last_seq = seq
        self.first_seq = seq + 1

    def _drop_oldest(self) -> None:
        ev = self._events.popleft()
        self.bytes -= len(ev.frame)
        self.first_seq = ev.seq + 1

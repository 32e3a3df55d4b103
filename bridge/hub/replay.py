"""A session's replay buffer: the last events it was sent, bounded by count, bytes and age.

The events are kept as two parallel deques of immutable atoms (the frame text and its wall time);
seqs are implicit because the kept run is gap-free and ends at ``last_seq``. So a kept event is no
object of its own: nothing per event for the cyclic GC to track or walk in a full collection (a
hub fanning out to thousands of sessions keeps hundreds of thousands of events), no allocation per
event beyond the frame the socket needs anyway, and an idle session holds no deque at all.
:class:`~bridge.store.base.StoredEvent` objects are made only at the edges (resume, the store).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice

from bridge.store.base import StoredEvent


class ReplayBuffer:
    """Events in seq order with no gaps; the oldest fall out when a bound is exceeded.

    ``first_seq`` is the lowest seq still kept (``last_seq + 1`` when empty), so a client that
    resumes after ``n`` can be told exactly how many events it missed.
    """

    __slots__ = (
        "_frames",
        "_ts",
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
        # Created with the first event: a session that never gets one holds no deques.
        self._frames: deque[str] | None = None
        self._ts: deque[float] | None = None
        self.bytes = 0
        self.last_seq = last_seq
        self.first_seq = last_seq + 1 if first_seq is None else first_seq

    def __len__(self) -> int:
        frames = self._frames
        return 0 if frames is None else len(frames)

    @property
    def oldest_seq(self) -> int:
        """The seq of the oldest kept event (``last_seq + 1`` when none is kept)."""
        return self.last_seq - len(self) + 1

    def restore(self, events: Sequence[StoredEvent], last_seq: int) -> None:
        """Load kept events (from the store): the longest gap-free run that ends at ``last_seq``.

        Anything older than a gap is unusable for a lossless replay, so it counts as missed.
        """
        self._clear()
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
        self.first_seq = run[0].seq if run else last_seq + 1
        if run:
            frames, stamps = self._deques()
            for ev in run:
                frames.append(ev.frame)
                stamps.append(ev.ts)
                self.bytes += len(ev.frame)
            self._enforce()

    def push(self, frame: str, ts: float) -> int:
        """Keep ``frame`` as the event ``last_seq + 1`` produced at ``ts``; return its seq.

        The hot path of every delivery: two deque appends, no object per event.
        """
        frames = self._frames
        if frames is None:
            frames, stamps = self._deques()
        else:
            stamps = self._ts  # type: ignore[assignment]
        if not frames:
            self.first_seq = self.last_seq + 1
        frames.append(frame)
        stamps.append(ts)
        self.bytes += len(frame)
        self.last_seq += 1
        if len(frames) > self.max_events or self.bytes > self.max_bytes:
            self._enforce()
        return self.last_seq

    def append(self, ev: StoredEvent) -> None:
        """Keep ``ev`` (its seq must be ``last_seq + 1``); enforce the count and byte bounds."""
        if ev.seq != self.last_seq + 1:
            raise ValueError(f"seq {ev.seq} does not follow {self.last_seq}")
        self.push(ev.frame, ev.ts)

    def trim_age(self, now: float) -> None:
        """Drop events older than ``max_age_s``."""
        stamps = self._ts
        if not stamps:
            return
        horizon = now - self.max_age_s
        while stamps and stamps[0] < horizon:
            self._drop_oldest()
        if not stamps:
            self._clear()  # an idle session gives its deques back

    def ack(self, seq: int) -> None:
        """Drop everything up to ``seq`` (the client has it)."""
        seq = min(seq, self.last_seq)
        while len(self) and self.oldest_seq <= seq:
            self._drop_oldest()
        if self._frames is not None and not self._frames:
            self._clear()  # an idle session gives its deques back
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
        return self.events_from(max(last_seq + 1, self.first_seq)), missed

    def frames_since(self, last_seq: int) -> tuple[list[str], int]:
        """Like :meth:`since`, but only the frames (a resume's replay makes no event objects)."""
        if last_seq >= self.last_seq:
            return [], 0
        missed = max(0, self.first_seq - 1 - last_seq)
        start = max(last_seq + 1, self.first_seq)
        return [frame for _seq, frame, _ts in self._tail(start)], missed

    def events_from(self, seq: int) -> list[StoredEvent]:
        """The kept events with a seq of at least ``seq``, as store events (the store's format)."""
        return [StoredEvent(s, ts, frame) for s, frame, ts in self._tail(seq)]

    def slice_from(self, seq: int) -> tuple[int, list[str], list[float]]:
        """The kept events with a seq of at least ``seq`` as ``(first seq, frames, times)``:
        two lists of atoms however many events, for a write-behind batch to hold a while."""
        frames, stamps = self._frames, self._ts
        if not frames or stamps is None:
            return self.last_seq + 1, [], []
        oldest = self.oldest_seq
        first = max(seq, oldest)
        count = self.last_seq + 1 - first
        if count <= 0:
            return self.last_seq + 1, [], []
        # From the newest end: a flush takes the last few events of a long buffer, and walking
        # a deque from its old end to them would cost the whole buffer on every flush.
        new_frames = list(islice(reversed(frames), count))
        new_stamps = list(islice(reversed(stamps), count))
        new_frames.reverse()
        new_stamps.reverse()
        return first, new_frames, new_stamps

    def entries(self) -> Iterator[object]:
        """Every object the buffer holds per event (tests check none is tracked by the GC)."""
        yield from self._frames or ()
        yield from self._ts or ()

    def advance(self, seq: int) -> None:
        """Move ``last_seq`` up to ``seq`` without events (seqs a crashed writer already used).

        Every kept event is older than ``seq`` and the buffer must stay gap-free, so they are
        dropped; a resume from below ``seq`` then reports the difference as ``missed``.
        """
        if seq <= self.last_seq:
            return
        self._clear()
        self.last_seq = seq
        self.first_seq = seq + 1

    def _tail(self, start: int) -> Iterator[tuple[int, str, float]]:
        frames, stamps = self._frames, self._ts
        if not frames or stamps is None:
            return
        oldest = self.oldest_seq
        skip = max(0, start - oldest)
        for i, (frame, ts) in enumerate(
            islice(zip(frames, stamps, strict=True), skip, None), oldest + skip
        ):
            yield i, frame, ts

    def _deques(self) -> tuple[deque[str], deque[float]]:
        frames: deque[str] = deque()
        stamps: deque[float] = deque()
        self._frames, self._ts = frames, stamps
        return frames, stamps

    def _clear(self) -> None:
        self._frames = None
        self._ts = None
        self.bytes = 0

    def _enforce(self) -> None:
        while len(self) and (len(self) > self.max_events or self.bytes > self.max_bytes):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        assert self._frames is not None and self._ts is not None
        seq = self.oldest_seq
        frame = self._frames.popleft()
        self._ts.popleft()
        self.bytes -= len(frame)
        self.first_seq = seq + 1

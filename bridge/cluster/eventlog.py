"""An ordered, resumable log of fan-out payloads: the :class:`EventLog` protocol and
:class:`LocalEventLog` for one process.

Unlike the bus (at most once), a log keeps entries for a while, so a node cut off from it reads on
from the last entry it delivered once it is back, and misses nothing still retained.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from bridge.store.base import StoreUnavailable

log = structlog.get_logger(__name__)

#: Called with (entry id, payload) for each entry, in log order; must not block (hand off to a
#: queue instead).
EntryCallback = Callable[[str, bytes], None]

#: Largest payload accepted by ``append`` (an event frame, never an image).
MAX_ENTRY_BYTES = 1 << 20


class EventLog(Protocol):
    """Append payloads in order; every started node reads every entry appended after it started."""

    async def start(self, on_entry: EntryCallback) -> None:
        """Remember the log's current end, then call ``on_entry`` for each later entry, in order."""
        ...

    async def close(self) -> None:
        """Stop reading and release connections."""
        ...

    async def append(self, payload: bytes) -> str:
        """Add one entry at the end of the log.

        Returns:
            The entry's id.

        Raises:
            StoreUnavailable: the backend is down; the entry may or may not have been added.
        """
        ...

    async def append_many(self, payloads: Sequence[bytes]) -> None:
        """Add entries at the end of the log, in order, in one round trip.

        Raises:
            StoreUnavailable: the backend is down; any prefix of ``payloads`` may have been added.
        """
        ...


def check_entry(payload: bytes) -> bytes:
    """Return ``payload`` if it is bytes of an acceptable size; raise otherwise."""
    if not isinstance(payload, bytes):
        raise TypeError("payload must be bytes")
    if len(payload) > MAX_ENTRY_BYTES:
        raise ValueError(f"payload larger than {MAX_ENTRY_BYTES} bytes")
    return payload


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a pair of ints, so that entry ids compare in log order.

    Raises:
        ValueError: not a stream entry id.
    """
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def stop_task(task: asyncio.Task[None], timeout_s: float) -> bool:
    """Cancel ``task`` and wait up to ``timeout_s`` for it to end; True if it did.

    Why the wait is bounded: redis-py (8.1, Python 3.11) can swallow a cancellation that lands
    inside a pipeline, so our loops also check a stop flag and end at their next turn.
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("eventlog_task_not_stopped", task=task.get_name(), timeout_s=timeout_s)
    return bool(done)


class _LocalShared:
    """The entries' state shared by every handle on one local log."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.followers: list[LocalEventLog] = []
        self.down = False


class LocalEventLog:
    """The log inside one process: delivery is immediate and in order; nothing is retained.

    :meth:`follower` gives another node's handle on the same log (tests run two nodes in one
    process with it), and ``down = True`` makes appends fail as if Redis were down.
    """

    def __init__(self, _shared: _LocalShared | None = None) -> None:
        self._shared = _shared or _LocalShared()
        self._on_entry: EntryCallback | None = None

    @property
    def down(self) -> bool:
        """While True, appends raise :class:`StoreUnavailable` (an outage, for tests)."""
        return self._shared.down

    @down.setter
    def down(self, value: bool) -> None:
        self._shared.down = value

    def follower(self) -> LocalEventLog:
        """Another handle on the same entries, as a second node would have."""
        return LocalEventLog(self._shared)

    async def start(self, on_entry: EntryCallback) -> None:
        self._on_entry = on_entry
        if self not in self._shared.followers:
            self._shared.followers.append(self)

    async def close(self) -> None:
        if self in self._shared.followers:
            self._shared.followers.remove(self)
        self._on_entry = None

    async def append(self, payload: bytes) -> str:
        check_entry(payload)
        if self._shared.down:
            raise StoreUnavailable("local event log is down")
        entry_id = f"{next(self._shared.ids)}-0"
        for follower in list(self._shared.followers):
            callback = follower._on_entry
            if callback is None:
                continue
            try:
                callback(entry_id, payload)
            except Exception:
                log.exception("eventlog_callback_failed", entry_id=entry_id)
        return entry_id

    async def append_many(self, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            check_entry(payload)
        for payload in payloads:
            await self.append(payload)

"""A process-wide budget for the bytes of inbound /ws frames, reserved at each frame's header.

Without it, N connections each sending one large submit at once make the process hold N frames
(received bytes, the decoded text, the parsed JSON, the decoded image) however small the engine's
queue is. The budget (``--max-inflight-bytes``) counts a frame's *declared* payload length from the
moment its header arrives until the hub has handled the frame, and a submit's image from then until
the engine starts it (or ends it).

aiohttp buffers a whole frame before handing it over, so the reservation happens in the frame
gate (:mod:`bridge.hub.frame_gate`), which reads frame headers before aiohttp does.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Any, Final

import structlog

log = structlog.get_logger(__name__)

#: After this many bytes were reserved and all of them released, glibc is asked to return freed
#: memory to the system (see :func:`trim_heap`).
TRIM_AFTER_BYTES: Final = 32 * 2**20
#: Seconds between the budget emptying and the trim.
TRIM_DELAY_S: Final = 1.0


def _load_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """Ask glibc to give freed heap memory back to the system; False where there is no glibc.

    Why: glibc serves a large block from ``mmap`` and returns it on free, but each such free
    raises its mmap threshold (up to 32 MiB), so the next burst of 10 MiB frames is served from
    the heap, and freed heap memory above the top chunk stays in the process. Measured with
    ``bench/hub_inflight_rss.py``: after a burst, RSS stayed ~70 MiB up without this and came
    back to within a few MiB of where it started with it (see docs/benchmarks.md).
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class InflightBudget:
    """Bytes reserved by inbound frames across every connection of this process.

    Args:
        limit: the most bytes :meth:`try_reserve` lets be reserved at once.
    """

    __slots__ = ("_since_trim", "_trim_due", "limit", "peak", "refused", "trims", "used")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"the inflight budget must be positive, got {limit!r}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0
        self.trims = 0
        self._since_trim = 0
        self._trim_due = False

    def try_reserve(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit under the limit; False (and nothing reserved) if not."""
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.force_reserve(n)
        return True

    def force_reserve(self, n: int) -> None:
        """Reserve ``n`` bytes even past the limit (small frames, which must always pass)."""
        self.used += n
        self._since_trim += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> None:
        """Give back ``n`` reserved bytes; once a large burst is all released, trim the heap."""
        self.used = max(0, self.used - n)
        if self.used == 0 and self._since_trim >= TRIM_AFTER_BYTES and not self._trim_due:
            # A moment later: the jobs' own copies of the images are usually gone by then too.
            self._trim_due = True
            try:
                asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim)
            except RuntimeError:  # no loop (unit tests): trim now
                self._trim()

    def _trim(self) -> None:
        self._trim_due = False
        if self.used > 0:
            return  # a new burst: trimmed when that one is released
        self._since_trim = 0
        if trim_heap():
            self.trims += 1
            log.debug("ws_inflight_heap_trimmed", trims=self.trims)

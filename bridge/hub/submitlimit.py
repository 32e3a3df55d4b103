"""The cluster-wide submit limit per token: a fixed 1-second window counter kept in the store.

The per-connection token bucket (:mod:`bridge.hub.ratelimit`) stops one socket from flooding; this
limit stops one token from multiplying its rate by opening many connections or by spreading them
over several nodes. The store is only advisory here: when it fails or hangs, submits are allowed
(one warning per outage) and the store is asked again only after a short pause, so an outage never
blocks or slows the submit path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridge.store.base import Store

log = structlog.get_logger(__name__)

KEY_PREFIX = "hub:submit-rate:"
WINDOW_S = 1.0
#: Longest wait for the store's answer before a submit is let through unchecked.
STORE_TIMEOUT_S = 0.25
#: After a failure the store is left alone this long (submits pass unchecked meanwhile).
RETRY_AFTER_S = 1.0


class SharedSubmitLimit:
    """Allows at most ``rate`` submits per second per token label, summed over every node.

    Args:
        store: the store every node shares (``incr`` with a TTL is its fixed-window counter).
        rate: submits per second per token; 0 disables the limit.
        clock: monotonic seconds (when to ask a failing store again).
    """

    def __init__(self, store: Store, rate: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.limit = int(rate * WINDOW_S)
        self._clock = clock
        self._skip_until = 0.0
        self.failing = False
        self.refused = 0

    @property
    def enabled(self) -> bool:
        """Whether the limit is on."""
        return self.limit > 0

    async def allow(self, label: str) -> bool:
        """Count one submit of the token labelled ``label``; False when its window is full.

        Never raises: a failing or slow store means "allowed".
        """
        if self.limit <= 0:
            return True
        now = self._clock()
        if now < self._skip_until:
            return True
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                count = await self.store.incr(KEY_PREFIX + label, WINDOW_S)
        except Exception as exc:  # StoreUnavailable, timeouts, backend bugs: fail open
            self._skip_until = now + RETRY_AFTER_S
            if not self.failing:
                self.failing = True
                log.warning("hub_shared_limit_unavailable", token=label, error=repr(exc))
            return True
        if self.failing:
            self.failing = False
            log.info("hub_shared_limit_recovered", token=label)
        if count > self.limit:
            self.refused += 1
            return False
        return True

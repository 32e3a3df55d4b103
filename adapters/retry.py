"""The one retry policy of the project: a capped, jittered backoff and tenacity-driven API calls.

:class:`Backoff` is the only backoff computation: every reconnect loop (the bridge's Redis
clients and circuit breaker via ``bridge.store.backoff``, the reference hub client, the Slack,
DingTalk, Feishu and Telegram connections) draws its waits from one. A platform API call raises
:class:`Retryable` for a failure worth another try (rate limit, 5xx, transport); ``wait_s``
carries the wait the platform asked for (never shortened), otherwise the wait comes from a
:class:`Backoff`. It lives under ``adapters/`` because adapters and the engine may not import
the bridge, while the bridge may import adapters.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt

log = structlog.get_logger(__name__)

T = TypeVar("T")

Spread = Literal["around", "below", "above"]


class Backoff:
    """Delays doubling from ``initial`` up to ``cap``, jittered; :meth:`reset` after a success.

    Args:
        initial: first delay in seconds (0: never wait, e.g. in tests).
        cap: largest base delay in seconds (the doubling stops there).
        jitter: relative spread, so that many nodes do not retry in lock-step.
        rng: random source in [0, 1) (injected by tests; ``random.Random(n).random`` works).
        spread: where the jitter goes around the base ``b``: ``"around"`` draws from
            ``b*(1-jitter) .. b*(1+jitter)`` clipped to ``[0, cap]``; ``"below"`` from
            ``b*(1-jitter) .. b`` (``jitter=0.5`` is "equal jitter": never collapses to nothing);
            ``"above"`` from ``b .. b*(1+jitter)``, for a base the platform stated, which a wait
            must never undercut (so only this shape may exceed ``cap``, by at most the jitter).
    """

    def __init__(
        self,
        initial: float = 0.05,
        cap: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
        *,
        spread: Spread = "around",
    ) -> None:
        if not 0 <= initial <= cap:
            raise ValueError("need 0 <= initial <= cap")
        if not 0 <= jitter <= 1:
            raise ValueError("need 0 <= jitter <= 1")
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.spread = spread
        self._rng = rng
        self.failures = 0

    def base(self, failures: int) -> float:
        """The un-jittered delay after ``failures`` earlier failures: doubling, capped."""
        return float(min(self.cap, self.initial * (2 ** min(max(failures, 0), 30))))

    def delay(self, failures: int) -> float:
        """A jittered delay after ``failures`` earlier failures, without counting one more."""
        base = self.base(failures)
        if self.spread == "below":
            return base * (1.0 - self.jitter + self.jitter * self._rng())
        if self.spread == "above":
            return base * (1.0 + self.jitter * self._rng())
        spread = base * self.jitter * (2 * self._rng() - 1)
        return float(max(0.0, min(self.cap, base + spread)))

    def next_delay(self, at_least: float = 0.0) -> float:
        """Count one more failure and return how long to wait before the next try.

        ``at_least`` is a wait the other side asked for (``Retry-After``): never shortened.
        """
        delay = self.delay(self.failures)
        self.failures += 1
        return max(delay, at_least)

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.failures = 0


class Retryable(Exception):
    """A failure worth another try; ``wait_s`` overrides the backoff when set."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class TooLongWait(Retryable):
    """The platform asked for a wait longer than the caller's ``max_wait_s``: not retried.

    Why: retrying before the stated time only earns another refusal, so a wait that is too long
    to sit out fails the call instead of being shortened.
    """


def retrying(
    *,
    attempts: int,
    sleep: Callable[[float], Awaitable[None]],
    event: str,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    rng: random.Random | None = None,
    max_wait_s: float | None = None,
    jitter: float = 0.5,
    spread: Spread = "below",
    backoff: Backoff | None = None,
) -> AsyncRetrying:
    """An ``AsyncRetrying`` that retries :class:`Retryable` up to ``attempts`` tries in all.

    Waits come from a :class:`Backoff` (``base_s`` doubling to ``cap_s``; by default equal
    jitter) unless the failure states its own ``wait_s``, which is waited in full; a stated wait
    over ``max_wait_s`` is not retried but raised as :class:`TooLongWait`. Each retry is logged
    as ``event`` with the attempt number and the (secret-free) reason; the last
    :class:`Retryable` is re-raised when the tries run out. A ``backoff`` passed in (one the
    caller configured) replaces the one built from ``base_s``/``cap_s``/``jitter``/``spread``.
    """
    if backoff is None:
        draw = (rng or random.Random()).random
        backoff = Backoff(base_s, max(cap_s, base_s), jitter, draw, spread=spread)
    policy = backoff

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, Retryable) and exc.wait_s is not None:
            return float(exc.wait_s)
        return policy.delay(state.attempt_number - 1)

    def retry(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        if not isinstance(exc, Retryable):
            return False
        return exc.wait_s is None or max_wait_s is None or exc.wait_s <= max_wait_s

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info(event, attempt=state.attempt_number, reason=str(exc))

    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry,
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    sleep: Callable[[float], Awaitable[None]],
    event: str,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    rng: random.Random | None = None,
    max_wait_s: float | None = None,
    jitter: float = 0.5,
    spread: Spread = "below",
    backoff: Backoff | None = None,
) -> T:
    """Await ``call()`` under :func:`retrying`; the last :class:`Retryable` propagates.

    Every platform client's call loop is this one, so retries behave the same on each. A
    stated wait over ``max_wait_s`` propagates at once as :class:`TooLongWait`.
    """
    policy = retrying(
        attempts=attempts,
        base_s=base_s,
        cap_s=cap_s,
        rng=rng,
        sleep=sleep,
        event=event,
        max_wait_s=max_wait_s,
        jitter=jitter,
        spread=spread,
        backoff=backoff,
    )
    try:
        async for attempt in policy:
            with attempt:
                return await call()
    except Retryable as exc:
        if exc.wait_s is not None and max_wait_s is not None and exc.wait_s > max_wait_s:
            raise TooLongWait(f"{exc} (asked to wait {exc.wait_s:g} s)", exc.wait_s) from None
        raise
    raise AssertionError("unreachable")  # pragma: no cover

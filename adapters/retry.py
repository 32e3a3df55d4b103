"""The adapters' one retry policy for platform API calls (tenacity): backoff, or the stated wait.

A call raises :class:`Retryable` for a failure worth another try (rate limit, 5xx, transport);
``wait_s`` carries the wait the platform asked for, otherwise the wait doubles from ``base_s`` up
to ``cap_s`` with jitter. Adapters may not import the bridge's own backoff, so this is theirs.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Retryable(Exception):
    """A failure worth another try; ``wait_s`` overrides the backoff when set."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


def retrying(
    *,
    attempts: int,
    base_s: float,
    cap_s: float,
    rng: random.Random,
    sleep: Callable[[float], Awaitable[None]],
    event: str,
) -> AsyncRetrying:
    """An ``AsyncRetrying`` that retries :class:`Retryable` up to ``attempts`` tries in all.

    Each retry is logged as ``event`` with the attempt number and the (secret-free) reason;
    the last :class:`Retryable` is re-raised when the tries run out.
    """

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, Retryable) and exc.wait_s is not None:
            return float(exc.wait_s)
        exponent: int = state.attempt_number - 1
        return float(min(cap_s, base_s * 2.0**exponent) * rng.uniform(0.5, 1.0))

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info(event, attempt=state.attempt_number, reason=str(exc))

    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry_if_exception_type(Retryable),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_s: float,
    cap_s: float,
    rng: random.Random,
    sleep: Callable[[float], Awaitable[None]],
    event: str,
) -> T:
    """Await ``call()`` under :func:`retrying`; the last :class:`Retryable` propagates.

    Every platform client's call loop is this one, so retries behave the same on each.
    """
    policy = retrying(
        attempts=attempts, base_s=base_s, cap_s=cap_s, rng=rng, sleep=sleep, event=event
    )
    async for attempt in policy:
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover

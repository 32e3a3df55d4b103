"""Long polling: ``getUpdates`` in a loop, the offset kept durably and moved only past recorded
updates, jittered backoff on errors, and an honest status (connecting/connected/reconnecting).

The offset is saved after the sink recorded an update (or the update was ignored), so a crash
at any point re-fetches at most updates the sink already knows (it dedupes them) and never skips
one. Telegram forgets updates below the offset we send, which is why the offset must not move
before the sink returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from adapters.retry import Backoff
from adapters.status import StatusTracker
from adapters.telegram.api import BotApi, TelegramApiError
from adapters.telegram.config import TelegramConfig

log = structlog.get_logger(__name__)

#: Handles one decoded update; returns normally when it may be confirmed, raises when not.
UpdateHandler = Callable[[object], Awaitable[None]]


class OffsetStore(Protocol):
    """Durable home of the polling offset (the bridge keeps it in its store)."""

    async def load(self) -> int | None:
        """The saved offset, or None when none was saved."""
        ...

    async def save(self, offset: int) -> None:
        """Durably record ``offset`` (the next ``update_id`` wanted)."""
        ...


class Poller:
    """Runs ``getUpdates`` until :meth:`stop`; each update goes to ``handle`` in order."""

    def __init__(
        self,
        config: TelegramConfig,
        api: BotApi,
        offsets: OffsetStore,
        handle: UpdateHandler,
        status: StatusTracker,
        delays: Backoff,
        *,
        update_id_of: Callable[[object], int | None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._cfg = config
        self._api = api
        self._offsets = offsets
        self._handle = handle
        self._status = status
        self._delays = delays
        self._update_id_of = update_id_of
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.offset: int | None = None
        self._quick = True
        self.polls = 0

    def start(self, ready: Callable[[], Awaitable[object]]) -> None:
        """Start the loop in the background once ``ready`` (the bot's identity) returned."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(ready), name="telegram-poll")

    async def stop(self) -> None:
        """Cancel the loop and wait for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self, ready: Callable[[], Awaitable[object]]) -> None:
        await ready()
        loaded = False
        self._quick = True
        while True:
            try:
                if not loaded:
                    self.offset = await self._offsets.load()
                    loaded = True
                    log.info("telegram.poll_offset_loaded", offset=self.offset)
                await self._poll_once()
                self._delays.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = str(exc)[:200] if isinstance(exc, TelegramApiError) else _kind(exc)
                self._status.record_error(reason)
                self._quick = True
                delay = self._delays.next_delay()
                self._status.set_state("reconnecting", attempts=self._status.attempts + 1)
                log.warning(
                    "telegram.poll_failed",
                    offset=self.offset,
                    reason=reason,
                    retry_in_s=round(delay, 3),
                )
                await self._sleep(delay)

    async def _poll_once(self) -> None:
        # The first poll of a (re)connection does not wait, so the status turns "connected" as
        # soon as Telegram answers instead of after a whole long poll.
        timeout = 0 if self._quick else self._cfg.poll_timeout_s
        params: dict[str, object] = {"timeout": timeout, "allowed_updates": ["message"]}
        if self.offset is not None:
            params["offset"] = self.offset
        result = await self._api.call(
            "getUpdates", params, timeout_s=timeout + self._cfg.api_timeout_s
        )
        self.polls += 1
        self._quick = False
        self._status.set_state("connected", attempts=0)
        if not isinstance(result, list):
            raise TelegramApiError("getUpdates: result is not a list")
        for update in result:
            uid = self._update_id_of(update)
            if uid is not None and self.offset is not None and uid < self.offset:
                continue  # already confirmed (a server that re-sends old updates)
            await self._handle(update)  # raises → not confirmed; fetched again after backoff
            if uid is not None:
                await self._offsets.save(uid + 1)
                self.offset = uid + 1


def _kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}"

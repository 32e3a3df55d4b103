"""A streamed answer in one threaded Slack message: ``chat.update`` about once a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from adapters.base import ReplyError
from adapters.pacing import Coalescer
from adapters.slack.webapi import SlackApiError, SlackWebApi

log = structlog.get_logger(__name__)

ELLIPSIS = "…"
#: What the reply shows before the first words arrive, and for an empty answer.
PLACEHOLDER = "…"


def fit_text(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters (cut with an ellipsis); never empty (Slack refuses)."""
    if not text.strip():
        return PLACEHOLDER
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS


class SlackReplyStream:
    """Edits one posted reply as the model writes (newest text wins, paced per message)."""

    def __init__(
        self,
        api: SlackWebApi,
        *,
        channel: str,
        ts: str,
        source_message_id: str,
        interval_s: float,
        max_chars: int,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api = api
        self._channel = channel
        self._ts = ts
        self._source_id = source_message_id
        self._max_chars = max_chars
        self._edits = Coalescer(
            self._send, interval_s=interval_s, name=f"slack-{ts}", monotonic=monotonic, sleep=sleep
        )

    @property
    def reply_message_id(self) -> str:
        """The reply's ``ts`` (the channel is the source message's)."""
        return self._ts

    @property
    def updates_sent(self) -> int:
        """``chat.update`` calls that succeeded."""
        return self._edits.sends

    async def update(self, text_so_far: str) -> None:
        """Record the answer so far; a background task sends it (never waits for Slack)."""
        self._edits.offer(text_so_far)

    async def finish(self, final_text: str) -> None:
        """Show the final answer (raises ReplyError if it cannot be delivered)."""
        await self._close(final_text, "done")

    async def fail(self, apology: str) -> None:
        """Replace the reply with a short apology (raises ReplyError if it cannot be delivered)."""
        await self._close(apology, "failed")

    async def aclose(self) -> None:
        """Stop the background edits without a final one (shutdown)."""
        await self._edits.cancel()

    async def _close(self, text: str, state: str) -> None:
        if self._edits.closed:
            return
        try:
            await self._edits.close(text)
        except SlackApiError as exc:
            raise ReplyError(f"final update of reply {self._ts} failed: {exc}") from None
        log.info(
            "slack.reply_closed",
            message_id=self._source_id,
            reply_ts=self._ts,
            state=state,
            updates=self._edits.sends,
        )

    async def _send(self, text: str) -> None:
        await self._api.update_message(self._channel, self._ts, fit_text(text, self._max_chars))

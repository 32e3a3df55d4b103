"""A streamed answer in one Feishu reply card: coalesced PATCHes under Feishu's 5 updates/s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from adapters.base import ReplyError
from adapters.feishu.cards import CardState, answer_card, card_content
from adapters.feishu.openapi import FeishuApiError, OpenApiClient

log = structlog.get_logger(__name__)


class FeishuReplyStream:
    """Updates one reply card as the model writes.

    ``update`` only records the newest text; a single background task sends it no more often than
    every ``interval_s`` (intermediate texts are skipped, the newest always wins). ``finish`` and
    ``fail`` wait for that task, then send the last card, so updates never arrive out of order.
    """

    def __init__(
        self,
        api: OpenApiClient,
        *,
        source_message_id: str,
        reply_message_id: str,
        interval_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._source_id = source_message_id
        self._reply_id = reply_message_id
        self._interval = interval_s
        self._monotonic = monotonic
        self._latest: str | None = None
        self._sent: str | None = None
        self._last_patch_at = float("-inf")
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.patches_sent = 0
        self.patch_errors = 0

    @property
    def reply_message_id(self) -> str:
        """The Feishu id of the reply card."""
        return self._reply_id

    @property
    def closed(self) -> bool:
        """Whether ``finish`` or ``fail`` ran."""
        return self._closed

    async def update(self, text_so_far: str) -> None:
        """Record the answer so far and make sure a flush is scheduled; never waits for Feishu."""
        if self._closed:
            return
        self._latest = text_so_far
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(
                self._flush_loop(), name=f"feishu-patch-{self._reply_id}"
            )

    async def finish(self, final_text: str) -> None:
        """Show the final answer.

        Raises:
            ReplyError: the final card could not be delivered.
        """
        await self._close(final_text, "done")

    async def fail(self, apology: str) -> None:
        """Replace the card with a short apology.

        Raises:
            ReplyError: the card could not be delivered.
        """
        await self._close(apology, "failed")

    async def aclose(self) -> None:
        """Stop the background flush without a final card (shutdown)."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _close(self, text: str, state: CardState) -> None:
        if self._closed:
            return
        self._closed = True
        self._latest = None
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._pace()
        try:
            await self._patch(text, state)
        except FeishuApiError as exc:
            raise ReplyError(f"final update of reply failed: {exc}") from None
        log.info(
            "feishu.reply_closed",
            message_id=self._source_id,
            state=state,
            patches=self.patches_sent,
        )

    async def _flush_loop(self) -> None:
        while not self._closed and self._latest is not None and self._latest != self._sent:
            await self._pace()
            text = self._latest
            if self._closed or text is None:
                return
            try:
                await self._patch(text, "streaming")
            except FeishuApiError as exc:
                self.patch_errors += 1
                log.warning("feishu.patch_failed", message_id=self._source_id, error=str(exc))
                self._sent = text  # do not hammer a failing message; the final card retries

    async def _pace(self) -> None:
        wait = self._last_patch_at + self._interval - self._monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _patch(self, text: str, state: CardState) -> None:
        # Pace on request starts: that is what Feishu's per-message rate limit counts.
        self._last_patch_at = self._monotonic()
        await self._api.patch(self._reply_id, card_content(answer_card(text, state)))
        self._sent = text
        self.patches_sent += 1

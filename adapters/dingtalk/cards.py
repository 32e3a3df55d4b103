"""Streamed answers in a DingTalk AI card: create and deliver once, stream the text, finish.

As DingTalk's card APIs (and its official stream SDK) define them: ``POST
/v1.0/card/instances/createAndDeliver`` posts a card of the operator's template under our
``outTrackId`` into the group (``dtv1.card//IM_GROUP.<conversationId>``) or the single chat
(``dtv1.card//IM_ROBOT.<staffId>``); ``PUT /v1.0/card/streaming`` replaces the template's text
variable; ``PUT /v1.0/card/instances`` sets the final ``flowStatus`` (3 finished, 5 failed).
The ``outTrackId`` is derived from the message id, so a resumed reply streams into the same card.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from adapters.base import InboundMessage, ReplyError
from adapters.dingtalk.config import DingTalkConfig
from adapters.dingtalk.openapi import DingTalkApi, DingTalkApiError
from adapters.pacing import Coalescer

log = structlog.get_logger(__name__)

CREATE_PATH = "/v1.0/card/instances/createAndDeliver"
FLOW_PROCESSING = "1"
FLOW_INPUTING = "2"
FLOW_FINISHED = "3"
FLOW_FAILED = "5"


def out_track_id(message_id: str) -> str:
    """The card's id for the answer to ``message_id`` (deterministic, so re-runs find it)."""
    return "bridge-" + hashlib.sha256(f"answer:{message_id}".encode()).hexdigest()[:32]


def create_body(
    cfg: DingTalkConfig, msg: InboundMessage, track_id: str, robot: str
) -> dict[str, Any]:
    """The createAndDeliver body for the conversation of ``msg``."""
    body: dict[str, Any] = {
        "cardTemplateId": cfg.card_template_id,
        "outTrackId": track_id,
        "cardData": {"cardParamMap": {"flowStatus": FLOW_PROCESSING, cfg.card_content_key: ""}},
        "callbackType": "STREAM",
        "imGroupOpenSpaceModel": {"supportForward": True},
        "imRobotOpenSpaceModel": {"supportForward": True},
        "userIdType": 1,
    }
    if msg.chat_type == "p2p":
        body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{msg.sender_id}"
        body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT"}
    else:
        body["openSpaceId"] = f"dtv1.card//IM_GROUP.{msg.chat_id}"
        body["imGroupOpenDeliverModel"] = {"robotCode": robot or cfg.client_id}
    return body


class DingTalkCardReply:
    """One AI card that grows as the model writes (updates coalesced to ``card_interval_s``)."""

    def __init__(
        self,
        api: DingTalkApi,
        cfg: DingTalkConfig,
        *,
        source_message_id: str,
        track_id: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._cfg = cfg
        self._source_id = source_message_id
        self._track_id = track_id
        self._closed = False
        self._pacer = Coalescer(
            self._stream,
            interval_s=cfg.card_interval_s,
            name=f"dingtalk-card-{track_id}",
            monotonic=monotonic,
        )

    @property
    def reply_message_id(self) -> str:
        """The card's ``outTrackId``."""
        return self._track_id

    @property
    def closed(self) -> bool:
        """Whether ``finish`` or ``fail`` ran."""
        return self._closed

    async def update(self, text_so_far: str) -> None:
        """Show the answer so far (coalesced; never waits for DingTalk)."""
        if not self._closed:
            self._pacer.offer(text_so_far)

    async def finish(self, final_text: str) -> None:
        """Stream the final text, then mark the card finished.

        Raises:
            ReplyError: the card could not be finished.
        """
        await self._close(final_text, FLOW_FINISHED)

    async def fail(self, apology: str) -> None:
        """Replace the text with a short apology and mark the card failed.

        Raises:
            ReplyError: the card could not be updated.
        """
        await self._close(apology, FLOW_FAILED)

    async def aclose(self) -> None:
        """Stop streaming without a final update (shutdown)."""
        self._closed = True
        await self._pacer.cancel()

    async def _close(self, text: str, flow: str) -> None:
        if self._closed:
            return
        await self._pacer.drain()
        try:
            await self._stream(text, final=True, failed=flow == FLOW_FAILED)
            await self._api.call(
                "PUT",
                "/v1.0/card/instances",
                {
                    "outTrackId": self._track_id,
                    "cardData": {
                        "cardParamMap": {"flowStatus": flow, self._cfg.card_content_key: text}
                    },
                },
            )
        except DingTalkApiError as exc:
            raise ReplyError(f"card of {self._source_id}: {exc}") from None
        self._closed = True
        log.info("dingtalk.card_closed", message_id=self._source_id, flow=flow)

    async def _stream(self, text: str, *, final: bool = False, failed: bool = False) -> None:
        await self._api.call(
            "PUT",
            "/v1.0/card/streaming",
            {
                "outTrackId": self._track_id,
                "guid": str(uuid.uuid4()),
                "key": self._cfg.card_content_key,
                "content": text,
                "isFull": True,
                "isFinalize": final,
                "isError": failed,
            },
        )

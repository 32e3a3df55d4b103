"""Slack's conformance harness: Socket Mode over ``FakeSlack``.

Events are ``events_api`` envelopes carrying a ``message`` event (a ``file_share`` with the photo
in ``files[]``, served from ``files-pri`` to the bot token only), pushed through the fake's Socket
Mode socket; the ``{"envelope_id"}`` the bot sends back is the ack. Slack re-delivers an event in a
new envelope with the same ``event_id`` and a higher ``retry_attempt``. Replies are read back from
the fake's records of accepted ``chat.postMessage`` (threaded: ``thread_ts`` is the user message's
``ts``) and ``chat.update`` calls. A 429 is Slack's: HTTP 429 with ``Retry-After`` in seconds.
"""

from __future__ import annotations

import itertools
import math

from tests.adapters.conformance.harness import (
    BotReply,
    Delivery,
    EditRate,
    Method,
    Streaming,
    Throttle,
    Version,
)
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, message_envelope

_METHODS: dict[Method, str] = {"reply": "chat.postMessage", "edit": "chat.update"}
_PLACEHOLDER = "…"  # what the bot's reply shows before the first words


class SlackSocketHarness:
    """The bridge dials Slack's Socket Mode; envelopes arrive on the socket and are acked there.

    Slack's message id is the channel plus the message's ``ts`` (``C…:1700002000.000001``), so
    ``new_message_id`` builds it in the chat ``new_chat`` made last (the suite asks for a chat,
    then for a message id in it).
    """

    name = "slack-socket"
    platform = "slack"
    long_connection = True
    # Slack: chat.update is a Tier 3 method (50+ a minute), and an app should send about one
    # message a second per channel, short bursts allowed. The adapter edits once a second; two
    # in a second is the burst (and the few ms of loopback jitter between two paced edits).
    edit_rate = EditRate(max_edits=2, per_s=1.0)
    streaming: Streaming = "edits"

    def __init__(self) -> None:
        self.fake = FakeSlack()
        self._ids = itertools.count(1)
        self._chat = ""

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    def bridge_args(self) -> list[str]:
        return [
            "--slack-mode", "socket",
            "--slack-app-token", APP_TOKEN,
            "--slack-bot-token", BOT_TOKEN,
            "--slack-base-url", self.fake.api_url,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        del bridge_base_url  # the bridge connects out; nothing is posted to it

    def secrets(self) -> list[str]:
        return [APP_TOKEN, BOT_TOKEN, *self.fake.tickets]

    def new_chat(self) -> str:
        self._chat = f"C0CONF{next(self._ids):06d}"
        return self._chat

    def new_message_id(self) -> str:
        assert self._chat, "new_chat first: a Slack message id names its channel"
        return f"{self._chat}:1700002000.{next(self._ids):06d}"

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        file_id = f"F0CONF{next(self._ids):06d}"
        entry = self.fake.add_file(file_id, "photo.jpg", "image/jpeg", image)
        return await self._push_new(chat, message_id, text, [entry])

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        return await self._push_new(chat, message_id, text, None)

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        await self.fake.push(self._envelope(delivery))

    async def acked(self, delivery: Delivery) -> bool:
        envelope_id = self._envelope_id(delivery)
        return any(eid == envelope_id for _link, eid in self.fake.acks)

    def replies(self, chat: str) -> list[BotReply]:
        out: list[BotReply] = []
        for ts, call in self.fake.posts:
            if call.body.get("channel") != chat:
                continue
            thread = call.body.get("thread_ts")
            versions = [Version(call.at, _shown(call.body))]
            versions += [Version(u.at, _shown(u.body)) for u in self.fake.updates
                         if u.body.get("ts") == ts and u.body.get("channel") == chat]  # fmt: skip
            reply_to = f"{chat}:{thread}" if isinstance(thread, str) and thread else ""
            out.append(BotReply(ts, chat, reply_to, versions))
        return out

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        stated = math.ceil(retry_after_s)  # Retry-After states whole seconds
        fault = self.fake.fail_next(
            _METHODS[method], status=429, error="ratelimited", **{"Retry-After": str(stated)}
        )
        return Throttle(method, float(stated), lambda: fault.served_at)

    async def take_down(self) -> None:
        await self.fake.take_down()

    async def bring_up(self) -> None:
        self.fake.bring_up()

    async def _push_new(
        self, chat: str, message_id: str, text: str, files: list[dict[str, object]] | None
    ) -> Delivery:
        channel, _, ts = message_id.partition(":")
        assert channel == chat, (chat, message_id)
        event_id = f"Ev0CONF{next(self._ids):06d}"
        delivery = Delivery(chat, message_id, {"event_id": event_id, "ts": ts, "text": text,
                                               "files": files})  # fmt: skip
        await self.fake.push(self._envelope(delivery))
        return delivery

    def _envelope(self, delivery: Delivery) -> dict[str, object]:
        """The envelope of the latest delivery: a new envelope id, the same event id."""
        data = delivery.data
        files = data["files"]
        return message_envelope(
            self._envelope_id(delivery),
            event_id=str(data["event_id"]),
            channel=delivery.chat,
            ts=str(data["ts"]),
            text=str(data["text"]),
            files=files if isinstance(files, list) else None,
            retry_attempt=delivery.deliveries - 1,
        )

    @staticmethod
    def _envelope_id(delivery: Delivery) -> str:
        return f"env-{delivery.data['event_id']}-{delivery.deliveries}"


def _shown(body: dict[str, object]) -> str:
    """The answer text a Slack user reads in the reply (the placeholder reads as nothing)."""
    text = str(body.get("text", ""))
    return "" if text == _PLACEHOLDER else text

"""The one interface a platform implements to run the IM conformance suite against its fake.

A harness owns a fake platform on loopback (its API, and its gateway for long-connection modes),
tells the suite which ``bridge serve`` flags point at it, plays the platform's side of a
conversation (deliveries, re-deliveries, 429s, an outage) and reports what the bot did (replies
with their edit history, acks). Everything is in the platform's own wire format inside the
harness; the suite only sees the neutral types below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Method = Literal["reply", "edit"]
"""The platform-neutral names of the two calls the bot makes: post the answer, edit it."""

Streaming = Literal["edits", "placeholder"]
"""How a platform shows an answer being written: ``edits`` (the reply is edited as it grows), or
``placeholder`` where a sent message cannot be edited (a placeholder is posted first and the
final answer follows as a message of its own; the harness reports that follow-up as the reply's
next version, and an ``edit`` throttle as a throttle on it)."""


@dataclass(frozen=True, slots=True)
class EditRate:
    """The platform's rule for editing one message: at most ``max_edits`` per ``per_s`` seconds."""

    max_edits: int
    per_s: float


@dataclass(slots=True)
class Delivery:
    """A handle on one event the fake platform delivered (and may deliver again).

    Attributes:
        chat: the chat it was sent in.
        message_id: the platform's id of the user's message.
        data: whatever the harness needs to re-deliver and to check the ack (its own business).
        deliveries: how many times it was delivered so far.
    """

    chat: str
    message_id: str
    data: dict[str, object] = field(default_factory=dict)
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class Version:
    """One state of a bot message: when the platform received it and the answer text it shows.

    ``text`` is the answer as the user reads it, without the platform's decorations (a card's
    title, a "typing" cursor, a placeholder shown while nothing is written yet: those are "").
    """

    at: float
    text: str


@dataclass(slots=True)
class BotReply:
    """A message the bot posted in a chat, with every edit the platform accepted for it.

    Attributes:
        reply_id: the platform's id of the bot's message.
        chat: the chat it was posted in.
        reply_to: the id of the user message it replies to ("" if it is not a reply).
        versions: the posted content first, then each accepted edit in arrival order.
    """

    reply_id: str
    chat: str
    reply_to: str
    versions: list[Version]

    @property
    def posted_at(self) -> float:
        """When the platform accepted the post (loop time of the test process)."""
        return self.versions[0].at

    @property
    def edits(self) -> list[Version]:
        """The accepted edits, oldest first."""
        return self.versions[1:]

    @property
    def final_text(self) -> str:
        """What the message shows now."""
        return self.versions[-1].text


@dataclass(frozen=True, slots=True)
class Throttle:
    """A 429 the harness was told to answer, with the wait it states.

    Attributes:
        method: the call it answers.
        retry_after_s: the wait the 429 states.
        served: when the fake answered it (loop time), None until then.
    """

    method: Method
    retry_after_s: float
    served: Callable[[], float | None]

    @property
    def served_at(self) -> float | None:
        """When the 429 was answered, or None if it has not been yet."""
        return self.served()


class PlatformHarness(Protocol):
    """A fake platform the conformance suite drives; one instance per bridge under test.

    Times (``Version.at``, ``Throttle.served_at``) are the test process's event-loop time.
    Deliveries, replies and throttles are in the fake's memory, so the fake outlives bridge
    restarts; ``start``/``stop`` are called once per test module.
    """

    #: Test id of this harness (``"feishu-webhook"``); also names its log files.
    name: str
    #: The adapter's platform name (``InboundMessage.platform``): hub topics are
    #: ``chat:<platform>:<chat>``, inbox entries ``<platform>:<message id>``.
    platform: str
    #: True when the bridge connects out to the platform (long connection, socket mode, polling):
    #: then ``take_down``/``bring_up`` are used and the link's health is checked.
    long_connection: bool
    #: The platform's documented rate rule for editing one message (for ``placeholder``
    #: platforms: for the follow-ups of one reply).
    edit_rate: EditRate
    #: ``edits``, or ``placeholder`` where the platform cannot edit a sent message.
    streaming: Streaming

    async def start(self) -> None:
        """Start the fake platform on loopback ports."""
        ...

    async def stop(self) -> None:
        """Stop the fake platform."""
        ...

    def bridge_args(self) -> list[str]:
        """The ``bridge serve`` flags that switch the adapter on and point it at the fake."""
        ...

    def attach(self, bridge_base_url: str) -> None:
        """Tell the fake where the bridge now listens (webhooks are posted there); called after
        every (re)start of the bridge. Long-connection harnesses may ignore it."""
        ...

    def secrets(self) -> list[str]:
        """Every credential the bridge holds or was issued (app secrets, tokens): none of them
        may appear in the bridge's logs, ``/readyz`` or the dashboard API."""
        ...

    def new_chat(self) -> str:
        """A fresh chat id in the platform's format."""
        ...

    def new_message_id(self) -> str:
        """A fresh user message id in the platform's format."""
        ...

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        """A user sends ``image`` (with an optional caption ``text``); the fake serves its bytes
        when the bot downloads it. Returns once the platform sent the event (not necessarily
        acked: use ``acked``)."""
        ...

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        """A user sends a text-only message."""
        ...

    async def redeliver(self, delivery: Delivery) -> None:
        """The platform delivers the same event again, as it does when it doubts the ack."""
        ...

    async def acked(self, delivery: Delivery) -> bool:
        """Whether the bridge acknowledged the latest delivery of ``delivery`` (a 2xx answer to a
        webhook, an ack frame on a long connection)."""
        ...

    def replies(self, chat: str) -> list[BotReply]:
        """Every message the bot posted in ``chat``, oldest first."""
        ...

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        """Answer the next ``method`` call with the platform's 429, stating ``retry_after_s``
        (rounded up to what the platform can state; the returned throttle holds the stated
        wait)."""
        ...

    async def take_down(self) -> None:
        """Long connection only: drop the bot's link and refuse new ones (an outage)."""
        ...

    async def bring_up(self) -> None:
        """Long connection only: end the outage; the bot may connect again."""
        ...

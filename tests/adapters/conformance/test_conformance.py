"""What every IM adapter must do, checked against each platform's fake with a real bridge process.

Each test runs once per harness in ``platforms.HARNESSES``; the harness's bridge process is
shared by the module (tests use fresh chats and message ids), restarted or killed where a test
says so, and its logs are checked for secrets last.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.relay import BAD_IMAGE_REPLY, TEXT_ONLY_REPLY
from tests.adapters.conformance.harness import BotReply, EditRate, PlatformHarness
from tests.adapters.conformance.live import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    LiveBridge,
    Subscriber,
    acked,
    final_reply,
    poll,
)
from tests.conftest import IMAGES

pytestmark = pytest.mark.asyncio(loop_scope="module")

PHOTO = (IMAGES / "coffee.jpg").read_bytes()
# Text bytes, zero bytes (the download itself fails), a PNG claiming 1.6 gigapixels.
BAD_IMAGES = ["bad_not_an_image.jpg", "bad_empty.png", "bad_bomb_40000x40000.png"]
UNHEALTHY_STATES = ("connecting", "reconnecting", "failed")


def job_of(live: LiveBridge, message_id: str) -> str:
    """The relay's job id (= inbox entry, hub event id) for a message: ``<platform>:<id>``."""
    return f"{live.harness.platform}:{message_id}"


async def answered(live: LiveBridge, message_id: str) -> None:
    """Wait until the running process logged the end of the message's job."""
    job = job_of(live, message_id)

    async def probe() -> bool | None:
        return True if any(e.get("job") == job for e in live.log_events("relay_answered")) else None

    await poll(probe, f"relay_answered for {job}")


def duplicates_logged(live: LiveBridge, message_id: str) -> int:
    entry = job_of(live, message_id)
    return sum(1 for e in live.log_events("im_duplicate") if e.get("entry") == entry)


def assert_paced(reply: BotReply, rate: EditRate) -> None:
    """No window of ``rate.per_s`` seconds holds more than ``rate.max_edits`` edits."""
    times = [v.at for v in reply.edits]
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + rate.per_s)
        assert in_window <= rate.max_edits, f"{in_window} edits within {rate.per_s}s: {times}"


def assert_one_streamed_answer(
    replies: list[BotReply], chat: str, message_id: str, final: str, h: PlatformHarness
) -> BotReply:
    assert len(replies) == 1, replies
    reply = replies[0]
    assert reply.chat == chat and reply.reply_to == message_id
    assert_streamed(reply, h)
    assert reply.final_text == final
    for version in reply.versions:  # every state shown is the answer so far
        assert final.startswith(version.text), (version, final)
    return reply


def assert_streamed(reply: BotReply, h: PlatformHarness) -> None:
    """Streamed by paced edits; or, where a sent message cannot be edited, a placeholder then
    the whole answer in one follow-up (these answers are far below any platform's text limit)."""
    if h.streaming == "placeholder":
        assert reply.versions[0].text == "", reply
        assert len(reply.edits) == 1 and reply.final_text.strip(), reply
    else:
        assert len(reply.edits) >= 1, reply
    assert_paced(reply, h.edit_rate)


async def ask(
    live: LiveBridge, chat: str, message_id: str, image: bytes, text: str = ""
) -> tuple[Any, str]:
    """Deliver ``image`` while subscribed to the chat's topic: the delivery and the job's final
    answer as the ``/ws`` subscriber saw it (which must equal the streamed deltas)."""
    async with Subscriber(live, chat) as sub:
        delivery = await live.harness.deliver_image(chat, message_id, image, text)
        streamed, closing = await sub.final(job_of(live, message_id))
    assert closing["kind"] == "done", closing
    assert closing["text"] == streamed
    assert closing["text"].strip(), "the tiny model wrote nothing: nothing to compare"
    return delivery, str(closing["text"])


@pytest.mark.parametrize("words", ["", "What is in the cup?"], ids=["photo", "photo-and-question"])
async def test_an_image_is_answered_once_as_a_reply_streamed_by_paced_edits(
    live: LiveBridge, words: str
) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    delivery, text = await ask(live, chat, mid, PHOTO, words)
    assert await h.acked(delivery)
    await final_reply(h, chat, text)
    await answered(live, mid)
    assert_one_streamed_answer(h.replies(chat), chat, mid, text, h)


async def test_four_redeliveries_give_one_answer(live: LiveBridge) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    counted = await live.im_events()
    async with Subscriber(live, chat) as sub:
        delivery = await h.deliver_image(chat, mid, PHOTO)
        for _ in range(4):
            await h.redeliver(delivery)
            await acked(h, delivery)
        _streamed, closing = await sub.final(job_of(live, mid))
    await final_reply(h, chat, closing["text"])
    await answered(live, mid)
    assert_one_streamed_answer(h.replies(chat), chat, mid, closing["text"], h)
    assert duplicates_logged(live, mid) == 4
    now = await live.im_events()  # bridge_im_events_total{platform,outcome} counts them all
    assert now.get("accepted", 0) - counted.get("accepted", 0) == 1, (counted, now)
    assert now.get("duplicate", 0) - counted.get("duplicate", 0) == 4, (counted, now)


async def test_a_restart_between_deliveries_gives_one_answer(live: LiveBridge) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    delivery, text = await ask(live, chat, mid, PHOTO)
    before = await final_reply(h, chat, text)
    await answered(live, mid)
    await live.restart()  # SIGTERM, then a new process on the same sqlite store
    await h.redeliver(delivery)
    await acked(h, delivery)

    async def seen_as_duplicate() -> bool | None:
        return True if duplicates_logged(live, mid) == 1 else None

    await poll(seen_as_duplicate, "the re-delivery to be seen as a duplicate")
    assert h.replies(chat) == before


async def test_kill_9_right_after_the_ack_gives_exactly_one_answer_after_restart(
    live: LiveBridge,
) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    # The first reply call is throttled for 3 s, so the answer cannot be out before the kill.
    h.inject_429("reply", 3.0)
    delivery = await h.deliver_image(chat, mid, PHOTO)
    await acked(h, delivery)
    live.proc.kill9()
    assert h.replies(chat) == []
    await live.start()  # same store: the relay re-runs the pending job
    await answered(live, mid)
    replies = h.replies(chat)
    assert len(replies) == 1 and replies[0].reply_to == mid, replies
    assert_streamed(replies[0], h)
    await h.redeliver(delivery)  # the platform may still send it again: no second answer
    await acked(h, delivery)
    assert duplicates_logged(live, mid) == 1
    assert h.replies(chat) == replies


async def test_kill_9_after_the_reply_is_posted_finishes_that_same_reply(live: LiveBridge) -> None:
    """The re-run after a crash edits the reply the first run posted (``existing_reply_id``)
    instead of posting a second one, even on platforms without a reply idempotency key."""
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    throttle = h.inject_429("edit", 3.0)  # holds the answer between its post and its edits
    await h.deliver_image(chat, mid, PHOTO)

    async def posted_and_held() -> list[BotReply] | None:
        replies = h.replies(chat)
        return replies if replies and throttle.served_at is not None else None

    posted = await poll(posted_and_held, "the reply to be posted and its first edit throttled")
    live.proc.kill9()
    assert len(posted) == 1 and not posted[0].edits, posted
    await live.start()
    await answered(live, mid)
    replies = h.replies(chat)
    assert [r.reply_id for r in replies] == [posted[0].reply_id], replies
    assert_streamed(replies[0], h)


async def test_a_text_only_message_gets_the_short_help_reply(live: LiveBridge) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    delivery = await h.deliver_text(chat, mid, "hello, what can you do?")
    replies = await final_reply(h, chat, TEXT_ONLY_REPLY)
    assert await h.acked(delivery)
    assert len(replies) == 1 and replies[0].reply_to == mid, replies
    assert len(TEXT_ONLY_REPLY) < 200


@pytest.mark.parametrize("bad", BAD_IMAGES)
async def test_bytes_that_are_not_an_image_get_a_short_apology(live: LiveBridge, bad: str) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    async with Subscriber(live, chat) as sub:
        await h.deliver_image(chat, mid, (IMAGES / bad).read_bytes())
        _streamed, closing = await sub.final(job_of(live, mid))
    assert closing["kind"] == "error" and closing["code"] == "bad_image", closing
    replies = await final_reply(h, chat, BAD_IMAGE_REPLY)
    assert len(replies) == 1 and replies[0].reply_to == mid, replies
    assert len(BAD_IMAGE_REPLY) < 200


async def test_a_429_on_the_reply_is_retried_after_the_stated_wait_and_posted_once(
    live: LiveBridge,
) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    throttle = h.inject_429("reply", 2.0)
    _delivery, text = await ask(live, chat, mid, PHOTO)
    replies = await final_reply(h, chat, text)
    served = throttle.served_at
    assert served is not None, "the bridge never made the throttled call"
    reply = assert_one_streamed_answer(replies, chat, mid, text, h)
    waited = reply.posted_at - served
    assert waited >= throttle.retry_after_s - 0.01, f"retried after {waited:.3f}s"


async def test_a_429_on_an_edit_holds_every_later_edit_for_the_stated_wait(
    live: LiveBridge,
) -> None:
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()
    throttle = h.inject_429("edit", 1.0)
    _delivery, text = await ask(live, chat, mid, PHOTO)
    replies = await final_reply(h, chat, text)
    served = throttle.served_at
    assert served is not None, "the bridge never made the throttled call"
    reply = assert_one_streamed_answer(replies, chat, mid, text, h)
    early = [v.at - served for v in reply.edits if v.at - served < throttle.retry_after_s - 0.01]
    assert not early, f"edits {early} s after a 429 that asked for {throttle.retry_after_s} s"


async def test_the_link_status_is_honest_in_readyz_and_the_dashboard(live: LiveBridge) -> None:
    h = live.harness
    up = "connected" if h.long_connection else "listening"
    chat = h.new_chat()
    await h.deliver_text(chat, h.new_message_id(), "hi")  # an event for the status to count
    await final_reply(h, chat, TEXT_ONLY_REPLY)
    status = await live.link_status()
    assert status["healthy"] is True and status["state"] == up, status
    assert status["platform"] == h.platform
    assert status["events"]["accepted"] >= 1 and status["last_event_at"] is not None, status
    assert await dashboard_status(live) == (True, up)
    code, _body = await live.get_json("/api/status")
    assert code == 401  # the dashboard API needs the admin token
    if not h.long_connection:
        return
    await h.take_down()
    down = await live.wait_link(healthy=False)
    assert down["state"] in UNHEALTHY_STATES, down
    healthy, state = await dashboard_status(live)
    assert not healthy and state in UNHEALTHY_STATES
    chat, mid = h.new_chat(), h.new_message_id()  # sent during the outage: the platform keeps it
    delivery = await h.deliver_text(chat, mid, "are you back?")
    await h.bring_up()
    back = await live.wait_link(healthy=True)
    assert back["state"] == up
    replies = await final_reply(h, chat, TEXT_ONLY_REPLY)
    await acked(h, delivery)
    assert len(replies) == 1 and replies[0].reply_to == mid, replies


async def dashboard_status(live: LiveBridge) -> tuple[bool, str]:
    code, body = await live.get_json("/api/status", admin=True)
    assert code == 200, body
    mine = [a for a in body["adapters"] if a["platform"] == live.harness.platform]
    assert len(mine) == 1, body["adapters"]
    return bool(mine[0]["healthy"]), str(mine[0]["state"])


async def test_secrets_never_reach_the_logs_readyz_or_the_dashboard(live: LiveBridge) -> None:
    """Runs last in the module: the logs hold every earlier test's traffic and faults too."""
    h = live.harness
    chat, mid = h.new_chat(), h.new_message_id()  # traffic of its own, should it run alone
    delivery = await h.deliver_image(chat, mid, PHOTO)
    await acked(h, delivery)
    await h.redeliver(delivery)
    await acked(h, delivery)
    await answered(live, mid)
    logs = live.logs()
    assert "relay_answered" in logs and "im_duplicate" in logs  # the logs saw real traffic
    _code, ready = await live.get_json("/readyz")
    _code, dash = await live.get_json("/api/status", admin=True)
    shown = json.dumps(ready) + json.dumps(dash)
    secrets = [*h.secrets(), CLIENT_TOKEN, ADMIN_TOKEN]
    assert len(secrets) >= 3
    for secret in secrets:
        assert secret not in logs, f"a secret ({secret[:4]}…) is in the bridge's log"
        assert secret not in shown, f"a secret ({secret[:4]}…) is in /readyz or /api/status"

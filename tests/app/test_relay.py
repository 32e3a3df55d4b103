"""The relay: at-least-once IM deliveries become exactly one answer, also across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapters.base import (
    AdapterError,
    AdapterStatus,
    ImageFetchError,
    ImageRef,
    InboundMessage,
    MessageSink,
)
from bridge.relay import BAD_IMAGE_REPLY, REPLY_KEY_TTL_S, TEXT_ONLY_REPLY, Relay
from bridge.store import Store, StoreUnavailable
from bridge.store.base import INBOX_DONE_RETENTION_S
from bridge.store.memory import MemoryStore
from bridge.store.sqlite import SqliteStore
from engine.types import BusyError, EngineStatus, Failed, JobEvent, JobRequest
from tests.app.fakes import FakeEngine, FakeHandle


@dataclass
class Reply:
    message_id: str
    updates: list[str] = field(default_factory=list)
    final: str | None = None
    failed: str | None = None


class FakeStream:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    @property
    def reply_message_id(self) -> str:
        return "r-" + self.reply.message_id

    async def update(self, text_so_far: str) -> None:
        self.reply.updates.append(text_so_far)

    async def finish(self, final_text: str) -> None:
        self.reply.final = final_text

    async def fail(self, apology: str) -> None:
        self.reply.failed = apology


class FakeAdapter:
    """Records replies keyed by message id, as Feishu's uuid idempotency would collapse them.

    ``posts`` counts reply POSTs: each would be a second card once Feishu forgot the uuid (after
    an hour), so a re-run must resume the recorded card instead (``opened`` lists the ids passed).
    """

    platform = "feishu"

    def __init__(self, image: bytes = b"\x89PNG fake") -> None:
        self.image = image
        self.replies: dict[str, Reply] = {}
        self.posts = 0
        self.opened: list[str | None] = []
        self.texts: list[tuple[str, str]] = []
        self.downloads = 0
        self.fetch_error: str | None = None

    async def start(self, sink: MessageSink) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        self.downloads += 1
        if self.fetch_error:
            raise ImageFetchError(self.fetch_error)
        return self.image

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> FakeStream:
        self.opened.append(existing_reply_id)
        if existing_reply_id is None:
            self.posts += 1
        else:
            assert existing_reply_id == "r-" + msg.message_id
        reply = self.replies.setdefault(msg.message_id, Reply(msg.message_id))
        return FakeStream(reply)

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        self.texts.append((msg.message_id, text))

    def status(self) -> AdapterStatus:
        return AdapterStatus("feishu", "webhook", "listening", True, 0.0)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, JobEvent]] = []

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        self.events.append((topic, job_id, event))


def message(
    mid: str = "om_1", eid: str = "ev_1", images: int = 1, text: str = ""
) -> InboundMessage:
    return InboundMessage(
        platform="feishu",
        chat_id="oc_chat",
        message_id=mid,
        event_id=eid,
        sender_id="ou_user",
        text=text,
        images=tuple(ImageRef(f"img_{i}") for i in range(images)),
        message_type="image" if images else "text",
        received_at=1.0,
    )


async def ready_engine() -> FakeEngine:
    engine = FakeEngine("a cat on a sofa")
    engine.loaded.set()
    await engine.start()
    return engine


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def settle(relay: Relay) -> None:
    for _ in range(500):
        if not relay._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("relay did not settle")


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        MemoryStore() if request.param == "memory" else SqliteStore(f"sqlite:///{tmp_path}/b.db")
    )
    await s.open()
    yield s
    await s.close()


async def test_four_deliveries_give_one_answer_streamed_to_chat_and_hub(store: Store) -> None:
    engine, adapter, hub = await ready_engine(), FakeAdapter(), Recorder()
    relay = Relay(store, engine, hub, [adapter])
    results = [await relay.accept(message(eid=f"ev_{i}")) for i in range(4)]
    await settle(relay)
    assert results == [True, False, False, False]
    assert len(engine.submitted) == 1 and adapter.downloads == 1 and adapter.posts == 1
    reply = adapter.replies["om_1"]
    assert reply.final == "a cat on a sofa"
    assert reply.updates[-1] == "a cat on a sofa"
    assert {topic for topic, _, _ in hub.events} == {"chat:feishu:oc_chat"}
    assert [e.kind for _, _, e in hub.events][-1] == "done"
    assert await store.inbox_pending() == []


async def test_same_event_id_on_another_message_id_is_a_duplicate(store: Store) -> None:
    engine, adapter = await ready_engine(), FakeAdapter()
    relay = Relay(store, engine, Recorder(), [adapter])
    assert await relay.accept(message("om_1", "ev_same")) is True
    assert await relay.accept(message("om_2", "ev_same")) is False
    await settle(relay)
    assert len(engine.submitted) == 1


async def test_restart_between_deliveries_still_one_answer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bridge.db"
    adapter = FakeAdapter()
    first = SqliteStore(url)
    await first.open()
    relay = Relay(first, await ready_engine(), Recorder(), [adapter])
    assert await relay.accept(message()) is True
    await settle(relay)
    await relay.stop(1.0)
    await first.close()

    second = SqliteStore(url)
    await second.open()
    engine2 = await ready_engine()
    relay2 = Relay(second, engine2, Recorder(), [adapter])
    await relay2.start()
    assert await relay2.accept(message()) is False
    await settle(relay2)
    await relay2.stop(1.0)
    await second.close()
    assert adapter.posts == 1 and engine2.submitted == []


class StuckEngine(FakeEngine):
    """Accepts jobs and never answers: the process 'dies' mid-job."""

    def __init__(self) -> None:
        super().__init__()
        self.streaming = asyncio.Event()  # set once the relay waits for the answer (card open)

    def submit(self, request: JobRequest) -> FakeHandle:
        self.submitted.append(request)
        handle = FakeHandle(request, self.answer)

        async def never() -> AsyncIterator[JobEvent]:
            self.streaming.set()
            await asyncio.Event().wait()
            yield  # type: ignore[misc]

        handle.events = never  # type: ignore[method-assign]
        return handle


async def test_accepted_but_unanswered_job_is_rerun_after_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bridge.db"
    adapter = FakeAdapter()
    first = SqliteStore(url)
    await first.open()
    stuck = StuckEngine()
    stuck.loaded.set()
    relay = Relay(first, stuck, Recorder(), [adapter])
    assert await relay.accept(message()) is True
    for _ in range(200):
        if stuck.submitted:
            break
        await asyncio.sleep(0.01)
    await relay.stop(0.1)  # the answer never came: the entry stays pending
    await first.close()

    second = SqliteStore(url)
    await second.open()
    relay2 = Relay(second, await ready_engine(), Recorder(), [adapter])
    await relay2.start()
    for _ in range(500):
        if adapter.replies["om_1"].final:
            break
        await asyncio.sleep(0.01)
    await settle(relay2)
    assert adapter.replies["om_1"].final == "a cat on a sofa"
    assert await relay2.accept(message()) is False
    assert await second.inbox_pending() == []
    await relay2.stop(1.0)
    await second.close()


async def crash_with_the_card_open(store: Store, adapter: FakeAdapter) -> None:
    """A first process posts the card, then dies before the answer: the entry stays pending."""
    stuck = StuckEngine()
    stuck.loaded.set()
    relay = Relay(store, stuck, Recorder(), [adapter])
    assert await relay.accept(message()) is True
    async with asyncio.timeout(5):
        await stuck.streaming.wait()
    await relay.stop(0.1)
    pending = [entry.entry_id for entry in await store.inbox_pending()]
    assert adapter.posts == 1 and pending == ["feishu:om_1"]


async def test_rerun_after_a_crash_mid_answer_finishes_the_same_card(store: Store) -> None:
    adapter = FakeAdapter()
    await crash_with_the_card_open(store, adapter)
    relay2 = Relay(store, await ready_engine(), Recorder(), [adapter])  # a new process
    await relay2.start()
    await until(lambda: _no_pending(store))
    await relay2.stop(1.0)
    assert adapter.posts == 1  # no second card, even after Feishu forgot the uuid
    assert adapter.opened == [None, "r-om_1"]  # the re-run resumed the recorded card
    assert adapter.replies["om_1"].final == "a cat on a sofa"
    assert REPLY_KEY_TTL_S > INBOX_DONE_RETENTION_S


async def test_bad_image_on_rerun_goes_into_the_card_already_posted(store: Store) -> None:
    adapter = FakeAdapter()
    await crash_with_the_card_open(store, adapter)
    adapter.fetch_error = "image expired"
    relay2 = Relay(store, await ready_engine(), Recorder(), [adapter])
    await relay2.start()
    await until(lambda: _no_pending(store))
    await relay2.stop(1.0)
    assert adapter.posts == 1 and adapter.opened == [None, "r-om_1"]
    assert adapter.replies["om_1"].failed == BAD_IMAGE_REPLY
    assert adapter.texts == []


@pytest.mark.parametrize("case", ["text_only", "bad_image"])
async def test_text_reply_is_sent_once_when_rerun_after_a_crash(
    store: Store, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = FakeAdapter()
    if case == "bad_image":
        adapter.fetch_error = "image too large"
    sent = asyncio.Event()

    async def die_before_completing(entry_id: str) -> None:
        sent.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(store, "inbox_complete", die_before_completing)
    relay = Relay(store, await ready_engine(), Recorder(), [adapter])
    await relay.accept(message(images=0 if case == "text_only" else 1, text="hello"))
    async with asyncio.timeout(5):
        await sent.wait()  # the text is out; the process dies before completing the entry
    await relay.stop(0.1)
    monkeypatch.undo()
    assert len(await store.inbox_pending()) == 1

    relay2 = Relay(store, await ready_engine(), Recorder(), [adapter])
    await relay2.start()
    await until(lambda: _no_pending(store))
    await relay2.stop(1.0)
    text = TEXT_ONLY_REPLY if case == "text_only" else BAD_IMAGE_REPLY
    assert adapter.texts == [("om_1", text)]


class HandleKeepingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.handles: list[FakeHandle] = []

    def submit(self, request: JobRequest) -> FakeHandle:
        self.handles.append(super().submit(request))
        return self.handles[-1]


async def test_card_id_not_recorded_is_retried_and_the_answer_still_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, engine, adapter = MemoryStore(), HandleKeepingEngine(), FakeAdapter()
    engine.loaded.set()
    await engine.start()
    real_set_value = store.set_value
    failures = [StoreUnavailable("blip")]

    async def flaky_set_value(key: str, value: str, ttl_s: float | None = None) -> None:
        if key.startswith("reply:") and failures:
            raise failures.pop()
        await real_set_value(key, value, ttl_s)

    monkeypatch.setattr(store, "set_value", flaky_set_value)
    relay = Relay(store, engine, Recorder(), [adapter])
    await relay.accept(message())
    await until(lambda: _no_pending(store))
    await relay.stop(1.0)
    # The retry posted again with the same uuid: Feishu answers with the same card (within
    # its hour), so the one reply gets the answer and its id is recorded this time.
    assert adapter.posts == 2 and list(adapter.replies) == ["om_1"]
    assert adapter.replies["om_1"].final == "a cat on a sofa"
    assert await store.get_value("reply:feishu:om_1") == "r-om_1"
    assert [h.cancelled for h in engine.handles] == [True, False]  # the abandoned job stopped
    assert adapter.downloads == 1  # the retry reused the image the first attempt downloaded


class FlakyCardAdapter(FakeAdapter):
    """The first ``failures`` card updates fail like a dropped connection to the platform."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> FakeStream:
        stream = await super().open_reply(msg, existing_reply_id)
        adapter = self

        class Flaky(FakeStream):
            async def update(self, text_so_far: str) -> None:
                if adapter.failures:
                    adapter.failures -= 1
                    raise AdapterError("update: connection reset")
                await super().update(text_so_far)

        return Flaky(stream.reply)


async def test_retries_of_a_job_download_its_image_once(store: Store) -> None:
    engine, adapter = await ready_engine(), FlakyCardAdapter(failures=2)
    relay = Relay(store, engine, Recorder(), [adapter])
    await relay.accept(message())
    await until(lambda: _no_pending(store))
    await relay.stop(1.0)
    assert len(engine.submitted) == 3  # two failed attempts, then the answer
    assert adapter.downloads == 1
    assert {r.image for r in engine.submitted} == {adapter.image}
    assert adapter.replies["om_1"].final == "a cat on a sofa"


async def test_a_failed_download_is_not_kept_for_the_retry(store: Store) -> None:
    engine, adapter = await ready_engine(), FakeAdapter()
    real = adapter.fetch_image
    calls: list[int] = []

    async def flaky(msg: InboundMessage, ref: ImageRef) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection reset")
        return await real(msg, ref)

    adapter.fetch_image = flaky  # type: ignore[method-assign]
    relay = Relay(store, engine, Recorder(), [adapter])
    await relay.accept(message())
    await until(lambda: _no_pending(store))
    await relay.stop(1.0)
    assert len(calls) == 2 and adapter.replies["om_1"].final == "a cat on a sofa"


async def _no_pending(store: Store) -> bool:
    return await store.inbox_pending() == []


async def test_text_only_gets_a_helpful_reply_and_bad_image_an_apology(store: Store) -> None:
    engine, adapter, hub = await ready_engine(), FakeAdapter(), Recorder()
    relay = Relay(store, engine, hub, [adapter])
    await relay.accept(message("om_t", "ev_t", images=0, text="hello"))
    adapter.fetch_error = "image too large"
    await relay.accept(message("om_b", "ev_b"))
    await settle(relay)
    assert ("om_t", TEXT_ONLY_REPLY) in adapter.texts
    assert ("om_b", BAD_IMAGE_REPLY) in adapter.texts
    assert engine.submitted == []
    assert [e.kind for _, j, e in hub.events if j == "feishu:om_b"] == ["error"]


class BusyOnceEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__("ok")
        self.refusals = 0

    def submit(self, request: JobRequest) -> FakeHandle:
        if self.refusals == 0:
            self.refusals += 1
            raise BusyError(retry_after=0.01)
        return super().submit(request)

    def status(self) -> EngineStatus:
        return super().status()


async def test_busy_engine_is_retried_not_lost(store: Store) -> None:
    engine, adapter = BusyOnceEngine(), FakeAdapter()
    engine.loaded.set()
    await engine.start()
    relay = Relay(store, engine, Recorder(), [adapter])
    await relay.accept(message())
    await settle(relay)
    assert engine.refusals == 1 and adapter.replies["om_1"].final == "ok"


async def test_intake_failure_raises_so_the_platform_redelivers() -> None:
    store = MemoryStore()
    store.available = False
    relay = Relay(store, await ready_engine(), Recorder(), [FakeAdapter()])
    from bridge.store import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        await relay.accept(message())
    store.available = True
    assert await relay.accept(message()) is True
    await settle(relay)


class BadImageEngine(FakeEngine):
    """Refuses every image the way the real engine does: one Failed(bad_image) event."""

    def submit(self, request: JobRequest) -> FakeHandle:
        handle = super().submit(request)

        async def refused() -> AsyncIterator[JobEvent]:
            yield Failed("bad_image", "not an image")

        handle.events = refused  # type: ignore[method-assign]
        return handle


async def test_an_image_the_engine_refuses_gets_an_apology_in_the_card(store: Store) -> None:
    engine, adapter, hub = BadImageEngine(), FakeAdapter(), Recorder()
    engine.loaded.set()
    await engine.start()
    relay = Relay(store, engine, hub, [adapter])
    await relay.accept(message())
    await settle(relay)
    assert adapter.replies["om_1"].failed == BAD_IMAGE_REPLY
    assert adapter.replies["om_1"].final is None
    assert [e.kind for _, _, e in hub.events] == ["error"]
    assert await store.inbox_pending() == []

"""Events of a job whose session moved travel on the cluster's event log, not the bus: they
survive a bus that drops messages, a lost release answer, and a reader that lags behind."""

from __future__ import annotations

from typing import Any

from bridge.cluster.bus import LocalBus
from bridge.hub.handoff import Answer
from bridge.hub.unheld import UnheldEvents
from tests.hub.conftest import Running, StartHub, recv
from tests.hub.test_handoff import check_stream, resume_on, take, two_nodes
from tests.hub.test_ws import submit


class DroppingBus(LocalBus):
    """A bus whose messages can be lost: all of them, or those containing ``drop_marker``."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_all = False
        self.drop_marker: bytes | None = None
        self.dropped = 0

    async def publish(self, topic: str, payload: bytes) -> None:
        if self.drop_all or (self.drop_marker is not None and self.drop_marker in payload):
            self.dropped += 1
            return
        await super().publish(topic, payload)


async def dropping_nodes(
    start_hub: StartHub, **overrides: Any
) -> tuple[Running, Running, DroppingBus]:
    bus = DroppingBus()
    a, b, _, _ = await two_nodes(start_hub, bus=bus, **overrides)
    return a, b, bus


async def running_on(a: Running, count: int) -> tuple[str, list[dict[str, Any]]]:
    """A session on ``a`` runs job ``long``; ``count`` events in, its client goes away."""
    ws, welcome = await a.hello()
    await ws.send(submit("long"))
    got: list[dict[str, Any]] = []
    await take(ws, got, count)
    await ws.close()
    return welcome["session"], got


async def test_a_moved_sessions_events_arrive_once_while_the_bus_drops_everything(
    start_hub: StartHub,
) -> None:
    a, b, bus = await dropping_nodes(start_hub)
    sid, got = await running_on(a, 40)
    ws_b = await resume_on(b, sid, got[-1]["seq"])
    bus.drop_all = True  # from here on, the bus delivers nothing at all
    await take(ws_b, got, 10_000)
    check_stream(got, 300)  # every event of the job still running on A, once, in order
    assert a.hub._live.is_live(sid, "long") is False


async def test_a_lost_release_answer_still_gives_every_event_once(start_hub: StartHub) -> None:
    a, b, bus = await dropping_nodes(start_hub, handoff_timeout_s=0.3)
    bus.drop_marker = b'"t":"released"'  # A releases, but B never hears it: B waits, then loads
    sid, got = await running_on(a, 40)
    await a.hub.flush()
    ws_b, welcome_b = await b.hello(session=sid, last_seq=got[-1]["seq"])
    assert welcome_b["resumed"] is True and bus.dropped == 1
    await take(ws_b, got, 10_000)
    check_stream(got, 300)


async def test_a_cancel_sent_while_the_bus_drops_everything_still_stops_the_job(
    start_hub: StartHub,
) -> None:
    a, b, bus = await dropping_nodes(start_hub)
    sid, got = await running_on(a, 5)
    ws_b = await resume_on(b, sid, got[-1]["seq"])
    bus.drop_all = True
    await ws_b.send('{"type":"cancel","id":"long"}')
    await take(ws_b, got, 10_000)
    assert got[-1]["kind"] == "error" and got[-1]["code"] == "cancelled"
    assert [f["seq"] for f in got] == list(range(1, len(got) + 1))


async def test_a_lagging_reader_never_applies_what_the_old_holder_already_applied(
    start_hub: StartHub,
) -> None:
    a, _b, _bus = await dropping_nodes(start_hub)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.close()
    session = a.hub._registry.sessions[sid]
    moves = a.hub._moves
    assert moves is not None
    # As if A adopted the session from a holder that had read (and applied) up to entry 7-0.
    moves.adopted(sid, session, Answer("released", sid, "B", "r", session.last_seq, (), "7-0"))
    before = session.last_seq
    moves.logged_event("6-0", sid, '"id":"x","kind":"started"}')  # read late: already applied
    moves.logged_event("7-0", sid, '"id":"x","kind":"started"}')
    assert session.last_seq == before
    moves.logged_event("8-0", sid, '"id":"x","kind":"started"}')
    moves.logged_event("8-0", sid, '"id":"x","kind":"started"}')  # the same entry again
    assert session.last_seq == before + 1
    ws_again, _ = await a.hello(session=sid, last_seq=before)
    frame = await recv(ws_again, "event")
    assert (frame["seq"], frame["kind"]) == (before + 1, "started")


async def test_events_read_before_a_claim_adopts_the_session_are_applied_after_the_cursor(
    start_hub: StartHub,
) -> None:
    a, _b, _bus = await dropping_nodes(start_hub)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.close()
    moves = a.hub._moves
    assert moves is not None
    session = a.hub._registry.sessions.pop(sid)  # as if A did not hold it yet
    for entry in ("3-0", "4-0", "5-0"):
        moves.logged_event(entry, sid, '"id":"x","kind":"delta","text":"' + entry + '"}')
    moves.logged_event("5-1", "another-session", '"id":"y","kind":"started"}')
    assert len(moves.unheld) == 4
    a.hub._registry.sessions[sid] = session
    before = session.last_seq
    moves.adopted(sid, session, Answer("released", sid, "B", "r", before, (), "3-0"))
    assert session.last_seq == before + 2  # 4-0 and 5-0; 3-0 was the old holder's
    assert len(moves.unheld) == 1  # the other session's entry stays


def test_unheld_events_are_kept_in_order_for_a_while_and_bounded() -> None:
    now = [100.0]
    kept = UnheldEvents(keep_s=10.0, clock=lambda: now[0], max_kept=3)
    kept.add("1-0", "s", "a}")
    now[0] = 105.0
    kept.add("2-0", "s", "b}")
    kept.add("2-1", "t", "c}")
    kept.add("3-0", "s", "d}")  # the fourth: the oldest goes
    assert len(kept) == 3
    now[0] = 114.0
    kept.trim()
    assert len(kept) == 3  # all read at 105, within 10 s
    assert [u.tail for u in kept.take("s", None, since=105.0)] == ["b}", "d}"]
    assert [u.tail for u in kept.take("t", (2, 0), None)] == ["c}"]
    assert len(kept) == 0
    kept.add("9-0", "s", "e}")
    now[0] = 200.0
    kept.trim()
    assert len(kept) == 0


async def test_a_claim_whose_hello_never_finished_is_forgotten_by_the_sweep(
    start_hub: StartHub,
) -> None:
    a, _b, _bus = await dropping_nodes(start_hub)
    moves = a.hub._moves
    assert moves is not None
    moves._claims["s_gone"] = -1e9  # a claim begun long ago whose client went away
    moves.logged_event("1-0", "s_gone", '"id":"x","kind":"started"}')
    assert len(moves.unheld) == 1  # while claimed, its events are kept for the adoption
    moves.sweep()
    assert "s_gone" not in moves._claims

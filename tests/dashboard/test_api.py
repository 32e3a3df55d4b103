"""The admin API: paging, sorting and filtering, kick, status, model swap, SSE, assets, errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientResponse

from engine.types import EngineError
from tests.dashboard.conftest import BEARER, Env

DOCUMENTED_FIELDS = {
    "id",
    "session",
    "remote",
    "connected_at",
    "last_pong_at",
    "rtt_ms",
    "topics",
    "sent",
    "received",
}


def _fill(env: Env, n: int) -> None:
    for i in range(n):
        env.source.add(
            f"c{i:04d}",
            remote=f"10.0.{i // 256}.{i % 256}:4000",
            connected_at=env.clock.now - 1000 + i,
            rtt_ms=float((i * 37) % 1000) if i % 10 else None,
            topics=["ops"] if i % 7 == 0 else [f"chat:feishu:oc_{i}"],
            state="closing" if i % 50 == 0 else "open",
            sent=i,
            received=2 * i,
        )


async def _get(env: Env, query: str) -> dict[str, Any]:
    resp = await env.client.get(f"/api/connections?{query}", headers=BEARER)
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_connections_shape_and_default_order(env: Env) -> None:
    _fill(env, 3)
    body = await _get(env, "")
    assert body["total"] == 3 and body["offset"] == 0 and body["limit"] is None
    assert [c["id"] for c in body["connections"]] == ["c0002", "c0001", "c0000"]
    assert set(body["connections"][0]) >= DOCUMENTED_FIELDS
    assert body["counts"]["all"] == 3 and body["counts"]["states"] == {"open": 2, "closing": 1}


async def test_without_limit_every_connection_is_listed_as_the_spec_shows(env: Env) -> None:
    """A client written to docs/dashboard.md (no paging parameters) sees the whole list."""
    _fill(env, 1_200)
    body = await _get(env, "")
    assert body["total"] == 1_200 and len(body["connections"]) == 1_200
    assert len({c["id"] for c in body["connections"]}) == 1_200
    page = await _get(env, "limit=50")  # the dashboard asks for pages
    assert len(page["connections"]) == 50 and page["limit"] == 50


async def test_paging_over_ten_thousand_connections(env: Env) -> None:
    _fill(env, 10_000)
    body = await _get(env, "sort=id&offset=9990&limit=25")
    assert body["total"] == 10_000
    assert [c["id"] for c in body["connections"]] == [f"c{i:04d}" for i in range(9990, 10_000)]
    first = await _get(env, "sort=id&limit=500")
    assert len(first["connections"]) == 500
    assert first["counts"]["all"] == 10_000
    assert first["counts"]["slow"] == sum(
        1 for i in range(10_000) if i % 10 and (i * 37) % 1000 >= 500
    )
    assert len(json.dumps(first)) < 250_000  # one page, never the whole table


async def test_sort_by_rtt_puts_missing_values_last(env: Env) -> None:
    _fill(env, 30)
    asc = (await _get(env, "sort=rtt_ms&limit=500"))["connections"]
    desc = (await _get(env, "sort=-rtt_ms&limit=500"))["connections"]
    also_desc = (await _get(env, "sort=rtt_ms&order=desc&limit=500"))["connections"]
    values = [c["rtt_ms"] for c in asc if c["rtt_ms"] is not None]
    assert values == sorted(values)
    assert [c["rtt_ms"] for c in desc if c["rtt_ms"] is not None] == sorted(values, reverse=True)
    assert desc == also_desc
    assert all(c["rtt_ms"] is None for c in asc[-3:])
    assert all(c["rtt_ms"] is None for c in desc[-3:])


async def test_search_and_state_filter(env: Env) -> None:
    _fill(env, 200)
    by_topic = await _get(env, "q=OPS")
    assert by_topic["total"] == len([i for i in range(200) if i % 7 == 0])
    by_remote = await _get(env, "q=10.0.0.17:")
    assert [c["id"] for c in by_remote["connections"]] == ["c0017"]
    closing = await _get(env, "state=closing")
    assert closing["total"] == 4 and {c["state"] for c in closing["connections"]} == {"closing"}
    assert closing["counts"]["all"] == 200  # aggregates stay over everything
    none = await _get(env, "q=%3Cscript%3E")
    assert none["total"] == 0 and none["connections"] == []


async def test_bad_query_parameters_are_400(env: Env) -> None:
    for query in (
        "limit=0",
        "limit=501",
        "limit=abc",
        "offset=-1",
        "offset=1e3",
        "sort=password",
        "order=sideways",
        "q=" + "x" * 201,
        "q=%00",
        "state=%3Cb%3E",
    ):
        resp = await env.client.get(f"/api/connections?{query}", headers=BEARER)
        assert resp.status == 400, query
        error = (await resp.json())["error"]
        assert error["code"] == "bad_request" and "query parameter" in error["message"]


async def test_kick_unknown_and_malformed_ids(env: Env) -> None:
    env.source.add("c1")
    missing = await env.client.delete("/api/connections/nope", headers=BEARER)
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    too_long = await env.client.delete("/api/connections/" + "x" * 200, headers=BEARER)
    assert too_long.status == 400
    assert env.source.kicked == [] and "c1" in env.source.rows
    wrong_method = await env.client.put("/api/connections/c1", headers=BEARER)
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"


async def test_status_panels(env: Env) -> None:
    _fill(env, 5)
    env.source.adapters = [{"name": "feishu", "mode": "longconn", "state": "connected"}]
    env.source.errors = [{"ts": env.clock.now, "source": "hub", "code": "x", "message": "m"}]
    env.source.samples = [{"ts": 1.0, "connections": 5, "events_per_s": 2.0, "p95_ms": 30.0}]
    resp = await env.client.get("/api/status", headers=BEARER)
    body = await resp.json()
    assert body["now"] == env.clock.now
    assert body["counts"]["all"] == 5
    assert body["engine"]["model"] == "tiny"
    assert body["adapters"][0]["state"] == "connected"
    assert body["errors"][0]["code"] == "x"
    assert body["timeline"][0]["connections"] == 5


async def test_source_failure_is_a_json_500(env: Env) -> None:
    env.source.fail_connections = True
    resp = await env.client.get("/api/connections", headers=BEARER)
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["code"] == "internal" and "exploded" not in body["error"]["message"]


async def _swap(env: Env, body: Any, **kwargs: Any) -> ClientResponse:
    return await env.client.post("/api/admin/model", json=body, headers=BEARER, **kwargs)


async def test_model_swap(env: Env) -> None:
    resp = await _swap(env, {"model": "  org/other-model "})
    assert resp.status == 200
    assert await resp.json() == {"model": "org/other-model", "previous": "tiny"}
    assert env.source.swapped == ["org/other-model"]


async def test_model_swap_bad_input(env: Env) -> None:
    for body in ({}, {"model": ""}, {"model": 7}, {"model": "a\nb"}, [1], {"model": "x" * 513}):
        resp = await _swap(env, body)
        assert resp.status == 400, body
    text = await env.client.post(
        "/api/admin/model", data="model=x", headers={**BEARER, "Content-Type": "text/plain"}
    )
    assert text.status == 415
    broken = await env.client.post(
        "/api/admin/model",
        data=b"{not json",
        headers={**BEARER, "Content-Type": "application/json"},
    )
    assert broken.status == 400
    huge = await env.client.post(
        "/api/admin/model",
        data=json.dumps({"model": "x" * 10_000}),
        headers={**BEARER, "Content-Type": "application/json"},
    )
    assert huge.status == 413
    assert env.source.swapped == []


async def test_model_swap_engine_refusals(env: Env) -> None:
    busy = await _swap(env, {"model": "refuse-me"})
    assert busy.status == 409 and (await busy.json())["error"]["code"] == "busy"
    env.source.swap_error = ValueError("no such model folder")
    unknown = await _swap(env, {"model": "missing"})
    assert unknown.status == 400
    assert (await unknown.json())["error"]["message"] == "no such model folder"
    env.source.swap_error = EngineError("internal", "load failed")
    failed = await _swap(env, {"model": "broken"})
    assert failed.status == 409


async def test_model_swap_with_cookie_needs_csrf(env: Env) -> None:
    csrf = await env.login()
    refused = await env.client.post("/api/admin/model", json={"model": "m"})
    assert refused.status == 403
    ok = await env.client.post(
        "/api/admin/model", json={"model": "m"}, headers={"X-CSRF-Token": csrf}
    )
    assert ok.status == 200 and env.source.swapped == ["m"]


async def _next_event(resp: ClientResponse) -> tuple[str, dict[str, Any]]:
    event, data = "", ""
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and event:
            return event, json.loads(data)


async def test_events_stream_pushes_new_connections(env: Env) -> None:
    async with env.client.get("/api/events?sort=id&limit=10", headers=BEARER) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event, first = await _next_event(resp)
        assert event == "snapshot" and first["page"]["total"] == 0
        assert set(first) == {
            "now",
            "page",
            "engine",
            "adapters",
            "errors",
            "timeline",
            "grants",
            "http",
        }
        env.source.add("fresh", rtt_ms=12.0)
        for _ in range(100):
            event, snap = await _next_event(resp)
            if snap["page"]["total"]:
                break
        assert snap["page"]["connections"][0]["id"] == "fresh"
        assert snap["page"]["limit"] == 10


async def test_events_stream_ends_on_logout(env: Env) -> None:
    csrf = await env.login()
    async with env.client.get("/api/events") as resp:
        assert resp.status == 200
        assert (await _next_event(resp))[0] == "snapshot"
        out = await env.client.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
        assert out.status == 303
        for _ in range(100):
            event, _data = await _next_event(resp)
            if event == "logout":
                break
        assert event == "logout"
        assert await asyncio.wait_for(resp.content.read(), 10) == b""


async def test_events_stream_validates_query_and_auth(env: Env) -> None:
    assert (await env.client.get("/api/events")).status == 401
    assert (await env.client.get("/api/events?limit=0", headers=BEARER)).status == 400


async def test_events_streams_are_bounded(env: Env) -> None:
    env.dashboard.streams.max_streams = 1
    async with env.client.get("/api/events", headers=BEARER) as first:
        await _next_event(first)
        second = await env.client.get("/api/events", headers=BEARER)
        assert second.status == 503
    for _ in range(200):
        if env.dashboard.streams.open_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert env.dashboard.streams.open_streams == 0


async def test_static_assets(env: Env) -> None:
    js = await env.client.get("/dashboard/static/dashboard.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    css = await env.client.get("/dashboard/static/dashboard.css")
    assert css.status == 200 and css.content_type == "text/css"
    for name in ("dashboard.html", "nope.js", "..%2Froutes.py", "%2e%2e"):
        resp = await env.client.get(f"/dashboard/static/{name}")
        assert resp.status == 404, name
        assert (await resp.json())["error"]["code"] == "not_found"
    traversal = await env.client.get("/dashboard/static/../routes.py")
    assert traversal.status == 404


async def test_assets_reference_nothing_remote(env: Env) -> None:
    for name in ("dashboard.js", "dashboard.css"):
        text = await (await env.client.get(f"/dashboard/static/{name}")).text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    await env.login()
    page = await (await env.client.get("/dashboard")).text()
    assert "http" not in page.replace("http-equiv", "")


async def test_events_streams_end_with_bye_at_shutdown(env: Env) -> None:
    async with env.client.get("/api/events", headers=BEARER) as resp:
        assert (await _next_event(resp))[0] == "snapshot"
        await env.dashboard.streams.on_shutdown(env.client.app)  # what aiohttp calls first
        for _ in range(100):
            event, data = await _next_event(resp)
            if event == "bye":
                break
        assert event == "bye" and data == {"reason": "server shutting down"}
        assert await asyncio.wait_for(resp.content.read(), 10) == b""

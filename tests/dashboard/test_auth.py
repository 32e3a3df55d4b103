"""Who may use the dashboard: Bearer token, session cookie, CSRF, logout, disabled mode."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.dashboard import setup_dashboard
from tests.dashboard.conftest import BEARER, TOKEN, Env
from tests.dashboard.fakes import FakeOpsSource


async def _error(resp: object) -> dict[str, str]:
    body = await resp.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return body["error"]  # type: ignore[no-any-return]


async def test_without_admin_token_everything_is_404_json() -> None:
    app = web.Application()
    assert setup_dashboard(app, FakeOpsSource(), None) is None
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for method, path in [
            ("GET", "/dashboard"),
            ("GET", "/dashboard/login"),
            ("POST", "/dashboard/login"),
            ("GET", "/dashboard/static/dashboard.js"),
            ("GET", "/api/connections"),
            ("DELETE", "/api/connections/abc"),
            ("GET", "/api/status"),
            ("GET", "/api/events"),
            ("POST", "/api/admin/model"),
            ("GET", "/api/whatever"),
        ]:
            resp = await client.request(method, path, headers=BEARER)
            assert resp.status == 404, (method, path)
            assert (await _error(resp))["code"] == "not_found"


async def test_no_credentials_is_401_with_challenge(env: Env) -> None:
    resp = await env.client.get("/api/connections")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await _error(resp))["code"] == "unauthorized"


async def test_bearer_token(env: Env) -> None:
    ok = await env.client.get("/api/connections", headers=BEARER)
    assert ok.status == 200
    for bad in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}"):
        resp = await env.client.get("/api/connections", headers={"Authorization": bad})
        assert resp.status == 401, bad
        assert (await _error(resp))["message"] == "invalid admin token"


async def test_non_ascii_and_huge_bearer_are_refused(env: Env) -> None:
    for bad in ("Bearer \u00e9\u00e9", "Bearer " + "x" * 6000):
        resp = await env.client.get(
            "/api/connections", headers={"Authorization": bad.encode().decode("latin-1")}
        )
        assert resp.status in (400, 401, 431)


async def test_dashboard_redirects_to_login_without_session(env: Env) -> None:
    resp = await env.client.get("/dashboard", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/dashboard/login"
    login = await env.client.get("/dashboard/login")
    assert login.status == 200
    text = await login.text()
    assert 'name="token"' in text and 'role="alert"' not in text


async def test_login_sets_signed_httponly_strict_cookie(env: Env) -> None:
    resp = await env.client.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/dashboard"
    raw = [h for h in resp.headers.getall("Set-Cookie") if h.startswith("bridge_admin=")]
    assert len(raw) == 1
    header = raw[0].lower()
    assert "httponly" in header and "samesite=strict" in header and "path=/" in header
    session = resp.cookies["bridge_admin"].value
    assert TOKEN not in session and session.count(".") == 3
    csrf = [h for h in resp.headers.getall("Set-Cookie") if h.startswith("bridge_csrf=")]
    assert "httponly" not in csrf[0].lower() and "samesite=strict" in csrf[0].lower()
    page = await env.client.get("/dashboard")
    assert page.status == 200
    assert "connections-body" in await page.text()
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    api = await env.client.get("/api/connections")
    assert api.status == 200


async def test_wrong_token_login_is_refused_without_cookie(env: Env) -> None:
    resp = await env.client.post("/dashboard/login", data={"token": "nope"}, allow_redirects=False)
    assert resp.status == 401
    assert "Wrong admin token." in await resp.text()
    assert "bridge_admin" not in resp.cookies
    assert (await env.client.get("/api/connections")).status == 401


async def test_login_is_throttled_after_repeated_failures(env: Env) -> None:
    for _ in range(10):
        resp = await env.client.post("/dashboard/login", data={"token": "guess"})
        assert resp.status == 401
    blocked = await env.client.post(
        "/dashboard/login", data={"token": TOKEN}, allow_redirects=False
    )
    assert blocked.status == 429
    assert "bridge_admin" not in blocked.cookies
    env.clock.advance(61)
    assert (await env.client.post("/dashboard/login", data={"token": TOKEN})).status == 200


async def test_hostile_login_bodies(env: Env) -> None:
    big = await env.client.post("/dashboard/login", data={"token": "x" * 10_000})
    assert big.status == 413
    as_json = await env.client.post("/dashboard/login", json={"token": TOKEN})
    assert as_json.status == 415
    bad_utf8 = await env.client.post(
        "/dashboard/login",
        data=b"token=%ff%fe\xff",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad_utf8.status in (400, 401)
    cross = await env.client.post(
        "/dashboard/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status == 403


async def test_tampered_and_expired_cookies_are_refused(env: Env) -> None:
    await env.login()
    jar = env.client.session.cookie_jar
    good = next(c.value for c in jar if c.key == "bridge_admin")
    version, expires, nonce, sig = good.split(".")
    forged = [
        f"{version}.{int(expires) + 999999}.{nonce}.{sig}",
        f"{version}.{expires}.{nonce}x.{sig}",
        f"{version}.{expires}.{nonce}.{sig[:-2]}AA",
        "v1.1.2",
        TOKEN,
    ]
    jar.clear()  # send only the forged value
    for value in forged:
        resp = await env.client.get("/api/connections", headers={"Cookie": f"bridge_admin={value}"})
        assert resp.status == 401, value
    fine = await env.client.get("/api/connections", headers={"Cookie": f"bridge_admin={good}"})
    assert fine.status == 200
    env.clock.advance(12 * 3600 + 1)
    expired = await env.client.get("/api/connections", headers={"Cookie": f"bridge_admin={good}"})
    assert expired.status == 401


async def test_csrf_on_state_changing_calls_with_cookie(env: Env) -> None:
    env.source.add("c1")
    csrf = await env.login()
    no_header = await env.client.delete("/api/connections/c1")
    assert no_header.status == 403
    assert (await _error(no_header))["code"] == "csrf_failed"
    wrong = await env.client.delete("/api/connections/c1", headers={"X-CSRF-Token": "A" * 43})
    assert wrong.status == 403
    cross_site = await env.client.delete(
        "/api/connections/c1", headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}
    )
    assert cross_site.status == 403
    other_origin = await env.client.delete(
        "/api/connections/c1", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    )
    assert other_origin.status == 403
    assert env.source.kicked == [] and "c1" in env.source.rows
    origin = f"http://{env.client.host}:{env.client.port}"
    ok = await env.client.delete(
        "/api/connections/c1", headers={"X-CSRF-Token": csrf, "Origin": origin}
    )
    assert ok.status == 200
    assert env.source.kicked == ["c1"]


async def test_csrf_token_of_another_session_is_refused(env: Env) -> None:
    env.source.add("c1")
    first = await env.login()
    await env.login()  # a second login replaces the session cookie
    resp = await env.client.delete("/api/connections/c1", headers={"X-CSRF-Token": first})
    assert resp.status == 403


async def test_bearer_calls_need_no_csrf(env: Env) -> None:
    env.source.add("c1")
    resp = await env.client.delete("/api/connections/c1", headers=BEARER)
    assert resp.status == 200
    assert await resp.json() == {"id": "c1", "closed": True, "code": 4000}


async def test_logout_needs_csrf_and_revokes_the_session(env: Env) -> None:
    csrf = await env.login()
    old = next(c.value for c in env.client.session.cookie_jar if c.key == "bridge_admin")
    refused = await env.client.post("/dashboard/logout", data={"csrf": "wrong"})
    assert refused.status == 403
    resp = await env.client.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/dashboard/login"
    again = await env.client.get("/api/connections", headers={"Cookie": f"bridge_admin={old}"})
    assert again.status == 401


async def test_login_page_redirects_when_logged_in(env: Env) -> None:
    await env.login()
    resp = await env.client.get("/dashboard/login", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard"

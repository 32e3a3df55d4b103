"""The dashboard in a real browser against the fake source: login, live rows, RTT, kick."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, expect

from bridge.dashboard import setup_dashboard
from tests.dashboard.conftest import ARTIFACTS, TOKEN
from tests.dashboard.fakes import FakeClock, FakeOpsSource


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FakeOpsSource]]:
    clock = FakeClock(time.time())
    source = FakeOpsSource(clock)
    app = web.Application()
    setup_dashboard(app, source, TOKEN, clock=clock, refresh_s=0.25)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", source
    finally:
        await server.close()


LONG_CODE = "feishu.longconn_handshake_refused_connection_limit_exceeded"


def _populate(source: FakeOpsSource) -> None:
    now = source.clock.now
    for i in range(36):
        source.add(
            f"conn-{i:03d}",
            session=f"sess-{i * 7919 % 100000:05d}",
            remote=f"10.20.{i // 10}.{i * 13 % 250}:{40000 + i}",
            connected_at=now - 60 * (40 - i) - 7,
            last_pong_at=now - (i % 40),
            rtt_ms=[3.2, 8.7, 14.0, 42.0, 180.0, 640.0][i % 6],
            topics=["ops"] if i % 9 == 0 else [f"chat:feishu:oc_{i:04x}"],
            sent=1200 + i * 31,
            received=400 + i * 17,
            state="closing" if i == 5 else "open",
        )
    source.adapters = [
        {
            "name": "feishu",
            "mode": "longconn",
            "state": "connected",
            "since": now - 5400,
            "attempts": 0,
            "last_event_at": now - 12,
            "last_error": None,
        }
    ]
    source.engine["gpu_memory"] = {"cuda:0": 6_442_450_944}
    source.engine["devices"] = ["cuda:0"]
    source.errors = [
        {"ts": now - 40, "source": "hub", "code": "heartbeat_timeout", "message": "no pong"},
        {"ts": now - 300, "source": "feishu", "code": "reconnect", "message": "gateway 1006"},
        {
            "ts": now - 900,
            "source": "feishu",
            "code": LONG_CODE,
            "message": "handshake refused: http 403 status=514 autherr=1000040350 " * 3,
        },
    ]
    source.samples = [
        {
            "ts": now - 5 * (60 - k),
            "connections": 20 + k // 4,
            "events_per_s": 30 + (k * 7) % 25,
            "p95_ms": 120 + (k * 13) % 90,
        }
        for k in range(60)
    ]


async def test_wrong_token_is_refused(browser: Browser, served: tuple[str, FakeOpsSource]) -> None:
    base, _source = served
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{base}/dashboard")
    assert page.url.endswith("/dashboard/login")
    await page.fill("#token", "not-the-token")
    await page.click("#login-submit")
    await expect(page.locator(".login-error")).to_have_text("Wrong admin token.")
    assert page.url.endswith("/dashboard/login")
    assert not [c for c in await context.cookies() if c["name"] == "bridge_admin"]
    await page.goto(f"{base}/dashboard")
    assert page.url.endswith("/dashboard/login")
    await context.close()


async def test_login_see_client_appear_with_rtt_then_kick_it(
    browser: Browser, served: tuple[str, FakeOpsSource]
) -> None:
    base, source = served
    _populate(source)
    context = await browser.new_context(viewport={"width": 1440, "height": 1100})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(f"{base}/dashboard")
    await page.fill("#token", TOKEN)
    await page.click("#login-submit")
    await page.wait_for_url(f"{base}/dashboard")
    cookie = next(c for c in await context.cookies() if c["name"] == "bridge_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    await expect(page.locator("#live")).to_have_text("live", timeout=5000)
    await expect(page.locator("#stat-connections")).to_have_text("36")
    # The chart header shows the card's live count, not the last 5 s sample (34 here).
    await expect(page.locator("#last-connections")).to_have_text("36")
    feishu = page.locator('[data-adapter="feishu"]')
    await expect(feishu).to_contain_text("feishu · longconn")
    await expect(feishu).to_contain_text("Connected for1h 30m")
    await expect(page.locator("#engine-kv")).to_contain_text("cuda:0")
    await expect(page.locator("#errors")).to_contain_text("heartbeat_timeout")

    source.add(
        "conn-new",
        session="sess-new",
        remote="127.0.0.1:51234",
        connected_at=source.clock.now + 1,
        last_pong_at=source.clock.now,
        rtt_ms=42.0,
        topics=["ops"],
    )
    started = time.monotonic()
    row = page.locator('tr[data-conn-id="conn-new"]')
    await expect(row).to_be_visible(timeout=2000)
    appeared_s = time.monotonic() - started
    assert appeared_s < 2.0
    await expect(row.locator("td").nth(5)).to_have_text("42 ms")
    await expect(page.locator("#stat-connections")).to_have_text("37")
    await expect(page.locator("#last-connections")).to_have_text("37")

    await _assert_errors_do_not_overlap(page)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    await page.locator("#errors").screenshot(path=str(ARTIFACTS / "dashboard-errors.png"))

    kick = row.get_by_role("button", name="Kick connection conn-new")
    await kick.click()
    await expect(kick).to_have_text("Confirm")
    await kick.click()
    await expect(row).to_have_count(0, timeout=2000)
    await expect(page.locator("#toast")).to_contain_text("Closed connection conn-new")
    assert source.kicked == ["conn-new"]
    await expect(page.locator("#stat-connections")).to_have_text("36")
    assert errors == []
    await context.close()


async def _assert_errors_do_not_overlap(page: Page) -> None:
    """Every column of the errors list stays inside its own box, and the columns line up."""
    await expect(page.locator("#errors")).to_contain_text(LONG_CODE)
    boxes = await page.eval_on_selector_all(
        "#errors li",
        """items => items.map(li => [...li.children].map(span => {
            const r = span.getBoundingClientRect();
            return {left: r.left, right: r.right, clipped: span.scrollWidth > span.clientWidth + 1};
        }))""",
    )
    assert len(boxes) == 3
    for row in boxes:
        assert len(row) == 4
        for cell, after in itertools.pairwise(row):
            assert cell["right"] <= after["left"], row  # nothing runs into the next column
        assert not any(cell["clipped"] for cell in row), row  # long text wraps, is not cut
    lefts = {tuple(round(cell["left"]) for cell in row) for row in boxes}
    assert len(lefts) == 1, lefts  # one grid: the code and message columns line up
    code = await page.locator("#errors .code", has_text=LONG_CODE).bounding_box()
    assert code is not None and code["width"] >= 200  # the code column grew for the long code


async def test_ten_thousand_connections_search_sort_and_paging(
    browser: Browser, served: tuple[str, FakeOpsSource]
) -> None:
    base, source = served
    for i in range(10_000):
        source.add(f"row-{i:05d}", rtt_ms=float(i), remote=f"host-{i:05d}:1")
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{base}/dashboard/login")
    await page.fill("#token", TOKEN)
    started = time.monotonic()
    await page.click("#login-submit")
    await expect(page.locator("#page-info")).to_have_text("1–50 of 10,000")
    print(f"first render with 10,000 connections: {time.monotonic() - started:.2f} s")
    body_rows = page.locator("#connections-body tr")
    await expect(body_rows).to_have_count(50)
    await page.click('th[data-sort="rtt_ms"]')
    first = body_rows.first
    await expect(first).to_have_attribute("data-conn-id", "row-00000")
    await page.click('th[data-sort="rtt_ms"]')
    await expect(first).to_have_attribute("data-conn-id", "row-09999")
    await page.click("#next-page")
    await expect(page.locator("#page-info")).to_have_text("51–100 of 10,000")
    await expect(first).to_have_attribute("data-conn-id", "row-09949")
    await page.fill("#search", "host-04242:")
    await expect(page.locator("#page-info")).to_have_text("1–1 of 1")
    await expect(first).to_have_attribute("data-conn-id", "row-04242")
    await expect(page.locator("#stat-connections")).to_have_text("10,000")
    await context.close()
